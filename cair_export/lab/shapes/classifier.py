"""A small CNN that names the attributes of a `shapes` image, to judge generated images.

One convolutional trunk, one linear head per attribute (shape, colour, background, size,
position). It is trained on generator images (`scripts/train_shapes.py`) and shipped as
the asset ``shapes_classifier`` (``cair_export.assets``: model.safetensors + config.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cair_export.assets import asset_path
from cair_export.lab.shapes import data
from cair_runtime.errors import InvalidInputError

# The classes of each head, in logit order.
HEADS: dict[str, tuple[str, ...]] = {
    "shape": data.SHAPES,
    "colour": tuple(data.COLOURS),
    "background": tuple(data.BACKGROUNDS),
    "size": data.SIZES,
    "position": data.POSITIONS,
}
DEFAULT_PATH = asset_path("shapes_classifier")


class ShapeClassifier(nn.Module):
    """CNN trunk (64 -> 8 px, then pooled to 4x4 so position survives) and one head per attribute."""

    def __init__(self, width: int = 16, heads: dict[str, tuple[str, ...]] = HEADS):
        super().__init__()
        self.width = width
        self.heads = dict(heads)

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())

        # Strided from the first layer: flat-colour shapes need no full-resolution features,
        # and the classifier must be cheap to train on 2 CPU cores.
        self.trunk = nn.Sequential(
            block(3, width, 2),  # 32x32
            block(width, 2 * width, 2),  # 16x16
            block(2 * width, 4 * width, 2),  # 8x8
            block(4 * width, 4 * width, 1),  # 8x8, wider receptive field
            nn.AdaptiveAvgPool2d(4),  # 4x4: coarse layout kept for the position head
            nn.Flatten(),
            nn.Linear(4 * width * 16, 128),
            nn.SiLU(),
        )
        self.logits = nn.ModuleDict({name: nn.Linear(128, len(classes)) for name, classes in heads.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (N, 3, 64, 64) in [-1, 1] -> {head: logits (N, classes)}."""
        features = self.trunk(images)
        return {name: layer(features) for name, layer in self.logits.items()}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the classifier's (and VAE's) input."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def labels_of(scenes: list[data.Scene], index: int = 0) -> dict[str, torch.Tensor]:
    """Class indices (N,) per head for object `index` of each scene (and the scene background)."""
    values = {
        "shape": [s.objects[index].shape for s in scenes],
        "colour": [s.objects[index].colour for s in scenes],
        "background": [s.background for s in scenes],
        "size": [s.objects[index].size for s in scenes],
        "position": [s.objects[index].position for s in scenes],
    }
    return {name: torch.tensor([HEADS[name].index(v) for v in values[name]]) for name in HEADS}


@torch.no_grad()
def classify(model: ShapeClassifier, images: np.ndarray, batch: int = 256) -> list[dict[str, str]]:
    """Attribute names for each uint8 image (N, 64, 64, 3), e.g. {"shape": "circle", ...}."""
    model.eval()
    out = []
    for start in range(0, len(images), batch):
        logits = model(to_tensor(images[start : start + batch]))
        picks = {name: value.argmax(dim=1).tolist() for name, value in logits.items()}
        for i in range(len(picks["shape"])):
            out.append({name: model.heads[name][picks[name][i]] for name in model.heads})
    return out


def save_classifier(model: ShapeClassifier, path: Path) -> None:
    """Write model.safetensors and config.json into folder `path`."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    config = {"architecture": "ShapeClassifier", "width": model.width, "heads": model.heads}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_classifier(path: Path | str = DEFAULT_PATH) -> ShapeClassifier:
    """The classifier saved in folder `path` (default: the shipped one), in eval mode."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"cannot read the classifier's config in {path}: {error}") from None
    heads = {name: tuple(classes) for name, classes in config["heads"].items()}
    model = ShapeClassifier(width=config["width"], heads=heads)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval()
