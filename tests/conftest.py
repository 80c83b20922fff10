"""Shared fixtures: tiny models exported once per test session."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cair_export.core.export import ExportConfig, export_model
from cair_export.core.models import load_model



@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """``exported(preset, with_pipeline=False, **config)`` -> engine folder, exported once and reused.

    Keyed by the whole ``ExportConfig``: options spelled out at their defaults share the default export.
    """
    folders: dict[tuple, Path] = {}

    def get(preset: str, with_pipeline: bool = False, **config) -> Path:
        options = ExportConfig(**config)
        key = (preset, with_pipeline, options)
        if key not in folders:
            out = tmp_path_factory.mktemp("engines") / preset
            export_model(load_model(preset, with_pipeline=with_pipeline), out, options,
                         progress=logging.getLogger("export").info)
            folders[key] = out
        return folders[key]

    return get


@pytest.fixture
def one_line_error():
    """``one_line_error(code, err, *needles, prog=None)``: exit code 2 and one stderr line holding every needle.

    The CLI's promise for bad input: a clear one-line error, no traceback (``prog``: the line's start).
    """
    def check(code: int, err: str, *needles: str, prog: str | None = None) -> None:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (code, err)
        assert prog is None or lines[0].startswith(prog), lines[0]
        for needle in needles:
            assert needle in lines[0], lines[0]

    return check



@pytest.fixture
def replay(capsys):
    """``replay(engine, png, out, *extra)``: ``cair-run`` with the parameters a PNG records -> (exit code, stderr).

    What a user does to reproduce an image: read its ``parameters`` text chunk and pass each field as
    the flag of the same name (``cache_step`` -> ``--cache-step``); the model and the size come from
    the engine and the flags, the init image (recorded by name) is passed in ``extra``.
    """
    import json

    from PIL import Image

    from cair_runtime.cli import main

    def run(engine: Path, png: Path, out: Path, *extra: str) -> tuple[int, str]:
        with Image.open(png) as image:
            parameters = json.loads(image.text["parameters"])
        argv = [str(engine), parameters.pop("prompt"), "-o", str(out), *extra]
        for name, value in parameters.items():
            if value is not None and name not in ("model", "image", "loras", "latents", "control", "ip_adapter"):
                argv += [f"--{name.replace('_', '-')}", str(value)]
        code = main(argv)
        return code, capsys.readouterr().err

    return run
