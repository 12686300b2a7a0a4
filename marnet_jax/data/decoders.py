"""Where a training crop is decoded and resized: one strategy per value of data.decoder.

Every strategy cuts the box that the crop transform (pipeline.RandomResizedCrop or
ResizeCentreCrop) draws, from the same random stream, so a seed and position give the same crop
whichever decodes it; they differ in what the host ships and what is left for the devices:

- 'cpu': the host decodes and resizes (the crop transform itself) and ships 'image' uint8
  [B, S, S, 3].
- 'cpu_decode': the host decodes the box but does not resize it (CanvasCrop) and ships 'image'
  uint8 canvases [B, C, C, 3], 'box' float32 [B, 4] and 'extent' int32 [B, 2]; the train step
  resizes them on the accelerator (photometric.resize_crops).
- 'dali': the host draws the box only (CropBox) and ships 'encoded' (B byte arrays) and 'crop'
  int32 [B, 4]; dali.GpuCrops decodes and resizes them on each GPU before the step.

A `Decoder` owns these: the pipeline asks it for the host transform, the batch keys and checks,
the trainer for the device-side decode and the keys it moves, the train step for the finish
(`crops`), preflight for the shapes. Nothing else tests a batch's keys for the decoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import chex
import grain
import jax
import ml_collections
import numpy as np

from marnet_jax.data import dali, decoding, photometric
from marnet_jax.data.config import train_image_size

Example = dict[str, Any]
Shapes = dict[str, tuple[tuple[int, ...], Any]]
# The rest of a training batch, whichever the decoder: the host's draws (when drawn) and labels.
OTHER_TRAIN_KEYS = ("jitter", "flip", "label", "ingredients")


def canvas_size(image_size: int) -> int:
    """Side of the canvas in which data.decoder 'cpu_decode' ships a training crop's decoded box:
    the DCT scale (decoding.dct_factor) leaves the box's shorter side under twice the output, and
    the margin holds the resampling filter's reach."""
    return 2 * image_size + 16


def _canvas(
    rgb: Any, box: tuple[float, ...], size: int, interpolation: str, canvas: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels that resizing `box` of `rgb` (uint8 array or PIL image) to size x size reads
    (the box and the filter's reach around it) in the top-left corner of a zero canvas x canvas
    uint8 array, the box in canvas pixels (float32 [4]) and the extent of the copied pixels (int32
    [height, width]), for photometric.resize_crops. A box whose reach does not fit (the longer
    side of a wide or tall crop, now and then) is resized here and shipped with the identity box."""
    width, height = rgb.size if not isinstance(rgb, np.ndarray) else (rgb.shape[1], rgb.shape[0])
    left, top, right, bottom = box
    support = photometric.filter_support(interpolation)
    reach = [
        support * max((hi - lo) / size, 1.0) + 1.0 for lo, hi in ((left, right), (top, bottom))
    ]
    x0, y0 = max(math.floor(left - reach[0]), 0), max(math.floor(top - reach[1]), 0)
    x1, y1 = min(math.ceil(right + reach[0]), width), min(math.ceil(bottom + reach[1]), height)
    out = np.zeros((canvas, canvas, 3), np.uint8)
    if x1 - x0 > canvas or y1 - y0 > canvas:
        out[:size, :size] = decoding.resize_box(rgb, box, size, interpolation)
        x0, y0, x1, y1, box = 0, 0, size, size, (0, 0, size, size)
    else:
        out[: y1 - y0, : x1 - x0] = np.asarray(rgb)[y0:y1, x0:x1]
    shifted = np.asarray([box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0], np.float32)
    return out, shifted, np.asarray([y1 - y0, x1 - x0], np.int32)


class CanvasCrop(grain.transforms.RandomMap):
    """The box that `crop` (pipeline.RandomResizedCrop or ResizeCentreCrop) would cut, drawn from
    the same random stream and decoded as it would decode it, but not resized: for data.decoder
    'cpu_decode', whose train step resizes on the accelerator (photometric.resize_crops). 'image'
    becomes a uint8 [C, C, 3] canvas (C = canvas_size(S)) holding the box's pixels (_canvas),
    'box' float32 [4] the box in it and 'extent' int32 [2] the height and width of its pixels."""

    def __init__(self, crop: Any):
        photometric.filter_support(crop.interpolation)  # an unsupported filter fails here
        self.crop = crop
        self.canvas = canvas_size(crop.size)

    def random_map(self, element: Example, rng: np.random.Generator) -> Example:
        size, interpolation = self.crop.size, self.crop.interpolation
        rgb, box = decoding.decoded_box(element["image"], self.crop.box_drawer(rng), size)
        image, box, extent = _canvas(rgb, box, size, interpolation, self.canvas)
        return {**element, "image": image, "box": box, "extent": extent}


class CropBox(grain.transforms.RandomMap):
    """The box that `crop` (pipeline.RandomResizedCrop or ResizeCentreCrop) would cut, drawn from
    the same random stream but without decoding, for a decoder that crops itself (DALI): adds
    'crop' int32 [left, top, right, bottom] in the encoded image's pixels and moves the bytes, as a
    uint8 array, from 'image' to 'encoded'."""

    def __init__(self, crop: Any):
        self.crop = crop

    def random_map(self, element: Example, rng: np.random.Generator) -> Example:
        image = element["image"]
        if decoding.is_decoded(image):
            raise ValueError(
                "data.decoder='dali' needs encoded images (PNG/JPEG bytes); this source gives "
                f"decoded arrays of shape {image.shape}: use data.decoder='cpu'."
            )
        data = decoding.encoded_bytes(image)
        width, height = decoding.jpeg_size(data) or decoding.open_image(data).size
        box = self.crop.box_drawer(rng)(height, width)
        out = {k: v for k, v in element.items() if k != "image"}
        return {**out, "encoded": np.frombuffer(data, np.uint8), "crop": np.asarray(box, np.int32)}


def _batch_encoded(examples: list[Example]) -> Example:
    """A batch of CropBox examples: 'encoded' as the list of their byte arrays (they differ in
    length), everything else stacked."""
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "encoded"}
    return {**batch, "encoded": [e["encoded"] for e in examples]}


class Decoder:
    """data.decoder 'cpu': the host decodes and resizes each crop (the crop transform itself), and
    ships uint8 [B, S, S, 3] crops. The base of the other strategies."""

    name: ClassVar[str] = "cpu"
    host_keys: ClassVar[tuple[str, ...]] = ("image",)  # the image part of a host example / batch

    def host_transform(self, crop: Any) -> Any:
        """The grain transform that takes the crop transform's place in the training list."""
        return crop

    def batch_fn(self) -> Callable[[list[Example]], Example] | None:
        """grain's batch_fn for the host examples (None: stack every key)."""
        return None

    def image_shapes(self, batch: int, image_size: int) -> Shapes:
        """{key: (shape, dtype)} of the image part of a training batch as the train step takes it."""
        return {"image": ((batch, image_size, image_size, 3), np.uint8)}

    def train_keys(self) -> tuple[str, ...]:
        """The keys of a training batch that go to the devices (each when the pipeline drew it)."""
        return (*self.image_shapes(1, 1), *OTHER_TRAIN_KEYS)

    def check(self, batch: Example, batch_size: int, image_size: int) -> None:
        """Asserts the shapes and dtypes of a host batch's image part."""
        shapes = self.image_shapes(batch_size, image_size)
        chex.assert_shape([batch[k] for k in shapes], [s for s, _ in shapes.values()])
        chex.assert_type([batch[k] for k in shapes], [d for _, d in shapes.values()])

    def on_devices(
        self,
        batches: Iterator[Example],
        batch_sharding: jax.sharding.Sharding,
        data_cfg: ml_collections.ConfigDict,
    ) -> Iterator[Example]:
        """The host batches with whatever decoding happens on the devices before the step done."""
        return batches

    def crops(self, batch: dict[str, jax.Array], data_cfg: ml_collections.ConfigDict) -> jax.Array:
        """In the train step: the batch's crops [B, S, S, 3] (uint8 levels) for
        photometric.train_images."""
        chex.assert_type(batch["image"], np.uint8)
        return batch["image"]


class CpuDecode(Decoder):
    """data.decoder 'cpu_decode': the host decodes each crop's box but does not resize it
    (CanvasCrop); the train step resizes the canvases on the accelerator."""

    name = "cpu_decode"
    host_keys = ("image", "box", "extent")

    def host_transform(self, crop: Any) -> Any:
        return CanvasCrop(crop)

    def image_shapes(self, batch: int, image_size: int) -> Shapes:
        canvas = canvas_size(image_size)
        return {
            "image": ((batch, canvas, canvas, 3), np.uint8),
            "box": ((batch, 4), np.float32),
            "extent": ((batch, 2), np.int32),
        }

    def crops(self, batch: dict[str, jax.Array], data_cfg: ml_collections.ConfigDict) -> jax.Array:
        chex.assert_type(batch["image"], np.uint8)
        size, interpolation = train_image_size(data_cfg), data_cfg.interpolation
        return photometric.resize_crops(
            batch["image"], batch["box"], batch["extent"], size, interpolation
        )


class Dali(Decoder):
    """data.decoder 'dali': the host only draws each crop's box (CropBox) and ships the encoded
    bytes; dali.GpuCrops decodes and resizes them on each GPU before the step, which then takes
    uint8 [B, S, S, 3] crops as with 'cpu'."""

    name = "dali"
    host_keys = ("encoded", "crop")

    def host_transform(self, crop: Any) -> Any:
        return CropBox(crop)

    def batch_fn(self) -> Callable[[list[Example]], Example]:
        return _batch_encoded

    def check(self, batch: Example, batch_size: int, image_size: int) -> None:
        chex.assert_equal(len(batch["encoded"]), batch_size)
        chex.assert_shape(batch["crop"], (batch_size, 4))
        chex.assert_type(batch["crop"], np.int32)

    def on_devices(
        self,
        batches: Iterator[Example],
        batch_sharding: jax.sharding.Sharding,
        data_cfg: ml_collections.ConfigDict,
    ) -> Iterator[Example]:
        return dali.GpuCrops(batches, batch_sharding, data_cfg)


DECODERS: dict[str, Decoder] = {d.name: d for d in (Decoder(), CpuDecode(), Dali())}


def for_config(data_cfg: ml_collections.ConfigDict) -> Decoder:
    """The strategy that data.decoder names."""
    name = data_cfg.decoder
    if name not in DECODERS:
        raise ValueError(f"Unknown data.decoder {name!r}; expected one of {list(DECODERS)}.")
    return DECODERS[name]
