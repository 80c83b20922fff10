"""Init images for image to image: read a file or take an array, as (H, W, 3) uint8 RGB, or refuse.

RGB is taken as it is. Grayscale (PIL mode ``L``, or an (H, W) / (H, W, 1) array) is converted to
RGB by repeating its channel: nothing is lost or invented. Every other mode is refused with its
name: RGBA and LA need a background chosen for their transparency, palette and 16-bit images a
conversion the caller should see (diffusers' pipelines would pass such images on unconverted
and fail later, or not at all).

A file's EXIF orientation is applied as Pillow's ``ImageOps.exif_transpose`` does (as diffusers'
``load_image``): a portrait photo stored sideways is read upright. Its size is checked from the
header before anything is decoded. Parameters name a file by its name only: an absolute path of
the user's machine does not travel in a published image.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cair_runtime.errors import InvalidInputError

MAX_IMAGE_SIDE = 8192  # px; read from the header and refused before decoding (no engine here takes more)
_FIX = ("convert it to 8-bit RGB first (e.g. PIL's image.convert('RGB'), over a background of your choice for "
        "transparency)")


def _refuse(message: str) -> InvalidInputError:
    return InvalidInputError(message, field="image")


def load_image(image: Any, size: tuple[int, int] | None = None) -> tuple[np.ndarray, str]:
    """``image`` as (H, W, 3) uint8 RGB, and how to name it in parameters: a path or a binary file object
    (``open(path, "rb")``, an ``io.BytesIO`` with a ``name``) by its file name, an (H, W, 3) uint8 array as "array".

    ``size``: the (height, width) the image must have; a file's is checked from its header before
    anything is decoded, then again once read (EXIF orientation may turn it).
    """
    if isinstance(image, np.ndarray):
        pixels, label, name = _from_array(image), "array", "array"
    elif isinstance(image, (str, Path)):
        label, name = str(image), Path(image).name
        pixels = _from_file(Path(image), label, size)
    elif isinstance(image, io.TextIOBase):
        raise _refuse(f"image file {getattr(image, 'name', '')} is open as text; open it in binary mode ('rb')")
    elif hasattr(image, "read"):
        label = str(getattr(image, "name", "file"))
        pixels, name = _from_file(image, label, size), Path(label).name
    else:
        raise _refuse("image must be a file path, a binary file object or an (H, W, 3) uint8 numpy array, got "
                      f"{type(image).__name__}")
    if size is not None and pixels.shape[:2] != tuple(size):
        raise _size_error(label, pixels.shape[1], pixels.shape[0], size)
    return pixels, name


def _size_error(label: str, width: int, height: int, size: tuple[int, int]) -> InvalidInputError:
    return _refuse(f"image {label} is {width}x{height} px; expected {size[1]}x{size[0]}: resize it")


def _from_file(source: Path | BinaryIO, label: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A file read as (H, W, 3) uint8 RGB; ``label`` names it in errors."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # Pillow's decompression-bomb warning: the size is checked here instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source)
        with opened:
            width, height = opened.size  # from the header: nothing decoded yet
            if max(width, height) > MAX_IMAGE_SIDE:
                raise _refuse(f"image {label} is {width}x{height} px; images are read up to {MAX_IMAGE_SIDE} px "
                              "a side: resize it")
            # Either way round here: a PNG's EXIF orientation may follow its pixels (load_image checks the result).
            if size is not None and sorted((height, width)) != sorted(size):
                raise _size_error(label, width, height, size)
            opened.load()  # decode now: a truncated or corrupt file fails here, not later
            opened = ImageOps.exif_transpose(opened)  # upright, as diffusers' load_image
            mode, shape = opened.mode, opened.size
            if mode == "L":
                return np.array(opened.convert("RGB"))
            if mode != "RGB":
                raise _refuse(f"image {label} is {shape[0]}x{shape[1]} in mode {mode}; the VAE takes RGB: {_FIX}")
            return np.array(opened)
    except UnidentifiedImageError:
        raise _refuse(f"{label} is not an image file Pillow can read (PNG, JPEG, ...)") from None
    except Image.DecompressionBombError as error:
        raise _refuse(f"image {label} is too large to read safely ({error})") from None
    except ValueError as error:  # Pillow's limit on text and colour-profile chunks (1 MB), and the like
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise _refuse(f"cannot read image {label}: {reason} (a text or colour-profile chunk over Pillow's limit); "
                      "save it again without its metadata") from None
    except OSError as error:  # missing, a folder, unreadable, truncated
        reason = error.strerror or (str(error).splitlines() or [type(error).__name__])[0]
        raise _refuse(f"cannot read image {label}: {reason}") from None


def _from_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise _refuse(f"image array has dtype {array.dtype}; expected uint8 RGB (H, W, 3) in 0..255")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1):  # grayscale: repeat the channel
        return np.repeat(array.reshape(array.shape[0], array.shape[1], 1), 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        what = {4: " (RGBA?)", 2: " (grayscale with alpha?)"}.get(array.shape[-1], "") if array.ndim == 3 else ""
        raise _refuse(f"image array has shape {array.shape}{what}; expected (H, W, 3) RGB: {_FIX}")
    return np.ascontiguousarray(array)


def clip_pixels(image: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """An (H, W, 3) uint8 RGB image as a CLIP vision encoder takes it, (3, h, w) float32: the shortest edge
    resized (bicubic) to ``spec["shortest_edge"]``, centre-cropped to ``spec["crop_size"]``, scaled to [0, 1]
    and normalised by ``image_mean``/``image_std`` (transformers' ``CLIPImageProcessor``, Pillow backend)."""
    from PIL import Image

    height, width = image.shape[:2]
    edge = spec["shortest_edge"]
    short, long = sorted((height, width))
    resized = (edge, int(edge * long / short)) if height <= width else (int(edge * long / short), edge)
    pixels = np.asarray(Image.fromarray(image).resize((resized[1], resized[0]), Image.Resampling.BICUBIC))
    crop_height, crop_width = spec["crop_size"]
    if crop_height > resized[0] or crop_width > resized[1]:
        raise InvalidInputError(f"the image encoder's crop {crop_width}x{crop_height} is larger than its resize to "
                                f"{resized[1]}x{resized[0]}; the export's image_processor is inconsistent")
    top, left = (resized[0] - crop_height) // 2, (resized[1] - crop_width) // 2
    pixels = pixels[top:top + crop_height, left:left + crop_width].astype(np.float32) / np.float32(255)
    mean, std = (np.asarray(spec[key], dtype=np.float32) for key in ("image_mean", "image_std"))
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))
