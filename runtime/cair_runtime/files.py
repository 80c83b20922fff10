"""Output files are complete or absent: write beside the target, then rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from cair_runtime.errors import InvalidInputError


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path: str | Path, make_parent: bool = False) -> None:
    """Fail before any compute if ``path`` cannot be written (``make_parent``: create its folder first)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InvalidInputError(f"output {path} is a folder; give a file path")
    if path.exists() and not path.is_file():
        raise InvalidInputError(f"output {path} exists and is not a regular file (a device, pipe or socket); "
                                "give a file path")
    if make_parent:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InvalidInputError(f"cannot create output folder {parent}: {error.strerror or error}") from None
    if not parent.is_dir():
        raise InvalidInputError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InvalidInputError(f"output folder {parent} is not writable")
