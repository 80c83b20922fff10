"""Where models come from: built-in presets and local diffusers folders."""

from cair_export.core.models.loading import LoadedModel, load_model
from cair_export.core.models.presets import PRESETS

__all__ = ["PRESETS", "LoadedModel", "load_model"]
