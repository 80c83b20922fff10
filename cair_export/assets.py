"""The data shipped inside the package, by name: the one place that knows where each lies.

Model loading (``core.models``) finds the shipped models here, the lab its classifier, the scripts
where to write what they train; nothing else spells a path into the package's assets folder. This
module imports nothing of the exporter, so every layer may read it.
"""

from __future__ import annotations

from pathlib import Path

# The files themselves: trained by scripts/train_shapes.py and scripts/train_shapes_lora.py.
ASSETS_DIR = Path(__file__).resolve().parent / "lab" / "assets"

# Text-to-image models ``load_model`` accepts by name (diffusers pipeline folders, safetensors).
SHIPPED_MODELS = ("shapes",)  # the project's own text-to-image model
# Every shipped asset: the models, and what measures or adapts them.
ASSETS = SHIPPED_MODELS + (
    "shapes_classifier",  # names the attributes in a `shapes` image (lab.shapes.classifier, the evaluation)
    "shapes_lora",  # a LoRA adapter for `shapes` (its safetensors file)
)


def asset_path(name: str) -> Path:
    """Folder of the shipped asset ``name`` (one of ``ASSETS``)."""
    if name not in ASSETS:
        raise KeyError(f"{name!r} is not a shipped asset; expected one of {', '.join(ASSETS)}")
    return ASSETS_DIR / name
