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
