"""The runtime stays light: importing any of it loads no torch, diffusers, transformers, onnx or openvino;
only the serving layer's app and CLI load Ray (``pip install 'cair-runtime[serve]'``)."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers", "onnx", "cair_export", "openvino", "nncf")
RUNTIME_MODULES = ("cair_runtime", "cair_runtime.cli", "cair_runtime.pipeline", "cair_runtime.manifest",
                   "cair_runtime.text2image", "cair_runtime.files", "cair_runtime.schedulers",
                   "cair_runtime.backends", "cair_runtime.backends.onnxruntime", "cair_runtime.backends.tensorrt",
                   "cair_runtime.backends.aoti", "cair_runtime.backends.openvino", "cair_runtime.serve", "cair_runtime.serve.api",
                   "cair_runtime.serve.config", "cair_runtime.serve.cli")
SERVING = ("ray", "fastapi", "starlette", "uvicorn")


def _loaded(modules, packages):
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {packages!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_runtime_imports_no_heavy_package():
    assert _loaded(RUNTIME_MODULES, HEAVY + SERVING) == []  # the serve CLI imports Ray only when it runs


def test_only_the_serve_app_loads_ray():
    pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install './runtime[serve]'")
    loaded = _loaded(("cair_runtime.serve.app",), HEAVY + SERVING)
    assert "ray" in loaded and "fastapi" in loaded and not set(loaded) & set(HEAVY)
