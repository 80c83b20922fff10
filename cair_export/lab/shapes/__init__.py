"""`shapes`: the project's embedded text-to-image model, trained here from scratch.

- `data`: seeded procedural images of coloured shapes with captions (training and held-out sets).
- the tokenizer: `cair_export.core.models.tokenizer` learnt from `data.caption_vocabulary()`.
- `classifier`: the CNN that names shape, colour, background, size and position of an image,
  used to measure prompt following (`scripts/eval_shapes_quality.py`).

The trained StableDiffusionPipeline folder ships as the asset `shapes` and the classifier as
`shapes_classifier` (`cair_export.assets` knows where they lie); `scripts/train_shapes.py` rebuilds both.
"""
