"""The measuring lab: demo, convergence profile, quality evaluation, benchmarks, and the shipped ``shapes`` model.

Builds on the export core and the runtime. Its own dependencies (matplotlib, scipy, the peers T-GATE
and DeepCache) come with the ``lab`` extra: ``pip install -e '.[lab]'``.
"""
