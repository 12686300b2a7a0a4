"""Encoded image bytes -> RGB pixels, decoded only as finely as a crop needs.

A JPEG (YCbCr or grey) goes through libjpeg-turbo (simplejpeg) straight into an array, at the
coarsest DCT scale 1/8, 1/4, 1/2 or 1 at which the crop's box still spans the output size
(`dct_factor`: far less work for a large photo); anything else (PNG, CMYK, a JPEG libjpeg warns
about) goes through PIL. `crop_resized` cuts and resizes a box in one resampling. The grain
transforms of data/pipeline.py and data/decoders.py, and data/images.py, are built on these.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def resample(name: str) -> Image.Resampling:
    """PIL's filter for a data.interpolation name; a ValueError naming the choices otherwise."""
    if name not in RESAMPLE:
        raise ValueError(f"Unknown interpolation {name!r}; expected one of {sorted(RESAMPLE)}.")
    return RESAMPLE[name]


def resize_box(
    image: np.ndarray | Image.Image, box: tuple[float, ...], size: int, interpolation: str
) -> np.ndarray:
    """Crops `box` (left, top, right, bottom) of a uint8 array or PIL image, resized to size x size
    in one step (the image itself when that is the identity)."""
    if isinstance(image, np.ndarray):
        if box == (0, 0, image.shape[1], image.shape[0]) and image.shape[:2] == (size, size):
            return image
        image = Image.fromarray(image)
    elif box == (0, 0, *image.size) and image.size == (size, size):
        return np.asarray(image)
    return np.asarray(image.resize((size, size), resample(interpolation), box=box))


def encoded_bytes(data: Any) -> bytes:
    """Encoded image bytes (some sources give a 0-d object/bytes array)."""
    return data.item() if isinstance(data, np.ndarray) else data


def open_image(data: Any) -> Image.Image:
    """An encoded image opened by PIL lazily: header read, not decoded."""
    return Image.open(io.BytesIO(encoded_bytes(data)))


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG that libjpeg decodes to RGB itself (YCbCr or grey), read from its
    header; None for anything else (PNG, CMYK, ...), which PIL decodes."""
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (width, height) if colorspace in ("YCbCr", "Gray") else None


def dct_factor(width: int, height: int, box: tuple[int, int, int, int], size: int) -> int:
    """The coarsest JPEG DCT scale 1/f (f in 8, 4, 2, 1) at which `box` still spans at least
    `size` pixels each way, so that the resize after the decode only shrinks (PIL's draft rule)."""
    left, top, right, bottom = box
    need_w = math.ceil(width * size / max(right - left, 1))
    need_h = math.ceil(height * size / max(bottom - top, 1))
    if need_w >= width or need_h >= height:
        return 1
    fits = min(width // need_w, height // need_h)
    return next(f for f in (8, 4, 2, 1) if fits >= f)


def decode_jpeg(data: bytes, size: tuple[int, int], factor: int) -> np.ndarray | None:
    """A YCbCr or grey JPEG of `size` (width, height) through simplejpeg at DCT scale 1/factor:
    libjpeg-turbo straight into an array, the very pixels of PIL's decode with less overhead; None
    when libjpeg warns about the data (PIL, more lenient, decodes it then)."""
    width, height = size
    try:
        return simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            min_width=-(-width // factor),
            min_height=-(-height // factor),
            min_factor=factor,
        )
    except ValueError:
        return None


def decode_pil(img: Image.Image, factor: int) -> Image.Image:
    """An opened image decoded by PIL as RGB, a JPEG at DCT scale 1/factor (PIL's draft)."""
    if factor > 1:
        img.draft("RGB", (img.width // factor, img.height // factor))
    img.load()  # A broken image fails here, not at the resize.
    return img if img.mode == "RGB" else img.convert("RGB")


def decode(data: bytes, factor: int = 1) -> np.ndarray | Image.Image:
    """Encoded `data` as RGB, a JPEG at DCT scale 1/factor (size rounded up): YCbCr and grey JPEGs
    through simplejpeg (decode_jpeg), anything else through PIL."""
    size = jpeg_size(data)
    rgb = None if size is None else decode_jpeg(data, size, factor)
    return rgb if rgb is not None else decode_pil(open_image(data), factor)


def is_decoded(image: Any) -> bool:
    """Whether a record's 'image' is already pixels (uint8 [H, W, 3]) rather than encoded bytes."""
    return isinstance(image, np.ndarray) and image.ndim == 3


def decoded_box(
    image: Any, crop_box: Callable[[int, int], tuple[int, int, int, int]], size: int
) -> tuple[np.ndarray | Image.Image, tuple[float, ...]]:
    """A decoded uint8 image, or encoded bytes decoded only as finely as the box
    `crop_box(height, width)` needs at size x size (dct_factor: far less work for a large photo),
    and that box in the decoded image's pixels."""
    if is_decoded(image):
        return image, crop_box(image.shape[0], image.shape[1])
    data = encoded_bytes(image)
    header = jpeg_size(data)
    img = open_image(data) if header is None else None  # header read once, whichever decodes
    width, height = header or img.size
    box = crop_box(height, width)
    factor = dct_factor(width, height, box, size)
    rgb = None if header is None else decode_jpeg(data, header, factor)
    if rgb is None:
        rgb = decode_pil(img or open_image(data), factor)
    decoded_width = rgb.shape[1] if isinstance(rgb, np.ndarray) else rgb.width
    if decoded_width != width:
        box = tuple(x * decoded_width / width for x in box)
    return rgb, box


def crop_resized(
    image: Any,
    crop_box: Callable[[int, int], tuple[int, int, int, int]],
    size: int,
    interpolation: str,
) -> np.ndarray:
    """The box `crop_box(height, width)` of a decoded uint8 image or of encoded bytes, resized to
    size x size (the same pixels as a full decode whenever the box spans less than twice the
    output)."""
    return resize_box(*decoded_box(image, crop_box, size), size, interpolation)
