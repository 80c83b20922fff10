"""An export's output folder as one transaction: it appears whole, or not at all.

The export is built in a hidden folder beside the target (``.NAME.partial-PID-*``) and renamed into
place at the end. Nothing the user had is lost on the way: one export at a time holds a target
(``.NAME.lock``), ``overwrite`` replaces only a complete engine folder (never the model's own), a
folder that appeared meanwhile is left alone, and an interrupted export removes its partial folder
(or a later one does, once its process is gone).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import shutil
import tempfile
import threading
from pathlib import Path

from cair_runtime.errors import CairError, InvalidInputError
from cair_runtime.files import check_folder_writable, rename_noreplace
from cair_runtime.manifest import load_manifest

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def folder_transaction(out_dir: str | Path, overwrite: bool, source: Path | None = None):
    """Yield an empty hidden folder beside ``out_dir``; when the block ends, move it into place as ``out_dir``.

    Holds ``export_lock`` throughout and checks the target again under it (``check_output_dir``:
    ``overwrite``, ``source``). On any error or interruption the hidden folder is removed; a full
    disk becomes one line naming the fix.
    """
    out_dir = Path(out_dir)
    with export_lock(out_dir):
        _remove_stale_folders(out_dir)
        check_output_dir(out_dir, overwrite, source)  # again, now that no other export can change it
        existed = out_dir.is_dir()
        work = None
        try:
            work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))
            work.chmod(0o755)  # mkdtemp makes it private; the engine folder is an ordinary one
            yield work
            _move_into_place(work, out_dir, overwrite, existed)
        except BaseException as error:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
            if isinstance(error, OSError) and error.errno in _DISK_FULL:
                raise InvalidInputError(f"no space left to write the export to {out_dir} ({error.strerror}); "
                                        "the unfinished export was removed; free some space or choose another "
                                        "folder") from None
            raise


def check_output_dir(out_dir: str | Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse, before any work, an output the export cannot write or must not replace.

    ``overwrite`` replaces only a complete engine folder (its manifest loads); ``source`` is the
    model's own folder, which is never the output nor inside it. Creates the parent folder.
    """
    out_dir = Path(out_dir)
    if source is not None:
        target, source = out_dir.resolve(), Path(source).resolve()
        if target == source or target in source.parents:
            what = "is the model folder" if target == source else f"holds the model folder {source}"
            raise InvalidInputError(f"output {out_dir} {what}; writing there would delete the model; "
                                    "choose another output folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(f"output {out_dir} exists and is not a folder; choose another path")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise InvalidInputError(f"output folder {out_dir} exists and is not empty; pass --overwrite to replace it")
        try:
            load_manifest(out_dir, verify="size")
        except CairError as error:
            reason = str(error).splitlines()[0]
            raise InvalidInputError(f"--overwrite replaces only a complete engine folder: {reason}; replacing it "
                                    "would lose its files: empty it or choose another folder") from None
    check_folder_writable(out_dir.parent)


_locks_held: set[tuple[Path, int]] = set()  # (lock file, thread): export_lock is re-entrant per thread


@contextlib.contextmanager
def export_lock(out_dir: str | Path):
    """Hold ``.NAME.lock`` beside ``out_dir``: a second export to the same folder fails at once.

    Re-entrant within a thread, so the CLI can take it before loading the model and
    ``folder_transaction`` again. The parent folder must exist (``check_output_dir`` makes it).
    """
    out_dir = Path(out_dir)
    path = out_dir.parent.resolve() / f".{out_dir.name}.lock"
    key = (path, threading.get_ident())
    if key in _locks_held:
        yield
        return
    fd = _acquire_lock(path, out_dir)
    _locks_held.add(key)
    try:
        yield
    finally:
        _locks_held.discard(key)
        path.unlink(missing_ok=True)  # still locked: whoever opened this file sees it gone and retries
        os.close(fd)


def _acquire_lock(path: Path, out_dir: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InvalidInputError(f"another export to {out_dir} is running (pid {owner}); wait for it to finish "
                                    "or choose another folder") from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)  # the previous holder removed the file as we locked it: lock the new one


def _remove_stale_folders(out_dir: Path) -> None:
    """Partial (and moved-aside) folders of ``out_dir`` whose export process is gone, e.g. after SIGKILL.

    A moved-aside old export is the only copy while the target is missing: it stays then.
    """
    for kind in ("partial", "old"):
        if kind == "old" and not out_dir.is_dir():
            continue
        prefix = f".{out_dir.name}.{kind}-"
        for folder in out_dir.parent.glob(glob.escape(prefix) + "*"):
            pid = folder.name[len(prefix):].split("-")[0]
            if folder.is_dir() and pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _move_into_place(work: Path, target: Path, overwrite: bool, existed: bool) -> None:
    """Rename the finished folder to ``target``; what is there is replaced only as ``check_output_dir`` allows.

    A folder that appeared during the export is left alone unless ``overwrite`` says otherwise. An
    old folder is moved aside and removed only after the new one is in.
    """
    appeared = InvalidInputError(f"output folder {target} appeared while exporting and was left as it is; "
                                 "the new export was discarded; remove it or pass --overwrite, and export again")
    if not os.path.lexists(target):
        try:
            rename_noreplace(work, target)
        except FileExistsError:
            raise appeared from None
        return
    if not existed and not overwrite:
        raise appeared
    check_output_dir(target, overwrite)  # what is there now may still be replaced
    old = target.with_name(work.name.replace(".partial-", ".old-", 1))
    rename_noreplace(target, old)
    try:
        rename_noreplace(work, target)
    except BaseException:
        with contextlib.suppress(OSError):
            rename_noreplace(old, target)  # put the old one back
        raise
    if old.is_symlink():  # the target was a link to a folder: the link goes, the folder it named stays as it is
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)
