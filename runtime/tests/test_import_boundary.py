"""The runtime stays light: importing any of it loads no torch, diffusers, transformers or onnx."""

import json
import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "onnx", "cair_export")
RUNTIME_MODULES = ("cair_runtime", "cair_runtime.cli", "cair_runtime.pipeline", "cair_runtime.manifest",
                   "cair_runtime.text2image", "cair_runtime.files", "cair_runtime.schedulers",
                   "cair_runtime.backends", "cair_runtime.backends.onnxruntime", "cair_runtime.backends.tensorrt",
                   "cair_runtime.backends.aoti")


def test_runtime_imports_no_heavy_package():
    code = (
        "import importlib, json, sys\n"
        f"for name in {RUNTIME_MODULES!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []
