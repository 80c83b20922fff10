"""Prompt lists shipped with cair-export: ``shapes.txt`` (the shapes model) and ``general.txt`` (SD-style)."""
