"""Shared fixtures: tiny models exported once per test session."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cair_export.export import ExportConfig, export_model
from cair_export.models import load_model



@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """``exported(preset, with_pipeline=False, **config)`` -> engine folder, exported once and reused."""
    folders: dict[tuple, Path] = {}

    def get(preset: str, with_pipeline: bool = False, **config) -> Path:
        key = (preset, with_pipeline, tuple(sorted(config.items())))
        if key not in folders:
            out = tmp_path_factory.mktemp("engines") / preset
            export_model(load_model(preset, with_pipeline=with_pipeline), out, ExportConfig(**config),
                         progress=logging.getLogger("export").info)
            folders[key] = out
        return folders[key]

    return get
