"""The runtime inside a service: seeds per image, shared instances under threads, lifecycle."""

from __future__ import annotations

import numpy as np
import pytest

from cair_runtime.schedulers import SCHEDULER_NAMES
from cair_runtime.text2image import CairText2Image

PROMPTS = ["a small red circle on a white background", "a large blue square left of a green triangle"]


@pytest.fixture(scope="module")
def shapes(exported):
    return exported("shapes", with_pipeline=True)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_image_k_equals_the_single_image_of_its_seed(shapes, scheduler):
    # diffusers' list-of-generators semantics: image k's initial and ancestral noise come from seed + k only.
    with CairText2Image(shapes) as pipeline:
        batch = pipeline(PROMPTS, num_images_per_prompt=2, num_inference_steps=5, cache_step=2,
                         scheduler=scheduler, seed=10)
        for k in range(4):
            single = pipeline(PROMPTS[k // 2], num_inference_steps=5, cache_step=2, scheduler=scheduler, seed=10 + k)
            np.testing.assert_array_equal(single.latents[0], batch.latents[k])
            assert batch.parameters[k]["seed"] == 10 + k


def test_seed_list_and_max_batch_change_no_image(exported, shapes):
    # One seed per image in any order; an engine with max batch 1 (chunks of one) gives the same images.
    seeds = [7, 3, 11]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    with CairText2Image(shapes) as wide, CairText2Image(exported("shapes", with_pipeline=True, max_batch=1)) as narrow:
        listed = wide(prompts, num_inference_steps=4, cache_step=2, scheduler="euler-ancestral", seed=seeds)
        chunked = narrow(prompts, num_inference_steps=4, cache_step=2, scheduler="euler-ancestral", seed=seeds)
        assert [p["seed"] for p in listed.parameters] == seeds
        np.testing.assert_array_equal(listed.latents, chunked.latents)
        alone = wide(prompts[2], num_inference_steps=4, cache_step=2, scheduler="euler-ancestral", seed=11)
        np.testing.assert_array_equal(alone.latents[0], listed.latents[2])


def test_caller_latents_are_recorded_instead_of_a_seed(shapes):
    with CairText2Image(shapes) as pipeline:
        noise = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
        result = pipeline(PROMPTS[0], num_inference_steps=3, cache_step=1, latents=noise)
        assert result.parameters[0]["seed"] is None
        assert result.parameters[0]["latents"] == "supplied by the caller"


# -- shared instances under threads -----------------------------------------------------------------

def _calls(count: int) -> list[dict]:
    """Mixed calls: prompts, seeds, sizes, n, schedulers (euler-ancestral included), 1-3 images."""
    rng = np.random.default_rng(42)
    schedulers = ["euler-ancestral", "ddim", "dpm++2m", "euler", "unipc", "pndm"]
    calls = []
    for i in range(count):
        steps = int(rng.integers(4, 7))
        calls.append(dict(
            prompt=[PROMPTS[i % 2]] if i % 3 else PROMPTS, num_images_per_prompt=int(rng.integers(1, 4)) if i % 3 else 1,
            height=[64, 48, 80][i % 3], width=[64, 80, 48][i % 4 % 3], num_inference_steps=steps,
            cache_step=int(rng.integers(1, steps + 1)), scheduler=schedulers[i % len(schedulers)], seed=int(rng.integers(0, 1000))))
    return calls


def _run_threads(function, arguments: list, threads: int) -> list:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(function, arguments))


def test_shared_pipeline_under_8_threads_equals_serial_calls(shapes):
    calls = _calls(32)  # 8 threads x 4 generations
    with CairText2Image(shapes, max_concurrency=4) as pipeline:
        serial = [pipeline(**call).images for call in calls]
        concurrent = _run_threads(lambda call: pipeline(**call).images, calls, threads=8)
        assert 1 < len(pipeline.engine.pool.contexts) <= 4  # contexts were made lazily, never more than the bound
    for call, one, other in zip(calls, serial, concurrent):
        np.testing.assert_array_equal(one, other, err_msg=str(call))


def test_calls_wait_for_a_free_context(shapes):
    import threading

    with CairText2Image(shapes, max_concurrency=1) as pipeline:
        inside, peak, lock = [0], [0], threading.Lock()

        def callback(step, total):
            with lock:
                peak[0] = max(peak[0], inside[0])

        original = pipeline.engine._denoise_batch

        def counted(*args, **kwargs):
            with lock:
                inside[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                with lock:
                    inside[0] -= 1

        pipeline.engine._denoise_batch = counted
        _run_threads(lambda seed: pipeline(PROMPTS[0], num_inference_steps=3, cache_step=1, seed=seed,
                                           callback=callback), range(4), threads=4)
        assert peak[0] == 1 and len(pipeline.engine.pool.contexts) == 1


def test_close_releases_sessions_and_buffers_and_refuses_later_calls(shapes):
    import gc
    import weakref

    from cair_runtime.errors import EngineClosedError

    pipeline = CairText2Image(shapes, max_concurrency=2)
    _run_threads(lambda seed: pipeline(PROMPTS[0], num_inference_steps=3, cache_step=1, seed=seed), range(2), threads=2)
    contexts = list(pipeline.engine.pool.contexts)
    assert contexts
    live = [weakref.ref(session) for session in pipeline.engine.backend.sessions.values()]
    live += [weakref.ref(session) for _, _, session in pipeline.text_encoders] + [weakref.ref(pipeline.vae)]
    live += [weakref.ref(value) for context in contexts for value in (*context.caches.values(), *context._outputs.values())]
    live += [weakref.ref(binding) for context in contexts for binding in context.bindings.values()]
    del contexts
    pipeline.close()
    pipeline.close()  # twice is fine
    gc.collect()
    assert [ref for ref in live if ref() is not None] == []
    with pytest.raises(EngineClosedError, match="closed"):
        pipeline(PROMPTS[0], num_inference_steps=2, cache_step=1)


def test_context_memory_is_stated(shapes):
    from cair_runtime.manifest import eval_dim

    with CairText2Image(shapes) as pipeline:
        engine = pipeline.engine
        manifest = engine.manifest
        dims = {"batch": 2, "latent_height": 8, "latent_width": 8}
        # The default export: a cache per CFG half (2B), the four UNet graphs (planning, fidelity and
        # the two shallow ones) each with its own noise_pred at 2B, the deep feature once per graph
        # that writes it (planning's and fidelity's, read in place by the shallow graphs), the text
        # (2B, L, D) for each graph that reads it.
        assert manifest.fidelity_guidance == "cfg" and set(manifest.schedule_graphs) == {
            "planning", "fidelity", "shallow", "shallow_planning"}
        caches = sum(2 * 2 * eval_dim(cache.tokens, dims) * cache.channels * 4 for cache in manifest.caches)
        noise_pred = 4 * (2 * 2) * engine.in_channels * 8 * 8 * 4
        readers = sum("encoder_hidden_states" in {spec.name for spec in graph.inputs}
                      for graph in manifest.schedule_graphs.values())
        text = readers * 2 * 2 * manifest.dim("text_len").opt * engine.context_dim * 4
        branch = manifest.deep_branch
        deep = 2 * (2 * 2) * branch["channels"] * (8 // 2 ** branch["level"]) ** 2 * 4
        assert engine.context_nbytes(**dims) == caches + noise_pred + text + deep


def test_device_id_and_thread_budget_reach_every_session(shapes, monkeypatch):
    # No GPU here: record what each session is asked for, then make it on the CPU (and run nothing).
    import onnxruntime as ort

    import cair_runtime.backends.onnxruntime as backend_module

    made, real = [], ort.InferenceSession

    def recording(path, options, providers, provider_options):
        made.append((path.rsplit("/", 1)[-1], options.intra_op_num_threads, providers, provider_options))
        return real(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(backend_module.ort, "InferenceSession", recording)
    monkeypatch.setattr(backend_module.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    CairText2Image(shapes, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], threads=1, device_id=1).close()
    # planning and fidelity steps share the switch graph's one session; the shallow graphs have their own
    assert sorted(name for name, *_ in made) == ["shallow.onnx", "shallow_planning.onnx", "text_encoder.onnx", "unet.onnx",
                                                 "vae_decoder.onnx", "vae_encoder.onnx"]
    for name, threads, providers, options in made:
        assert threads == 1 and providers == ["CUDAExecutionProvider", "CPUExecutionProvider"], name
        assert options == [{"device_id": "1"}, {}], name


def test_close_waits_for_a_call_in_flight(shapes):
    import threading

    pipeline = CairText2Image(shapes)
    decoding, release = threading.Event(), threading.Event()
    original = pipeline.decode

    def slow_decode(latents):
        decoding.set()
        release.wait(30)
        return original(latents)

    pipeline.decode = slow_decode
    results = []
    worker = threading.Thread(target=lambda: results.append(pipeline(PROMPTS[0], num_inference_steps=3, cache_step=1)))
    worker.start()
    assert decoding.wait(30)  # the call has given its UNet context back and is decoding
    closer = threading.Thread(target=pipeline.close)
    closer.start()
    closer.join(0.5)
    assert closer.is_alive()  # close() waits for the call in flight...
    release.set()
    worker.join(30)
    closer.join(30)
    assert not closer.is_alive() and results and results[0].images.shape == (1, 64, 64, 3)  # ...which completes
