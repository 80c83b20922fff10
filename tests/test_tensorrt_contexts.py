"""The TensorRT backend's per-call structure, run through ``CairEngine`` on stand-ins for tensorrt and cuda-python.

No GPU here: the stand-ins keep "device" memory in host arrays at real addresses (so the backend's
``cudaMemcpyAsync`` calls move real bytes) and "engines" that compute a small function of their
bound inputs: noise_pred from the sample and the prompt (planning) or the caches (fidelity).
That is enough to check what the backend itself decides: per-call contexts (execution contexts,
stream, activation block, buffers) that never share memory, the cache hand-off by address, the
current device set on every calling thread, and every allocation freed by ``close()``. TensorRT's
own behaviour is tested where it exists (runtime/tests/test_tensorrt_backend.py, tests/test_build.py).
"""

from __future__ import annotations

import ctypes
import dataclasses
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cair_runtime.manifest import EngineRecord, load_manifest, record_file
from cair_runtime.pipeline import CairEngine


class FakeCuda:
    """cuda-python's runtime API, as far as the backend uses it; memory lives in host arrays."""

    def __init__(self):
        self.cudaError_t = types.SimpleNamespace(cudaSuccess=0)
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
        self.memory: dict[int, np.ndarray] = {}
        self.streams: set[int] = set()
        self.device_threads: set[int] = set()
        self.lock = threading.Lock()

    def cudaGetDeviceProperties(self, device_id):
        return 0, types.SimpleNamespace(name=b"Fake GPU", major=9, minor=0)

    def cudaSetDevice(self, device_id):
        self.device_threads.add(threading.get_ident())
        return (0,)

    def cudaMalloc(self, nbytes):
        block = np.zeros(nbytes, np.uint8)
        with self.lock:
            self.memory[block.ctypes.data] = block
        return 0, block.ctypes.data

    def cudaFree(self, pointer):
        with self.lock:
            del self.memory[pointer]
        return (0,)

    def cudaStreamCreate(self):
        with self.lock:
            stream = len(self.streams) + 1000
            self.streams.add(stream)
        return 0, stream

    def cudaStreamDestroy(self, stream):
        self.streams.remove(stream)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaMemcpyAsync(self, destination, source, nbytes, kind, stream):
        ctypes.memmove(destination, source, nbytes)
        return (0,)

    def array(self, pointer, shape):
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.addresses, self.shapes, self.activation = engine, {}, {}, None

    def set_device_memory(self, pointer, nbytes):
        self.activation = pointer

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer

    def execute_async_v3(self, stream):
        cuda, graph = self.engine.cuda, self.engine.graph
        sample = cuda.array(self.addresses["sample"], self.shapes["sample"])
        timestep = cuda.array(self.addresses["timestep"], (1,))[0]
        noise_pred = cuda.array(self.addresses["noise_pred"], sample.shape)
        batch = len(sample) // 2 if graph.kind == "planning" else len(sample)
        dims = {"batch": batch, "latent_height": sample.shape[2], "latent_width": sample.shape[3], "text_len": 77}
        caches = {spec.name: cuda.array(self.addresses[spec.name], spec.resolve(dims))
                  for spec in (*graph.inputs, *graph.outputs) if spec.name.startswith("cache_")}
        if graph.kind == "planning":
            text = cuda.array(self.addresses["encoder_hidden_states"], self.shapes["encoder_hidden_states"])
            prompt = text.mean(axis=(1, 2))  # (2B,): unconditional half first
            noise_pred[:] = 0.5 * sample + prompt[:, None, None, None] + 1e-3 * timestep
            for cache in caches.values():  # (B, tokens, channels): the halves' mean, as CAIR caches
                cache[:] = ((prompt[:batch] + prompt[batch:]) / 2 + sample[:batch].mean(axis=(1, 2, 3)))[:, None, None]
        else:
            noise_pred[:] = 0.5 * sample + sum(cache[:, 0, 0] for cache in caches.values())[:, None, None, None]
        return True


class FakeEngine:
    def __init__(self, cuda, graph):
        self.cuda, self.graph = cuda, graph
        self.device_memory_size_v2 = 1 << 16
        self.contexts = []

    def create_execution_context(self, strategy):
        context = FakeContext(self)
        self.contexts.append(context)
        return context

    def get_tensor_dtype(self, name):
        return "float32"

    def get_tensor_mode(self, name):
        return "input" if name in {spec.name for spec in self.graph.inputs} else "output"


def fake_tensorrt(cuda, manifest):
    module = types.ModuleType("tensorrt")
    module.__version__ = "10.99.0"
    module.Logger = type("Logger", (), {"ERROR": 1, "__init__": lambda self, level: None})
    module.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="user")
    module.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    module.nptype = lambda dtype: np.float32
    engines = []

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            engine = FakeEngine(cuda, manifest.graphs[plan.decode()])
            engines.append(engine)
            return engine

    module.Runtime = Runtime
    module.engines = engines
    return module


@pytest.fixture
def trt_folder(exported, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "tiny-sd21"
    # merged caches, no shallow graphs: the layout TensorRT runs at batch B after n (the fakes compute that)
    shutil.copytree(exported("tiny-sd21", fidelity_guidance="none", deep_branch=None), folder)
    manifest = load_manifest(folder)
    properties = {"tensorrt": "10.99.0", "gpu": "Fake GPU", "compute_capability": "9.0", "precision": "fp32"}
    for kind in ("planning", "fidelity"):
        (folder / f"{kind}.plan").write_bytes(kind.encode())
    manifest = dataclasses.replace(
        manifest, engines=tuple(EngineRecord(kind, "tensorrt", f"{kind}.plan", properties) for kind in ("planning", "fidelity")),
        files=manifest.files + tuple(record_file(folder, f"{kind}.plan") for kind in ("planning", "fidelity")))
    (folder / "manifest.json").write_text(manifest.to_json())
    cuda = FakeCuda()
    trt = fake_tensorrt(cuda, manifest)
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cuda
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cuda)
    return folder, cuda, trt


def _call(engine, seed):
    rng = np.random.default_rng(seed)
    text_len = engine.manifest.dim("text_len").opt
    size = [(8, 12), (12, 8), (8, 8)][seed % 3]
    return dict(prompt_embeds=rng.standard_normal((1 + seed % 2, text_len, engine.context_dim), dtype=np.float32),
                height=8 * size[0], width=8 * size[1], num_inference_steps=4, cache_step=1 + seed % 4, seed=seed,
                scheduler=["ddim", "euler-ancestral"][seed % 2], guidance_scale=2.0)


def test_contexts_share_engines_not_memory_and_concurrent_calls_equal_serial(trt_folder):
    folder, cuda, trt = trt_folder
    with CairEngine(folder, backend="tensorrt", max_concurrency=3) as engine:
        serial = [engine.denoise(**_call(engine, seed)).latents for seed in range(12)]
        with ThreadPoolExecutor(6) as pool:
            concurrent = list(pool.map(lambda seed: engine.denoise(**_call(engine, seed)).latents, range(12)))
        for one, other in zip(serial, concurrent):
            np.testing.assert_array_equal(one, other)
        contexts = engine.pool.contexts
        assert 1 < len(contexts) <= 3 and len(trt.engines) == 2  # engines deserialised once, shared
        # Each context: its own stream and activation block, shared by its planning and fidelity contexts.
        assert len({c.stream for c in contexts}) == len({c.activation for c in contexts}) == len(contexts)
        for context in contexts:
            planning, fidelity = context.contexts["planning"], context.contexts["fidelity"]
            assert planning.activation == fidelity.activation == context.activation
            for name in context.caches:  # planning writes the very buffers fidelity reads
                assert planning.addresses[name] == fidelity.addresses[name] == context.caches[name].pointer
        pointers = [{b.pointer for kind in c.buffers.values() for b in kind.values()} for c in contexts]
        assert all(not (a & b) for i, a in enumerate(pointers) for b in pointers[i + 1:])
        assert len(cuda.device_threads) > 1  # the device was set on the worker threads, not only the first
    assert cuda.memory == {} and cuda.streams == set()  # close() freed every buffer, block and stream


def test_results_depend_on_the_prompt_so_cross_talk_would_show(trt_folder):
    folder, _, _ = trt_folder
    with CairEngine(folder, backend="tensorrt") as engine:
        call = _call(engine, 0)
        other = dict(call, prompt_embeds=call["prompt_embeds"] + 1)
        assert not np.array_equal(engine.denoise(**call).latents, engine.denoise(**other).latents)
