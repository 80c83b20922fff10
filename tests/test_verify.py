"""One check of graph outputs (cair_export.core.verify) and one rule for reusing an export (lab.engines)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from cair_export.core.export import ExportConfig
from cair_export.core.verify import compare_outputs, named_outputs, relative_error
from cair_export.lab.engines import stale_reason
from cair_runtime.errors import ValidationError
from cair_runtime.manifest import load_manifest

EXPECTED = {"noise_pred": np.ones((2, 4, 8, 8), np.float32), "cache_000": np.full((1, 64, 32), 2.0, np.float32)}


def test_outputs_are_matched_by_name_not_position():
    actual = {"cache_000": EXPECTED["cache_000"] * 1.01, "noise_pred": EXPECTED["noise_pred"]}  # other order
    checks = compare_outputs(actual, EXPECTED, 0.1, "planning")
    assert [c.output for c in checks] == ["noise_pred", "cache_000"]
    assert checks[0].relative == 0 and checks[1].relative == pytest.approx(0.01, rel=1e-3)
    assert all(c.ok for c in checks)


def test_a_missing_extra_or_reshaped_output_is_reported_at_once():
    actual = {"noise_pred": EXPECTED["noise_pred"][:1], "cache_001": EXPECTED["cache_000"]}
    with pytest.raises(ValidationError) as caught:
        compare_outputs(actual, EXPECTED, 0.1, "fidelity")
    message = str(caught.value)
    assert message.startswith("fidelity:")
    assert "missing output(s) cache_000" in message and "unexpected output(s) cache_001" in message
    assert "noise_pred has shape (1, 4, 8, 8), expected (2, 4, 8, 8)" in message


def test_nan_is_outside_every_tolerance():
    broken = {**EXPECTED, "noise_pred": np.full_like(EXPECTED["noise_pred"], np.nan)}
    check = compare_outputs(broken, EXPECTED, 1e9, "planning")[0]
    assert np.isnan(check.relative) and not check.ok
    assert check.problem("planning") == "planning:noise_pred relative error nan > 1e+09"


def test_relative_error_is_over_the_largest_reference_value():
    assert relative_error(np.array([1.0, 3.0]), np.array([1.0, 4.0])) == (1.0, 0.25)


def test_a_runner_returning_too_few_outputs_fails_instead_of_zipping_short():
    with pytest.raises(ValidationError, match="returned 1 outputs, expected 2"):
        named_outputs(["noise_pred", "cache_000"], [EXPECTED["noise_pred"]], "onnxruntime session")


def test_an_export_is_reused_only_for_the_same_model_graphs_batch_and_size(exported):
    manifest = load_manifest(exported("tiny-sd15", with_pipeline=True))
    model = SimpleNamespace(source_sha256=manifest.model.get("source_sha256"), vae_scale_factor=8)
    assert stale_reason(manifest, model, ExportConfig(), with_pipeline=True) is None
    retrained = SimpleNamespace(source_sha256="0" * 64, vae_scale_factor=8)
    assert "model changed" in stale_reason(manifest, retrained, ExportConfig(), with_pipeline=True)
    assert "prompts per call" in stale_reason(manifest, model, ExportConfig(max_batch=64), with_pipeline=True)
    assert "tuned for" in stale_reason(manifest, model, ExportConfig(height=8 * 1000), with_pipeline=True)
    before_img2img = dataclasses.replace(manifest, pipeline={k: v for k, v in manifest.pipeline.items()
                                                             if k != "vae_encoder_graph"})
    assert "no VAE encoder" in stale_reason(before_img2img, model, ExportConfig(), with_pipeline=True)
    unet_only = dataclasses.replace(manifest, pipeline=None)
    assert "no text encoder" in stale_reason(unet_only, model, ExportConfig(), with_pipeline=True)
    # The default export (per-half caches, deep branch 0) and the lean one are not interchangeable.
    assert "fidelity guidance 'cfg', not 'none'" in stale_reason(manifest, model, ExportConfig(fidelity_guidance="none"),
                                                                 with_pipeline=True)
    assert "deep branch is 0, not None" in stale_reason(manifest, model, ExportConfig(deep_branch=None),
                                                        with_pipeline=True)
    deep = dataclasses.replace(manifest, deep_branch={"branch": 1})
    assert "deep branch is 1, not 0" in stale_reason(deep, model, ExportConfig(), with_pipeline=True)
    lean = dataclasses.replace(manifest, deep_branch=None)
    assert "deep branch is None, not 0" in stale_reason(lean, model, ExportConfig(), with_pipeline=True)
