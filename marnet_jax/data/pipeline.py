"""grain input pipeline: decode, augment, normalise, shard and batch (no TensorFlow).

Training (`train_iterator`): an infinite stream. Each epoch is a global permutation of the split
(same seed on every process, reshuffled every epoch); shard i of n takes every n-th element of it,
after dropping the last `len % n`, so within an epoch the shards are disjoint and together cover
the split. Augmentation draws from grain's per-element generator (Philox keyed by a seed derived
from (seed, shard, transform), counter = position in the stream), so the batch sequence is a pure
function of (data, config, seed, shard): it does not depend on `worker_count` or `read_threads`,
and `get_state()` / `set_state()` resume it exactly.

Evaluation (`eval_batches`): one ordered pass over a contiguous slice of the split per shard,
padded with masked copies of a real example so that every shard yields as many full batches.

Element flow (dicts): source {'image': encoded bytes, 'label', 'ingredients', 'image_path'}
  -> train: RandomResizedCrop (decodes as it crops), ColorJitter (draws the factors),
     RandomFlip (draws the flip), TrainFeatures -> batch:
     {'image' uint8 [B, S, S, 3], 'jitter' float32 [B, 3] (with colour jitter on), 'flip' bool [B]
     (with flips on), 'label' int32, 'ingredients' float32 [B, V]}. The train step flips, applies
     the jitter and normalises on the accelerator (marnet_jax/data/photometric.py): the host ships
     uint8 crops.
  -> train with data.decoder 'dali': CropBox draws the same boxes without decoding, then the same
     draws and TrainFeatures -> batch with 'encoded' (a list of B uint8 byte arrays) and 'crop'
     int32 [B, 4] in place of 'image'; marnet_jax/data/dali.py decodes and crops on the GPU.
  -> train with data.decoder 'cpu_decode': CanvasCrop decodes the same boxes but does not resize
     them: 'image' uint8 canvases [B, C, C, 3], 'box' float32 [B, 4], 'extent' int32 [B, 2];
     the train step resizes them (photometric.resize_crops), then flips, jitters, normalises.
  -> eval: ResizeCentreCrop (decodes as it crops), then the caller's `extra_transforms`,
     EvalFeatures -> batch:
     {'image' uint8 [B, S, S, 3], 'label', 'ingredients', 'mask' float32 [B]}; the eval step
     normalises (photometric.eval_images).
All transforms are module-level classes so grain can pickle them into worker processes.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import chex
import grain
import jax
import ml_collections
import numpy as np
import simplejpeg
from PIL import Image

from marnet_jax.data import datasets, photometric

Example = dict[str, Any]

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _resample(name: str) -> Image.Resampling:
    if name not in _RESAMPLE:
        raise ValueError(f"Unknown interpolation {name!r}; expected one of {sorted(_RESAMPLE)}.")
    return _RESAMPLE[name]


def _resize_box(
    image: np.ndarray | Image.Image, box: tuple[float, ...], size: int, resample: str
) -> np.ndarray:
    """Crops `box` (left, top, right, bottom) of a uint8 array or PIL image, resized to size x size
    in one step (the image itself when that is the identity)."""
    if isinstance(image, np.ndarray):
        if box == (0, 0, image.shape[1], image.shape[0]) and image.shape[:2] == (size, size):
            return image
        image = Image.fromarray(image)
    elif box == (0, 0, *image.size) and image.size == (size, size):
        return np.asarray(image)
    return np.asarray(image.resize((size, size), _resample(resample), box=box))


def _encoded(data: Any) -> bytes:
    """Encoded image bytes (some sources give a 0-d object/bytes array)."""
    return data.item() if isinstance(data, np.ndarray) else data


def _open(data: Any) -> Image.Image:
    """An encoded image opened by PIL lazily: header read, not decoded."""
    return Image.open(io.BytesIO(_encoded(data)))


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG that libjpeg decodes to RGB itself (YCbCr or grey), read from its
    header; None for anything else (PNG, CMYK, ...), which PIL decodes."""
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (width, height) if colorspace in ("YCbCr", "Gray") else None


def _dct_factor(width: int, height: int, box: tuple[int, int, int, int], size: int) -> int:
    """The coarsest JPEG DCT scale 1/f (f in 8, 4, 2, 1) at which `box` still spans at least
    `size` pixels each way, so that the resize after the decode only shrinks (PIL's draft rule)."""
    left, top, right, bottom = box
    need_w = math.ceil(width * size / max(right - left, 1))
    need_h = math.ceil(height * size / max(bottom - top, 1))
    if need_w >= width or need_h >= height:
        return 1
    fits = min(width // need_w, height // need_h)
    return next(f for f in (8, 4, 2, 1) if fits >= f)


def _decode_jpeg(data: bytes, size: tuple[int, int], factor: int) -> np.ndarray | None:
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


def _decode_pil(img: Image.Image, factor: int) -> Image.Image:
    """An opened image decoded by PIL as RGB, a JPEG at DCT scale 1/factor (PIL's draft)."""
    if factor > 1:
        img.draft("RGB", (img.width // factor, img.height // factor))
    img.load()  # A broken image fails here, not at the resize.
    return img if img.mode == "RGB" else img.convert("RGB")


def _decode(data: bytes, factor: int = 1) -> np.ndarray | Image.Image:
    """Encoded `data` as RGB, a JPEG at DCT scale 1/factor (size rounded up): YCbCr and grey JPEGs
    through simplejpeg (_decode_jpeg), anything else through PIL."""
    size = _jpeg_size(data)
    rgb = None if size is None else _decode_jpeg(data, size, factor)
    return rgb if rgb is not None else _decode_pil(_open(data), factor)


def _decoded_box(
    image: Any, crop_box: Callable[[int, int], tuple[int, int, int, int]], size: int
) -> tuple[np.ndarray | Image.Image, tuple[float, ...]]:
    """A decoded uint8 image, or encoded bytes decoded only as finely as the box
    `crop_box(height, width)` needs at size x size (_dct_factor: far less work for a large photo),
    and that box in the decoded image's pixels."""
    if isinstance(image, np.ndarray) and image.ndim == 3:
        return image, crop_box(image.shape[0], image.shape[1])
    data = _encoded(image)
    jpeg_size = _jpeg_size(data)
    img = _open(data) if jpeg_size is None else None  # header read once, whichever decodes
    width, height = jpeg_size or img.size
    box = crop_box(height, width)
    factor = _dct_factor(width, height, box, size)
    rgb = None if jpeg_size is None else _decode_jpeg(data, jpeg_size, factor)
    if rgb is None:
        rgb = _decode_pil(img or _open(data), factor)
    decoded_width = rgb.shape[1] if isinstance(rgb, np.ndarray) else rgb.width
    if decoded_width != width:
        box = tuple(x * decoded_width / width for x in box)
    return rgb, box


def _crop_resized(
    image: Any, crop_box: Callable[[int, int], tuple[int, int, int, int]], size: int, resample: str
) -> np.ndarray:
    """The box `crop_box(height, width)` of a decoded uint8 image or of encoded bytes, resized to
    size x size (the same pixels as a full decode whenever the box spans less than twice the
    output)."""
    return _resize_box(*_decoded_box(image, crop_box, size), size, resample)


def canvas_size(image_size: int) -> int:
    """Side of the canvas in which data.decoder 'cpu_decode' ships a training crop's decoded box:
    the DCT scale (_dct_factor) leaves the box's shorter side under twice the output, and the
    margin holds the resampling filter's reach."""
    return 2 * image_size + 16


def _canvas(
    rgb: np.ndarray | Image.Image,
    box: tuple[float, ...],
    size: int,
    interpolation: str,
    canvas: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels that resizing `box` of `rgb` to size x size reads (the box and the filter's
    reach around it) in the top-left corner of a zero canvas x canvas uint8 array, the box in
    canvas pixels (float32 [4]) and the extent of the copied pixels (int32 [height, width]), for
    photometric.resize_crops. A box whose reach does not fit (the longer side of a wide or tall
    crop, now and then) is resized here and shipped with the identity box."""
    width, height = rgb.size if isinstance(rgb, Image.Image) else (rgb.shape[1], rgb.shape[0])
    left, top, right, bottom = box
    support = photometric.filter_support(interpolation)
    reach = [
        support * max((hi - lo) / size, 1.0) + 1.0 for lo, hi in ((left, right), (top, bottom))
    ]
    x0, y0 = max(math.floor(left - reach[0]), 0), max(math.floor(top - reach[1]), 0)
    x1, y1 = min(math.ceil(right + reach[0]), width), min(math.ceil(bottom + reach[1]), height)
    out = np.zeros((canvas, canvas, 3), np.uint8)
    if x1 - x0 > canvas or y1 - y0 > canvas:
        out[:size, :size] = _resize_box(rgb, box, size, interpolation)
        x0, y0, x1, y1, box = 0, 0, size, size, (0, 0, size, size)
    else:
        out[: y1 - y0, : x1 - x0] = np.asarray(rgb)[y0:y1, x0:x1]
    shifted = np.asarray([box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0], np.float32)
    return out, shifted, np.asarray([y1 - y0, x1 - x0], np.int32)


# --------------------------------------------------------------------------------------------------
# Transforms.


class DecodeImage(grain.transforms.Map):
    """'image': encoded PNG/JPEG bytes -> uint8 [H, W, 3] RGB (grey, palette and CMYK converted)."""

    def map(self, element: Example) -> Example:
        return {**element, "image": np.asarray(_decode(_encoded(element["image"])))}


class RandomResizedCrop(grain.transforms.RandomMap):
    """Inception-style crop: area fraction in `scale`, aspect (w / h) log-uniform in `ratio`,
    resized to size x size; after 10 failed draws, a centre crop with the aspect clamped.

    Takes a decoded uint8 image, or the encoded bytes: then the box is drawn from the header's size
    and a JPEG is decoded at the coarsest DCT scale that still covers the box (`_crop_resized`)."""

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        interpolation: str = "bilinear",
    ):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {scale}.")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"crop ratio must satisfy 0 < lo <= hi, got {ratio}.")
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.interpolation = interpolation
        _resample(interpolation)

    def crop_box(
        self, height: int, width: int, rng: np.random.Generator
    ) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the crop for an image of the given size."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return left, top, left + w, top + h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        return left, top, left + w, top + h

    def random_map(self, element: Example, rng: np.random.Generator) -> Example:
        box = _box_drawer(self, rng)
        image = _crop_resized(element["image"], box, self.size, self.interpolation)
        return {**element, "image": image}


class ResizeCentreCrop(grain.transforms.Map):
    """Resize the shorter side to size / crop_ratio and take the central size x size crop.

    Done as one resampling of the matching box of the original image (same result up to resampling,
    less work); the identity for a size x size image with crop_ratio 1. Takes a decoded uint8 image
    or the encoded bytes, which it decodes as RandomResizedCrop does (a large JPEG at a reduced
    DCT scale).
    """

    def __init__(self, size: int, crop_ratio: float = 0.875, interpolation: str = "bilinear"):
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}.")
        self.size = int(size)
        self.crop_ratio = float(crop_ratio)
        self.interpolation = interpolation
        _resample(interpolation)

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in the original image of the final centre crop."""
        side = min(height, width) * self.crop_ratio  # Shorter side * size / (size / ratio).
        crop = max(1, round(side))
        top, left = (height - crop) // 2, (width - crop) // 2
        return left, top, left + crop, top + crop

    def map(self, element: Example) -> Example:
        image = _crop_resized(element["image"], self.crop_box, self.size, self.interpolation)
        return {**element, "image": image}


def _box_drawer(
    crop: RandomResizedCrop | ResizeCentreCrop, rng: np.random.Generator
) -> Callable[[int, int], tuple[int, int, int, int]]:
    """(height, width) -> the box `crop` cuts, drawn from `rng` as its own map would draw it."""
    if isinstance(crop, RandomResizedCrop):
        return lambda height, width: crop.crop_box(height, width, rng)
    return crop.crop_box


class CropBox(grain.transforms.RandomMap):
    """The box that `crop` (RandomResizedCrop or ResizeCentreCrop) would cut, drawn from the same
    random stream but without decoding, for a decoder that crops itself (DALI): adds 'crop' int32
    [left, top, right, bottom] in the encoded image's pixels and moves the bytes, as a uint8 array,
    from 'image' to 'encoded'. In a transform list at the crop's place, a given seed and position
    give the box the crop would have used."""

    def __init__(self, crop: RandomResizedCrop | ResizeCentreCrop):
        self.crop = crop

    def random_map(self, element: Example, rng: np.random.Generator) -> Example:
        image = element["image"]
        if isinstance(image, np.ndarray) and image.ndim == 3:
            raise ValueError(
                "data.decoder='dali' needs encoded images (PNG/JPEG bytes); this source gives "
                f"decoded arrays of shape {image.shape}: use data.decoder='cpu'."
            )
        data = _encoded(image)
        width, height = _jpeg_size(data) or _open(data).size
        box = _box_drawer(self.crop, rng)(height, width)
        out = {k: v for k, v in element.items() if k != "image"}
        return {**out, "encoded": np.frombuffer(data, np.uint8), "crop": np.asarray(box, np.int32)}


class CanvasCrop(grain.transforms.RandomMap):
    """The box that `crop` (RandomResizedCrop or ResizeCentreCrop) would cut, drawn from the same
    random stream and decoded as it would decode it, but not resized: for data.decoder
    'cpu_decode', whose train step resizes on the accelerator (photometric.resize_crops). 'image'
    becomes a uint8 [C, C, 3] canvas (C = canvas_size(S)) holding the box's pixels (_canvas),
    'box' float32 [4] the box in it and 'extent' int32 [2] the height and width of its pixels."""

    def __init__(self, crop: RandomResizedCrop | ResizeCentreCrop):
        photometric.filter_support(crop.interpolation)  # an unsupported filter fails here
        self.crop = crop
        self.canvas = canvas_size(crop.size)

    def random_map(self, element: Example, rng: np.random.Generator) -> Example:
        size = self.crop.size
        rgb, decoded_box = _decoded_box(element["image"], _box_drawer(self.crop, rng), size)
        image, box_, extent = _canvas(rgb, decoded_box, size, self.crop.interpolation, self.canvas)
        return {**element, "image": image, "box": box_, "extent": extent}


class RandomFlip(grain.transforms.RandomMap):
    """Left-right flip with probability 1/2: draws element 'flip' (np.bool_); the train step
    mirrors the image (photometric.flip)."""

    def random_map(self, element: Example, rng: np.random.Generator) -> Example:
        return {**element, "flip": np.bool_(rng.random() < 0.5)}


class ColorJitter(grain.transforms.RandomMap):
    """Light photometric jitter: brightness, contrast and saturation factors drawn uniformly from
    [1 - s, 1 + s] per image (a part with strength 0 gets factor 1).

    The host only draws the factors (element 'jitter', float32 [brightness, contrast,
    saturation]); the train step applies them on the accelerator (photometric.color_jitter).
    """

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2):
        for k, v in (
            ("brightness", brightness),
            ("contrast", contrast),
            ("saturation", saturation),
        ):
            if not 0 <= v < 1:
                raise ValueError(f"{k} strength must be in [0, 1), got {v}.")
        self.strengths = np.asarray([brightness, contrast, saturation], np.float64)

    def random_map(self, element: Example, rng: np.random.Generator) -> Example:
        # Always draw three factors so the random stream does not depend on which parts are on.
        factors = 1.0 + self.strengths * rng.uniform(-1.0, 1.0, 3)
        return {**element, "jitter": factors.astype(np.float32)}


class EvalFeatures(grain.transforms.Map):
    """Per example, before batching: uint8 'image', int32 'label', float32 'ingredients' and
    float32 'mask'; everything else (e.g. 'image_path') is dropped. The eval step normalises
    (photometric.eval_images)."""

    def map(self, element: Example) -> Example:
        return {
            "image": np.ascontiguousarray(element["image"], np.uint8),
            "label": np.int32(element["label"]),
            "ingredients": np.asarray(element["ingredients"], np.float32),
            "mask": np.float32(element["mask"]),
        }


class TrainFeatures(grain.transforms.Map):
    """Per example, before batching: uint8 'image' (or 'encoded' and 'crop' from CropBox), int32
    'label', float32 'ingredients' and the jitter factors and flip if drawn; everything else (e.g.
    'image_path') is dropped."""

    def map(self, element: Example) -> Example:
        out = {
            "label": np.int32(element["label"]),
            "ingredients": np.asarray(element["ingredients"], np.float32),
        }
        if "image" in element:
            out["image"] = np.ascontiguousarray(element["image"])
        for key in ("encoded", "crop", "box", "extent", "jitter", "flip"):
            if key in element:
                out[key] = element[key]
        return out


def _batch_encoded(examples: Sequence[Example]) -> Example:
    """A batch of CropBox examples: 'encoded' as the list of their byte arrays (they differ in
    length), everything else stacked."""
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "encoded"}
    return {**batch, "encoded": [e["encoded"] for e in examples]}


class CheckBatch(grain.transforms.Map):
    """Asserts shapes and dtypes of a finished batch (cheap; catches a bad source early)."""

    def __init__(self, batch_size: int, image_size: int, image_dtype: Any, with_mask: bool):
        self.batch_size = batch_size
        self.image_size = image_size
        self.image_dtype = np.dtype(image_dtype)
        self.with_mask = with_mask

    def map(self, batch: Example) -> Example:
        b, s = self.batch_size, self.image_size
        if "encoded" in batch:
            chex.assert_equal(len(batch["encoded"]), b)
            chex.assert_shape(batch["crop"], (b, 4))
            chex.assert_type(batch["crop"], np.int32)
        elif "box" in batch:
            c = canvas_size(s)
            chex.assert_shape(
                [batch["image"], batch["box"], batch["extent"]], [(b, c, c, 3), (b, 4), (b, 2)]
            )
            chex.assert_type(
                [batch["image"], batch["box"], batch["extent"]], [np.uint8, np.float32, np.int32]
            )
        else:
            chex.assert_shape(batch["image"], (b, s, s, 3))
            chex.assert_type(batch["image"], self.image_dtype)
        if "flip" in batch:
            chex.assert_shape(batch["flip"], (b,))
            chex.assert_type(batch["flip"], np.bool_)
        if "jitter" in batch:
            chex.assert_shape(batch["jitter"], (b, 3))
            chex.assert_type(batch["jitter"], np.float32)
        chex.assert_shape(batch["label"], (b,))
        chex.assert_type(batch["label"], np.int32)
        chex.assert_rank(batch["ingredients"], 2)
        chex.assert_type(batch["ingredients"], np.float32)
        if self.with_mask:
            chex.assert_shape(batch["mask"], (b,))
        return batch


# --------------------------------------------------------------------------------------------------
# Sources and seeds.


class PaddedShard:
    """Random-access view of records [start, end) of `source`, padded to `length` with copies
    of record `pad_index`; adds 'mask' (1.0 real, 0.0 padding)."""

    def __init__(
        self, source: Sequence[Example], start: int, end: int, length: int, pad_index: int
    ):
        if not 0 <= start <= end <= len(source) or length < end - start:
            raise ValueError(f"Bad shard [{start}, {end}) of {len(source)} padded to {length}.")
        self.source = source
        self.start, self.end, self.length, self.pad_index = start, end, length, pad_index

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.length:
            raise IndexError(index)
        real = index < self.end - self.start
        element = self.source[self.start + index if real else self.pad_index]
        return {**element, "mask": np.float32(real)}

    def __repr__(self) -> str:
        return (
            f"PaddedShard({self.source!r}, start={self.start}, end={self.end}, "
            f"length={self.length}, pad_index={self.pad_index})"
        )


class Subset:
    """Random-access view of the records `indices` of `source` (picklable for worker processes)."""

    def __init__(self, source: Sequence[Example], indices: Sequence[int]):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Example:
        return self.source[int(self.indices[index])]

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, {len(self.indices)} of {len(self.source)} records)"


_SUBSET_SEED = 20241  # fixed: every seed and variant of a study trains on the same subset


def train_subset_indices(num_examples: int, fraction: float) -> np.ndarray:
    """The sorted indices of a deterministic uniform random `fraction` of `num_examples` records.

    The same for every run seed, so a low-data study compares variants on identical data; a
    smaller fraction's subset is contained in a larger one's (one fixed permutation, cut short).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"config.data.train_fraction={fraction!r}: expected a number in (0, 1].")
    count = max(1, round(fraction * num_examples))
    order = np.random.default_rng(_SUBSET_SEED).permutation(num_examples)
    return np.sort(order[:count])


def derive_seed(*entropy: int) -> int:
    """A 32-bit seed mixed from non-negative integers (grain wants seeds in [0, 2**32))."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, np.uint32)[0])


def _default_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if shard_index is None else int(shard_index)
    count = jax.process_count() if shard_count is None else int(shard_count)
    if not 0 <= index < count:
        raise ValueError(f"shard_index {index} out of range for shard_count {count}.")
    return index, count


def _read_options(data_cfg: ml_collections.ConfigDict) -> grain.ReadOptions:
    return grain.ReadOptions(
        num_threads=int(data_cfg.read_threads),
        prefetch_buffer_size=int(data_cfg.prefetch_buffer_size),
    )


def _to_iterator(
    ds: grain.MapDataset, data_cfg: ml_collections.ConfigDict
) -> grain.DatasetIterator:
    """Threads prefetch whole batches; worker processes (if any) take every k-th batch, in order."""
    it_ds = ds.to_iter_dataset(_read_options(data_cfg))
    if data_cfg.worker_count > 0:
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=int(data_cfg.worker_count),
                per_worker_buffer_size=int(data_cfg.worker_buffer_size),
            )
        )
    return iter(it_ds)


def _apply(ds: grain.MapDataset, transform: Any, seed: int) -> grain.MapDataset:
    if isinstance(transform, grain.transforms.RandomMap):
        return ds.random_map(transform, seed=seed)
    if isinstance(transform, grain.transforms.Map) or callable(transform):
        return ds.map(transform)
    raise TypeError(f"Expected a grain Map/RandomMap transform or a callable, got {transform!r}.")


DECODERS = ("cpu", "cpu_decode", "dali")  # data.decoder: where training crops are decoded


def decoder(data_cfg: ml_collections.ConfigDict) -> str:
    """data.decoder, checked ('cpu' where a config predates the field)."""
    name = data_cfg.get("decoder", "cpu")
    if name not in DECODERS:
        raise ValueError(f"Unknown data.decoder {name!r}; expected one of {list(DECODERS)}.")
    return name


def train_transforms(data_cfg: ml_collections.ConfigDict) -> list[Any]:
    """The per-example training transforms: a crop of the encoded image (decoded as it is
    cropped) to uint8, with data.decoder 'cpu_decode' decoded but not resized (CanvasCrop), with
    'dali' only its box (CropBox); then the draws of the jitter's factors and of the flip."""
    aug = data_cfg.augment
    size = data_cfg.image_size
    if aug.random_resized_crop:
        crop = RandomResizedCrop(size, aug.crop_scale, aug.crop_ratio, data_cfg.interpolation)
    else:
        crop = ResizeCentreCrop(size, data_cfg.eval_crop_ratio, data_cfg.interpolation)
    wrap = {"cpu": lambda c: c, "cpu_decode": CanvasCrop, "dali": CropBox}[decoder(data_cfg)]
    out: list[Any] = [wrap(crop)]
    if aug.color_jitter:
        out.append(ColorJitter(aug.brightness, aug.contrast, aug.saturation))
    if aug.horizontal_flip:
        out.append(RandomFlip())
    return out


# --------------------------------------------------------------------------------------------------
# Public pipelines.


def train_iterator(
    data_cfg: ml_collections.ConfigDict,
    split: str | None = None,
    *,
    batch_size: int,
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    data_source: Sequence[Example] | None = None,
) -> grain.DatasetIterator:
    """Infinite iterator of augmented training batches for this process's shard.

    Args:
      data_cfg: config.data.
      split: tfds split (default data_cfg.train_split).
      batch_size: examples per batch of this process (the global batch is batch_size * shard_count).
      seed: non-negative int; fixes the shuffle (shared by all shards) and the augmentation.
      shard_index, shard_count: this process's shard; default jax.process_index() / process_count().
      data_source: a random-access source to read instead of the tfds split (tests, benchmarks).
        data_cfg.train_fraction < 1 trains on a fixed random part of either (train_subset_indices).

    Returns:
      A grain DatasetIterator of dicts 'image' uint8 [b, S, S, 3] (crops), 'jitter' float32
      [b, 3] (with colour jitter on: ColorJitter), 'flip' bool [b] (with flips on: RandomFlip),
      'label' int32 [b], 'ingredients' float32 [b, V]: photometric.train_images makes the model
      input of them. With data.decoder 'dali', 'encoded' (b uint8 byte arrays) and 'crop' int32
      [b, 4] (CropBox) replace 'image' (dali.GpuCrops decodes them); with 'cpu_decode',
      'image' is uint8 canvases [b, C, C, 3] with 'box' float32 [b, 4] and 'extent' int32 [b, 2]
      (CanvasCrop), which the train step resizes. Its get_state() is a
      JSON-able dict; set_state() on a fresh iterator made with the same arguments continues with
      exactly the same batches.
    """
    shard_index, shard_count = _default_shard(shard_index, shard_count)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}.")
    src = (
        data_source
        if data_source is not None
        else datasets.source(data_cfg, split or data_cfg.train_split)
    )
    fraction = float(data_cfg.get("train_fraction", 1.0))
    if fraction != 1.0:
        src = Subset(src, train_subset_indices(len(src), fraction))
    n = len(src)
    used = n - n % shard_count  # Drop the remainder so every shard has the same epoch length.
    if used == 0:
        raise ValueError(f"Split of {n} examples cannot feed {shard_count} shards.")

    ds = grain.MapDataset.source(src)
    if data_cfg.shuffle:
        # The same permutation on every shard, a new one every epoch.
        ds = ds.shuffle(seed=derive_seed(seed, 0))
    ds = ds[shard_index:used:shard_count].repeat(None)
    for i, t in enumerate(train_transforms(data_cfg)):  # the crop decodes the encoded image
        ds = _apply(ds, t, derive_seed(seed, 1, shard_index, i))
    ds = ds.map(TrainFeatures())
    encoded = decoder(data_cfg) == "dali"
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_batch_encoded if encoded else None)
    ds = ds.map(CheckBatch(batch_size, data_cfg.image_size, np.uint8, with_mask=False))
    return _to_iterator(ds, data_cfg)


def eval_shard_range(num_examples: int, shard_index: int, shard_count: int) -> tuple[int, int]:
    """[start, end) of the contiguous, near-equal slice of the split that a shard evaluates."""
    per, extra = divmod(num_examples, shard_count)
    start = shard_index * per + min(shard_index, extra)
    return start, start + per + (shard_index < extra)


def eval_num_batches(num_examples: int, batch_size: int, shard_count: int = 1) -> int:
    """Batches each shard yields in `eval_batches` (the same on every shard)."""
    return max(1, math.ceil(math.ceil(num_examples / shard_count) / batch_size))


def eval_batches(
    data_cfg: ml_collections.ConfigDict,
    split: str | None = None,
    *,
    batch_size: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    extra_transforms: Sequence[Any] = (),
    seed: int = 0,
    data_source: Sequence[Example] | None = None,
) -> Iterator[Example]:
    """One ordered pass over this shard's slice of `split`, in full batches with a 'mask'.

    Shards take contiguous slices that are disjoint and cover the split; every shard yields
    `eval_num_batches(len, batch_size, shard_count)` batches (so multi-host collectives line
    up), the tail padded with copies of a real example whose 'mask' is 0.

    Args:
      data_cfg: config.data.
      split: tfds split (default data_cfg.eval_split).
      batch_size: examples per batch of this process.
      shard_index, shard_count: default jax.process_index() / process_count().
      extra_transforms: grain Map / RandomMap transforms (or picklable callables) applied in
        order to each example dict after the resize + centre crop, while 'image' is uint8
        [S, S, 3] (e.g. corruptions; the array may be read-only: return a new one); each
        returns the dict with 'image' still uint8 [S, S, 3].
      seed: seed of the RandomMap extra transforms (drawn per example position: reproducible).
      data_source: a random-access source to read instead of the tfds split.

    Returns:
      An iterator of dicts 'image' uint8 [b, S, S, 3] (photometric.eval_images makes the model
      input of it), 'label', 'ingredients' (as in training) and 'mask' float32 [b].
    """
    shard_index, shard_count = _default_shard(shard_index, shard_count)
    src = (
        data_source
        if data_source is not None
        else datasets.source(data_cfg, split or data_cfg.eval_split)
    )
    n = len(src)
    if n == 0:
        raise ValueError("Cannot evaluate an empty split.")
    start, end = eval_shard_range(n, shard_index, shard_count)
    length = eval_num_batches(n, batch_size, shard_count) * batch_size
    pad_index = start if end > start else 0
    ds = grain.MapDataset.source(PaddedShard(src, start, end, length, pad_index))
    ds = ds.map(  # decodes as it crops
        ResizeCentreCrop(data_cfg.image_size, data_cfg.eval_crop_ratio, data_cfg.interpolation)
    )
    for i, t in enumerate(extra_transforms):
        ds = _apply(ds, t, derive_seed(seed, 2, shard_index, i))
    ds = ds.map(EvalFeatures())
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(CheckBatch(batch_size, data_cfg.image_size, np.uint8, with_mask=True))
    return _closing(_to_iterator(ds, data_cfg))


def _closing(it: grain.DatasetIterator) -> Iterator[Example]:
    """Yields from `it` and closes it (stopping its threads and worker processes) when the pass
    ends or the generator is closed."""
    try:
        yield from it
    finally:
        it.close()


# --------------------------------------------------------------------------------------------------
# Iterator state.


def state_to_json(state: Mapping[str, Any] | bytes) -> str:
    """Iterator state (grain DatasetIterator dict, or DataLoader bytes) as a JSON string."""
    if isinstance(state, bytes | bytearray):
        return bytes(state).decode()
    return json.dumps(state)


def state_from_json(text: str) -> dict[str, Any]:
    """Inverse of `state_to_json` for `train_iterator` iterators: the dict set_state() takes."""
    return json.loads(text)
