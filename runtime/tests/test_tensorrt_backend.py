"""TensorRT and AOTInductor backends: provenance checks as pure functions; missing packages; lazy imports.

Running engines needs TensorRT and an NVIDIA GPU: the end-to-end test lives in tests/test_build.py
and skips with the reason where they are missing.
"""

import json
import subprocess
import sys

import pytest

from cair_runtime.backends import BACKENDS, make_backend
from cair_runtime.backends.tensorrt import (DeviceInfo, check_engine_records, engine_problems, import_tensorrt,
                                            tensorrt_records)
from cair_runtime.errors import EngineMismatchError, ManifestError, MissingDependencyError
from cair_runtime.manifest import Dim, EngineRecord, GraphSpec, Manifest, TensorSpec

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", "9.0")


def _record(kind="planning", version="10.13.0.35", capability="9.0", gpu="NVIDIA H100 80GB HBM3"):
    return EngineRecord(kind, "tensorrt", f"{kind}.plan",
                        {"tensorrt": version, "gpu": gpu, "compute_capability": capability, "precision": "float16"})


def _manifest(engines=()):
    spec = TensorSpec("sample", "float32", ("batch", 4, "latent_height", "latent_width"))
    return Manifest(schema_version=1, producer={}, model={"name": "m"}, scheduler_config={}, fidelity_guidance="none",
                    dims=(Dim("batch", 1, 1, 4),),
                    graphs={kind: GraphSpec(kind, f"{kind}.onnx", (spec,), (spec,)) for kind in ("planning", "fidelity")},
                    caches=(), files=(), engines=tuple(engines))


def test_matching_engine_has_no_problems():
    assert engine_problems(_record(), "10.13.0.35", H100) == []
    # Another board of the same compute capability runs the engine.
    assert engine_problems(_record(gpu="NVIDIA H100 PCIe"), "10.13.0.35", H100) == []


def test_other_tensorrt_version_or_gpu_is_refused_with_every_reason():
    problems = engine_problems(_record(version="10.7.0", capability="8.9", gpu="NVIDIA L4"), "10.13.0.35", H100)
    assert len(problems) == 2
    assert "built by TensorRT 10.7.0, this is TensorRT 10.13.0.35" in problems[0]
    assert "compute capability 8.9 (NVIDIA L4)" in problems[1] and "is 9.0" in problems[1]
    with pytest.raises(EngineMismatchError) as error:
        check_engine_records([_record(), _record("fidelity", version="10.7.0")], "10.13.0.35", H100)
    assert "fidelity.plan" in str(error.value) and "cair-export build" in str(error.value)
    check_engine_records([_record(), _record("fidelity")], "10.13.0.35", H100)  # no error


def test_folder_without_engines_is_refused():
    with pytest.raises(ManifestError, match="no TensorRT engine for planning, fidelity.*--backend tensorrt"):
        tensorrt_records(_manifest())
    records = tensorrt_records(_manifest([_record(), _record("fidelity")]))
    assert set(records) == {"planning", "fidelity"}


def test_missing_tensorrt_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without it
    with pytest.raises(MissingDependencyError, match=r"pip install 'cair-runtime\[tensorrt\]'"):
        import_tensorrt()
    with pytest.raises(MissingDependencyError, match="tensorrt"):
        make_backend("tensorrt", tmp_path, _manifest([_record(), _record("fidelity")]))
    assert BACKENDS == ("onnxruntime", "tensorrt", "aoti", "openvino")


def test_aoti_record_checks_are_pure():
    from cair_runtime.backends.aoti import aoti_records, check_aoti_record

    with pytest.raises(ManifestError, match="--backend aoti"):
        aoti_records(_manifest())
    cpu = EngineRecord("planning", "aoti", "planning.pt2", {"device": "cpu", "torch": "2.13.0+cpu"})
    check_aoti_record(cpu, "cpu", "2.13.0+cu128")  # the local build tag does not matter
    with pytest.raises(EngineMismatchError, match="compiled for cpu, this backend runs on cuda"):
        check_aoti_record(cpu, "cuda:0", "2.13.0")
    with pytest.raises(EngineMismatchError, match="torch 2.13.0\\+cpu, this is torch 2.14.0"):
        check_aoti_record(cpu, "cpu", "2.14.0")


def test_backend_modules_import_nothing_until_used():
    """Importing the TensorRT backend module loads neither tensorrt, cuda nor torch."""
    code = ("import json, sys\nimport cair_runtime.backends.tensorrt\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'cuda', 'torch'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []
