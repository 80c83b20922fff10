"""Output files are complete or absent: write beside the target, then rename."""

from __future__ import annotations

import ctypes
import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from cair_runtime.errors import InvalidInputError


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``.

    An ``OSError`` (a full disk, a file size limit) leaves nothing behind and becomes an
    ``InvalidInputError`` naming the path and the reason; so does any interruption's clean-up.
    """
    path = Path(path)
    try:
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise InvalidInputError(f"cannot write {path}: {error.strerror or error}; choose a writable folder",
                                field="output") from None
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):  # a full disk or quota, a file size limit, a folder gone read-only
            raise InvalidInputError(f"cannot write {path}: {error.strerror or error}; nothing was written there: "
                                    "free some space or choose another folder", field="output") from None
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


def check_folder_writable(folder: str | Path) -> None:
    """Fail before any compute if files cannot be created in ``folder`` (created when missing).

    Tries a real file rather than ``os.access``: that catches read-only mounts, ``/proc`` and the
    like, where the permission bits say yes.
    """
    folder = Path(folder)
    for ancestor in (folder, *folder.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise InvalidInputError(f"cannot create folder {folder}: {ancestor} is a file, not a folder; "
                                        "choose another path")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidInputError(f"cannot create folder {folder}: {error.strerror or error}; "
                                "choose a path under a writable folder") from None
    try:
        handle, probe = tempfile.mkstemp(prefix=".cair-write-test-", dir=folder)
    except OSError as error:
        raise InvalidInputError(f"cannot write in folder {folder}: {error.strerror or error}; "
                                "choose a writable folder") from None
    os.close(handle)
    os.unlink(probe)


_RENAME_NOREPLACE = 1  # linux/fs.h
_AT_FDCWD = -100


def rename_noreplace(source: str | Path, target: str | Path) -> None:
    """Rename ``source`` to ``target``; ``FileExistsError`` when ``target`` exists, even an empty folder.

    Plain ``os.rename`` silently replaces an empty folder. Linux's ``renameat2(RENAME_NOREPLACE)``
    checks and renames in one step; elsewhere the check precedes the rename (a small window).
    """
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        result = renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):  # the file system or kernel lacks the flag: fall back
            raise OSError(code, os.strerror(code), str(target))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)
