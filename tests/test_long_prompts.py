"""Long prompts: windows of 75 tokens encoded on their own and concatenated (A1111's web UI, compel).

Oracles: the pipeline's own Hugging Face tokenizers and torch text encoders (``chunked_prompt_embeds``,
itself checked against diffusers' ``encode_prompt`` for one window), and diffusers' pipelines fed
those embeddings, which take any text length.
"""

import json
import warnings

import numpy as np
import pytest
import torch

from cair_export.core.models import load_model
from cair_export.core.reference import chunked_prompt_embeds, encode_prompts
from cair_runtime.cli import main as cair_run
from cair_runtime.errors import InvalidInputError
from cair_runtime.text2image import CairText2Image, PromptTruncatedWarning

WORDS = "red green blue circle square triangle large small left right of on a the background white".split()


def long_prompt(tokens: int, seed: int = 0) -> str:
    """A prompt of ``tokens`` tokens from the tiny vocabulary (one token per word)."""
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, tokens))


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("preset", ["tiny-sd21", "tiny-sdxl"])
def test_one_window_is_diffusers_encode_prompt(preset):
    """The torch definition of the convention, at one window, is what diffusers computes."""
    pipe = load_model(preset, with_pipeline=True).diffusers_pipeline()
    prompts = ["a large red circle", long_prompt(90)]  # the second is truncated by both
    ours, pooled = chunked_prompt_embeds(pipe, prompts, 1)
    theirs = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, **(
        {} if preset == "tiny-sdxl" else {"device": "cpu", "num_images_per_prompt": 1}))
    torch.testing.assert_close(ours, theirs[0], rtol=0, atol=1e-6)
    if preset == "tiny-sdxl":
        torch.testing.assert_close(pooled, theirs[2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny-sd21", "tiny-sdxl"])
def test_runtime_windows_equal_the_convention_in_torch(exported, preset):
    runtime = CairText2Image(exported(preset, with_pipeline=True))
    pipe = load_model(preset, with_pipeline=True).diffusers_pipeline()
    prompts = [long_prompt(200, seed=1), "a small blue square", ""]
    assert runtime.prompt_chunks(prompts) == 3  # 200 tokens: three windows of 75
    embeds, pooled = runtime.encode_prompt(prompts, 3)
    expected, expected_pooled = chunked_prompt_embeds(pipe, prompts, 3)
    assert embeds.shape == tuple(expected.shape) == (3, 3 * 77, expected.shape[-1])
    assert relative(embeds, expected) <= 1e-5
    if preset == "tiny-sdxl":  # the pooled embedding: the first window's
        assert relative(pooled, expected_pooled) <= 1e-5
    # The ids themselves, from the Hugging Face tokenizer: BOS, 75 tokens, EOS per window.
    ids = runtime.text_encoders[0][1](prompts[:1], 3)
    body = pipe.tokenizer(prompts[0], add_special_tokens=False).input_ids
    assert len(body) == 200 and ids.shape == (3, 77)
    for chunk in range(3):
        part = body[75 * chunk:75 * (chunk + 1)]
        assert ids[chunk, 0] == pipe.tokenizer.bos_token_id and ids[chunk, len(part) + 1] == pipe.tokenizer.eos_token_id
        assert list(ids[chunk, 1:len(part) + 1]) == part
        assert set(ids[chunk, len(part) + 2:]) <= {pipe.tokenizer.pad_token_id}


@pytest.mark.parametrize("preset", ["tiny-sd21", "tiny-sdxl"])
def test_long_prompt_end_to_end_equals_diffusers_and_the_reference(exported, preset):
    """A 200-token prompt: at n = T the runtime's latents are diffusers' pipeline fed the same windows'
    embeddings; at n < T its images are the torch reference CAIR's."""
    from cair_export.core.reference import cair_text_to_image

    folder = exported(preset, with_pipeline=True)
    runtime = CairText2Image(folder)
    model = load_model(preset, with_pipeline=True)
    pipe = model.diffusers_pipeline()
    prompt, negative = long_prompt(200, seed=2), "blurry"
    shape = (1, runtime.engine.in_channels, *runtime.engine.latent_size(None, None))
    noise = torch.from_numpy(np.random.default_rng(4).standard_normal(shape, dtype=np.float32))

    result = runtime(prompt, negative, num_inference_steps=5, cache_step=5, guidance_scale=5.0, seed=4,
                     scheduler="ddim")
    assert result.parameters[0]["prompt_chunks"] == 3
    embeds, negative_embeds, added, negative_added = encode_prompts(pipe, [prompt], [negative], noise, prompt_chunks=3)
    extra = {} if added is None else {"pooled_prompt_embeds": added["text_embeds"],
                                      "negative_pooled_prompt_embeds": negative_added["text_embeds"]}
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    expected = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, latents=noise.clone(),
                    num_inference_steps=5, guidance_scale=5.0, output_type="latent", **extra).images
    assert relative(result.latents, expected) <= 1e-4

    cached = runtime(prompt, negative, num_inference_steps=5, cache_step=2, guidance_scale=5.0, seed=4)
    reference = cair_text_to_image(model.diffusers_pipeline(), [prompt], [negative], noise, num_inference_steps=5,
                                   cache_step=2, guidance_scale=5.0, prompt_chunks=3).numpy()
    assert np.abs(cached.decoded - reference).max() <= 1e-3


def test_prompts_share_the_windows_of_the_longest_text(exported):
    """A call's prompts and negative prompts are padded to one window count (the UNet takes one text
    length per batch); each image records it, and replaying that count alone gives the same image."""
    runtime = CairText2Image(exported("tiny-sd21", with_pipeline=True))
    short, longer = "a red circle", long_prompt(100, seed=3)
    batch = runtime([short, longer], num_inference_steps=3, cache_step=1, seed=6)
    assert [p["prompt_chunks"] for p in batch.parameters] == [2, 2]
    alone = runtime(short, num_inference_steps=3, cache_step=1, seed=6)
    assert alone.parameters[0]["prompt_chunks"] == 1
    padded = runtime(short, num_inference_steps=3, cache_step=1, seed=6, prompt_chunks=2)
    np.testing.assert_allclose(padded.decoded[0], batch.decoded[0], atol=1e-5)
    assert np.abs(alone.decoded[0] - batch.decoded[0]).max() > 1e-3  # an empty window is not nothing
    negative_longer = runtime(short, longer, num_inference_steps=3, cache_step=1, seed=6)
    assert negative_longer.parameters[0]["prompt_chunks"] == 2  # the negative prompt counts too


def test_truncation_stays_available(exported, tmp_path, capsys, one_line_error):
    folder = exported("tiny-sd21", with_pipeline=True)
    runtime = CairText2Image(folder)
    assert runtime.max_prompt_chunks == 4  # the export's default: 300 tokens
    prompt = long_prompt(120, seed=5)
    with pytest.warns(PromptTruncatedWarning, match="truncated"):
        one = runtime(prompt, num_inference_steps=2, cache_step=1, prompt_chunks=1)
    pipe = load_model("tiny-sd21", with_pipeline=True).diffusers_pipeline()
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    with pytest.warns(PromptTruncatedWarning):
        assert list(runtime.text_encoders[0][1]([prompt], 1)[0]) == ids  # one window: diffusers' truncation
    assert one.parameters[0]["prompt_chunks"] == 1
    too_long = long_prompt(400, seed=6)
    with pytest.warns(PromptTruncatedWarning, match="4 window"):  # beyond the folder's windows: truncated
        runtime(too_long, num_inference_steps=2, cache_step=1)
    with pytest.raises(InvalidInputError, match="from 1 to 4"):
        runtime(prompt, num_inference_steps=2, cache_step=1, prompt_chunks=5)
    code = cair_run([str(folder), prompt, "-o", str(tmp_path / "a.png"), "--prompt-chunks", "0"])
    one_line_error(code, capsys.readouterr().err, "prompt chunks 0", "from 1 to 4")
    assert not (tmp_path / "a.png").exists()


def test_an_export_of_one_window_truncates(exported):
    runtime = CairText2Image(exported("tiny-sd21", with_pipeline=True, max_prompt_chunks=1, validate=False))
    assert runtime.engine.text_lengths == (77, 77) and runtime.max_prompt_chunks == 1
    with pytest.warns(PromptTruncatedWarning):
        result = runtime(long_prompt(100), num_inference_steps=2, cache_step=1)
    assert result.parameters[0]["prompt_chunks"] == 1
    with pytest.raises(InvalidInputError, match="at most 1"):
        runtime.check_prompt_length(long_prompt(100))
    # UNet-only callers get the same limit, as a shape error naming it.
    with pytest.raises(Exception, match="text_len 77"):
        runtime.engine.denoise(np.zeros((1, 154, 1024), np.float32), num_inference_steps=2, cache_step=1)


def test_export_records_the_text_axis(exported):
    manifest = json.loads((exported("tiny-sd21", with_pipeline=True) / "manifest.json").read_text())
    text = next(dim for dim in manifest["dims"] if dim["name"] == "text_len")
    assert (text["min"], text["opt"], text["max"]) == (77, 77, 4 * 77)


def test_server_takes_long_prompts_up_to_the_engine_windows(exported):
    from cair_runtime.serve.api import ApiError, RequestValidator

    validator = RequestValidator(CairText2Image(exported("tiny-sd21", with_pipeline=True)), max_images=4,
                                 max_steps=50)

    def check(**fields):
        return validator.parse(json.dumps(fields).encode())

    request = check(prompt=long_prompt(200))
    assert request.prompt_chunks == 3 and request.parameters()["prompt_chunks"] == 3
    assert check(prompt="a red circle").prompt_chunks == 1
    assert check(prompt="a red circle", negative_prompt=long_prompt(80)).prompt_chunks == 2
    # Windows are part of the batch key: a short prompt is never padded by a long neighbour.
    assert check(prompt="a", seed=1).batch_key != check(prompt="a", negative_prompt=long_prompt(80), seed=1).batch_key
    with pytest.raises(ApiError, match="at most 4"):
        check(prompt=long_prompt(400))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert check(prompt=long_prompt(400), prompt_chunks=1).prompt_chunks == 1  # truncation, as asked
    with pytest.raises(ApiError, match="prompt_chunks"):
        check(prompt="a", prompt_chunks=9)
