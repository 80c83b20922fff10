"""The embedded `shapes` model: its data generator, tokenizer, pipeline folder and classifier."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from cair_export.assets import ASSETS_DIR, asset_path
from cair_export.lab.shapes import classifier as shape_classifier
from cair_export.lab.shapes import data

PIPELINE = asset_path("shapes")
MAX_ASSET_BYTES = 20 * 1024 * 1024


# --- generator ------------------------------------------------------------------------------


def test_generator_is_deterministic_per_seed():
    images_a, captions_a, _ = data.generate(16, seed=7, caption_drop=0.2)
    images_b, captions_b, _ = data.generate(16, seed=7, caption_drop=0.2)
    images_c, captions_c, _ = data.generate(16, seed=8, caption_drop=0.2)
    assert images_a.shape == (16, data.IMAGE_SIZE, data.IMAGE_SIZE, 3) and images_a.dtype == np.uint8
    assert np.array_equal(images_a, images_b) and captions_a == captions_b
    assert not np.array_equal(images_a, images_c)


def _object_mask(image: np.ndarray, colour: str) -> np.ndarray:
    """Pixels within a few levels of the object's colour (antialiased edges excluded)."""
    return np.abs(image.astype(int) - np.array(data.COLOURS[colour])).max(axis=-1) < 8


def test_single_object_captions_match_the_drawing():
    images, captions, scenes = data.generate(60, seed=3, pair_fraction=0.0)
    half = data.IMAGE_SIZE / 2
    for image, text, scene in zip(images, captions, scenes):
        (obj,) = scene.objects
        assert text == data.caption(scene)
        assert f"a {obj.size} {obj.colour} {obj.shape}" in text and f"on a {scene.background} background" in text
        assert data.POSITION_PHRASES[obj.position] in text
        assert tuple(image[0, 0]) == data.BACKGROUNDS[scene.background]  # corners are background
        mask = _object_mask(image, obj.colour)
        ys, xs = np.nonzero(mask)
        # Size: a small object covers well under, a large one well over, 250 pixels.
        assert (mask.sum() > 250) == (obj.size == "large"), (text, mask.sum())
        # Position: the object's centroid lies on the named side.
        cx, cy = xs.mean() - half, ys.mean() - half
        expected = {"left": cx < -8, "right": cx > 8, "top": cy < -8, "bottom": cy > 8, "center": max(abs(cx), abs(cy)) < 4}
        assert expected[obj.position], (text, cx, cy)


def test_pair_captions_match_the_drawing():
    images, captions, scenes = data.generate(30, seed=4, pair_fraction=1.0)
    for image, text, scene in zip(images, captions, scenes):
        first, second = scene.objects
        assert text.startswith(f"a {first.size} {first.colour} {first.shape} {scene.relation} a {second.size}")
        y1, x1 = np.nonzero(_object_mask(image, first.colour))
        y2, x2 = np.nonzero(_object_mask(image, second.colour))
        order = {
            "left of": x1.mean() < x2.mean(),
            "right of": x1.mean() > x2.mean(),
            "above": y1.mean() < y2.mean(),
            "below": y1.mean() > y2.mean(),
        }
        assert order[scene.relation], text


def test_held_out_prompts_are_never_drawn_for_training():
    held_out = set(data.held_out_scenes())
    assert len(held_out) >= 100
    _, _, scenes = data.generate(2000, seed=5, pair_fraction=0.0)
    assert not held_out & set(scenes)


# --- shipped pipeline -----------------------------------------------------------------------


def test_assets_are_small_and_safetensors():
    files = [p for p in ASSETS_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_ASSET_BYTES
    weights = [p for p in files if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights


def test_tokenizer_json_agrees_with_clip_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    # CLIPTokenizer built from vocab.json + merges.txt only, not from tokenizer.json.
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(PIPELINE / "tokenizer" / name, tmp_path / name)
    clip = CLIPTokenizer.from_pretrained(tmp_path)
    fast = Tokenizer.from_file(str(PIPELINE / "tokenizer" / "tokenizer.json"))
    _, captions, _ = data.generate(50, seed=6, caption_drop=0.3)
    texts = captions + ["", "A  Zebra jumps over 42 lazy dogs!", "déjà vu, naïve café", "red-green?blue"]
    for text in texts:
        assert fast.encode(text).ids == clip(text).input_ids, text
    for word in data.caption_vocabulary():  # every caption word is a single token
        assert len(clip(word, add_special_tokens=False).input_ids) == 1, word
    assert clip.model_max_length == 32


def test_pipeline_loads_offline_and_generates():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(PIPELINE, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.max_position_embeddings == pipe.tokenizer.model_max_length
    image = pipe(
        "a large red circle in the center on a white background",
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


# --- shipped classifier ---------------------------------------------------------------------


def test_classifier_recognises_generator_images():
    model = shape_classifier.load_classifier()
    images, _, scenes = data.generate(300, seed=12345, pair_fraction=0.0)
    predicted = shape_classifier.classify(model, images)
    for name in shape_classifier.HEADS:
        truth = [s.background if name == "background" else getattr(s.objects[0], name) for s in scenes]
        accuracy = np.mean([p[name] == t for p, t in zip(predicted, truth)])
        assert accuracy > 0.95, (name, accuracy)


@pytest.mark.parametrize("index", [0, 1])
def test_classifier_reads_each_object_of_a_pair(index):
    model = shape_classifier.load_classifier()
    images, _, scenes = data.generate(100, seed=54321, pair_fraction=1.0)
    views = np.stack([data.single_object_view(im, s, index) for im, s in zip(images, scenes)])
    predicted = shape_classifier.classify(model, views)
    hits = [p["shape"] == s.objects[index].shape and p["colour"] == s.objects[index].colour for p, s in zip(predicted, scenes)]
    assert np.mean(hits) > 0.95


def test_tiny_presets_tokenise_with_the_caption_words():
    from cair_export.core.models.presets import TINY_WORDS

    assert list(TINY_WORDS) == data.caption_vocabulary()
