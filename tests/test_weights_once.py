"""The UNet's weights once: on disk (one file both graphs point into) and, on request, in memory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cair_runtime.errors import ManifestError
from cair_runtime.manifest import load_manifest
from cair_runtime.pipeline import CairEngine


def _inputs(engine, batch=2):
    rng = np.random.default_rng(0)
    text_len = engine.manifest.dim("text_len").opt
    return {"prompt_embeds": rng.standard_normal((batch, text_len, engine.context_dim), dtype=np.float32),
            "negative_prompt_embeds": rng.standard_normal((batch, text_len, engine.context_dim), dtype=np.float32)}


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
def test_both_sessions_use_one_buffer_per_weight(exported, preset):
    with CairEngine(exported(preset), share_weights=True) as engine:
        planning, fidelity = engine.backend.weights["planning"], engine.backend.weights["fidelity"]
        buffers = {id(value): value for value in planning.values()}
        # Every weight fidelity takes is one of planning's buffers (same object, same memory), also
        # where the exporter gave it another name.
        assert fidelity and all(id(value) in buffers for value in fidelity.values())
        renamed = [name for name in fidelity if name not in planning]
        assert renamed
        record = engine.manifest.weights["graphs"]
        for name in renamed:
            twin = next(n for n, entry in record["planning"].items() if entry[0] == record["fidelity"][name][0])
            assert fidelity[name].data_ptr() == planning[twin].data_ptr()


def test_shared_weights_compute_what_private_ones_do(exported):
    # Sharing turns onnxruntime's prepacking off, whose GEMM rounds differently: equal to ~1e-6.
    folder = exported("tiny-sd21")
    with CairEngine(folder, share_weights=True) as shared, CairEngine(folder) as private:
        assert private.backend.weights == {}
        for scheduler in ("ddim", "euler-ancestral"):
            a = shared.denoise(**_inputs(shared), num_inference_steps=5, cache_step=2, scheduler=scheduler, seed=4)
            b = private.denoise(**_inputs(private), num_inference_steps=5, cache_step=2, scheduler=scheduler, seed=4)
            assert np.abs(a.latents - b.latents).max() <= 1e-4 * np.abs(b.latents).max()


def test_weights_record_pointing_outside_the_file_is_refused(exported, tmp_path):
    import shutil

    folder = tmp_path / "engine"
    shutil.copytree(exported("tiny-sd15"), folder)
    data = json.loads((folder / "manifest.json").read_text())
    name, entry = next(iter(data["weights"]["graphs"]["fidelity"].items()))
    entry[0] = 10**12
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=f"fidelity weight '{name}'.*does not describe a tensor inside"):
        load_manifest(folder)
