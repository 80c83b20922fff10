"""Updates of an engine folder's files and manifest, in one step as far as a reader can tell.

Shared by the TensorRT and AOTInductor builds (``build.py``, ``aoti.py``): new files are staged,
moved into place, and ``manifest.json`` is replaced last (``core.engine_manifest.write_manifest``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

from cair_export.core.engine_manifest import write_manifest
from cair_runtime.manifest import EngineRecord, Manifest, record_file, stamp_verified


def install_engines(folder: Path, manifest: Manifest, staged: Mapping[str, Path],
                    records: list[EngineRecord]) -> Manifest:
    """Move staged engine files into ``folder`` and record them; the manifest is replaced last.

    Records of the same backend are replaced (one build per backend), others kept; files are
    listed with sha256 like the graphs.
    """
    backend = records[0].backend
    names = [path.name for path in staged.values()]
    for path in staged.values():
        os.replace(path, folder / path.name)
    old = {record.file for record in manifest.engines if record.backend == backend}
    files = [f for f in manifest.files if f.path not in names and f.path not in old]
    engines = [record for record in manifest.engines if record.backend != backend]
    updated = dataclasses.replace(manifest, files=tuple(files) + tuple(record_file(folder, name) for name in names),
                                  engines=tuple(engines) + tuple(records))
    write_manifest(folder, updated)
    for stale in old - set(names):
        (folder / stale).unlink(missing_ok=True)
    stamp_verified(folder, updated)  # the new files were just hashed, the others verified when the build began
    return updated
