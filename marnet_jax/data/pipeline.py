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
  (train with data.cache_decoded: 'image' decoded once into memory, DecodedSource)
  -> train: RandomResizedCrop (decodes as it crops), ColorJitter (draws the factors),
     RandomFlip (draws the flip), TrainFeatures -> batch:
     {'image' uint8 [B, S, S, 3], 'jitter' float32 [B, 3] (with colour jitter on), 'flip' bool [B]
     (with flips on), 'label' int32, 'ingredients' float32 [B, V]}. The train step flips, applies
     the jitter and normalises on the accelerator (marnet_jax/data/photometric.py): the host ships
     uint8 crops.
  -> train with data.decoder 'cpu_decode' or 'dali': the decoder's host transform at the crop's
     place (the same boxes, decoded but not resized, or not decoded), and the decoder's keys in
     place of 'image': marnet_jax/data/decoders.py.
  -> eval: ResizeCentreCrop (decodes as it crops), then the caller's `extra_transforms`,
     EvalFeatures -> batch:
     {'image' uint8 [B, S, S, 3], 'label', 'ingredients', 'mask' float32 [B]}; the eval step
     normalises (photometric.eval_images).
All transforms are module-level classes so grain can pickle them into worker processes.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import chex
import grain
import jax
import ml_collections
import numpy as np

from marnet_jax.data import datasets, decoders, decoding
from marnet_jax.data.config import train_image_size

Example = dict[str, Any]
log = logging.getLogger("marnet_jax")

# --------------------------------------------------------------------------------------------------
# Transforms.


class DecodeImage(grain.transforms.Map):
    """'image': encoded PNG/JPEG bytes -> uint8 [H, W, 3] RGB (grey, palette and CMYK converted)."""

    def map(self, element: Example) -> Example:
        return {
            **element,
            "image": np.asarray(decoding.decode(decoding.encoded_bytes(element["image"]))),
        }


class RandomResizedCrop(grain.transforms.RandomMap):
    """Inception-style crop: area fraction in `scale`, aspect (w / h) log-uniform in `ratio`,
    resized to size x size; after 10 failed draws, a centre crop with the aspect clamped.

    Takes a decoded uint8 image, or the encoded bytes: then the box is drawn from the header's size
    and a JPEG is decoded at the coarsest DCT scale that still covers the box
    (decoding.crop_resized)."""

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
        decoding.resample(interpolation)

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

    def box_drawer(self, rng: np.random.Generator) -> Callable[[int, int], tuple[int, ...]]:
        """(height, width) -> the box this crop cuts, drawn from `rng` (as random_map draws it)."""
        return lambda height, width: self.crop_box(height, width, rng)

    def random_map(self, element: Example, rng: np.random.Generator) -> Example:
        box = self.box_drawer(rng)
        image = decoding.crop_resized(element["image"], box, self.size, self.interpolation)
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
        decoding.resample(interpolation)

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in the original image of the final centre crop."""
        side = min(height, width) * self.crop_ratio  # Shorter side * size / (size / ratio).
        crop = max(1, round(side))
        top, left = (height - crop) // 2, (width - crop) // 2
        return left, top, left + crop, top + crop

    def box_drawer(self, rng: np.random.Generator) -> Callable[[int, int], tuple[int, ...]]:
        """(height, width) -> the box this crop cuts (`rng` unused: the centre crop draws nothing)."""
        return self.crop_box

    def map(self, element: Example) -> Example:
        image = decoding.crop_resized(
            element["image"], self.crop_box, self.size, self.interpolation
        )
        return {**element, "image": image}


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
    """Per example, before batching: the decoder's image part (decoders.Decoder.host_keys), int32
    'label', float32 'ingredients' and the jitter factors and flip if drawn; everything else (e.g.
    'image_path') is dropped."""

    def __init__(self, decoder: decoders.Decoder):
        self.decoder = decoder

    def map(self, element: Example) -> Example:
        out = {
            "label": np.int32(element["label"]),
            "ingredients": np.asarray(element["ingredients"], np.float32),
        }
        for key in self.decoder.host_keys:
            out[key] = np.ascontiguousarray(element[key]) if key == "image" else element[key]
        for key in ("jitter", "flip"):
            if key in element:
                out[key] = element[key]
        return out


class CheckBatch(grain.transforms.Map):
    """Asserts shapes and dtypes of a finished batch (cheap; catches a bad source early): the image
    part as `decoder` ships it (evaluation: decoders.Decoder(), uint8 crops)."""

    def __init__(
        self, batch_size: int, image_size: int, decoder: decoders.Decoder, with_mask: bool
    ):
        self.batch_size = batch_size
        self.image_size = image_size
        self.decoder = decoder
        self.with_mask = with_mask

    def map(self, batch: Example) -> Example:
        b = self.batch_size
        self.decoder.check(batch, b, self.image_size)
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


class DecodedSource:
    """`source` with every image decoded once, up front, into host memory (data.cache_decoded):
    a training crop then costs a resize instead of a record read, a parse and a decode.

    'image' becomes the decoded uint8 [H, W, 3] array; the crops cut from it are the same pixels
    as from the encoded bytes for PNG (synthetic_food) and for any JPEG whose crop the pipeline
    decodes at full scale. A large JPEG's crop is otherwise decoded at a coarser DCT scale
    (decoding.decoded_box), so its pixels differ. Decoding runs in `threads` threads."""

    def __init__(self, source: Sequence[Example], threads: int = 1):
        def decoded(index: int) -> Example:
            record = source[index]
            image = record["image"]
            if not decoding.is_decoded(image):
                image = np.asarray(decoding.decode(decoding.encoded_bytes(image)))
            return {**record, "image": image}

        with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
            self.records = list(pool.map(decoded, range(len(source))))
        self.description = repr(source)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:
        return self.records[index]

    def nbytes(self) -> int:
        """Host memory held by the decoded images."""
        return sum(r["image"].nbytes for r in self.records)

    def __repr__(self) -> str:
        return f"DecodedSource({self.description}, {len(self)} records)"


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


def train_transforms(data_cfg: ml_collections.ConfigDict) -> list[Any]:
    """The per-example training transforms: a crop of the encoded image, in the form data.decoder
    ships it (decoders.Decoder.host_transform: 'cpu' decoded and resized to uint8), then the
    draws of the jitter's factors and of the flip."""
    aug = data_cfg.augment
    size = train_image_size(data_cfg)
    if aug.random_resized_crop:
        crop = RandomResizedCrop(size, aug.crop_scale, aug.crop_ratio, data_cfg.interpolation)
    else:
        crop = ResizeCentreCrop(size, data_cfg.eval_crop_ratio, data_cfg.interpolation)
    out: list[Any] = [decoders.for_config(data_cfg).host_transform(crop)]
    if aug.color_jitter:
        out.append(ColorJitter(aug.brightness, aug.contrast, aug.saturation))
    if aug.horizontal_flip:
        out.append(RandomFlip())
    return out


# --------------------------------------------------------------------------------------------------
# Public pipelines.


def available_memory() -> int:
    """Bytes of host memory available to a new allocation now (Linux; 0 where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def cached_decoded(src: Sequence[Example], data_cfg: ml_collections.ConfigDict) -> DecodedSource:
    """The training source decoded once into memory (data.cache_decoded). Refused with DALI, which
    decodes the encoded bytes itself, and when the split would take more than half of the host's
    available memory (estimated from its first image)."""
    if data_cfg.decoder == "dali":
        raise ValueError(
            "config.data.cache_decoded=True keeps decoded images, but data.decoder='dali' decodes "
            "the encoded bytes on the GPUs: set one of them off ('cpu' or 'cpu_decode')."
        )
    if len(src):
        estimate = DecodedSource([src[0]]).nbytes() * len(src)
        available = available_memory()
        if available and estimate > available // 2:
            raise ValueError(
                f"config.data.cache_decoded=True would keep about {estimate / 2**30:.1f} GiB of "
                f"decoded training images ({len(src)} like the first) in host memory, more than "
                f"half of the {available / 2**30:.1f} GiB available: set it to False."
            )
    cached = DecodedSource(src, int(data_cfg.read_threads))
    log.info(
        "Decoded %d training images into %.0f MB of host memory.",
        len(cached),
        cached.nbytes() / 2**20,
    )
    return cached


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
      A grain DatasetIterator of dicts 'image' uint8 [b, S, S, 3] (crops; S is
      train_image_size(data_cfg)), 'jitter' float32 [b, 3] (with colour jitter on: ColorJitter),
      'flip' bool [b] (with flips on: RandomFlip), 'label' int32 [b], 'ingredients' float32
      [b, V]: photometric.train_images makes the model input of them. With data.decoder
      'cpu_decode' or 'dali', the decoder's keys replace 'image' (decoders.Decoder.host_keys).
      Its get_state() is a JSON-able dict; set_state() on a fresh iterator made with the same
      arguments continues with exactly the same batches.
    """
    shard_index, shard_count = _default_shard(shard_index, shard_count)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}.")
    src = (
        data_source
        if data_source is not None
        else datasets.source(data_cfg, split or data_cfg.train_split)
    )
    fraction = float(data_cfg.train_fraction)
    if fraction != 1.0:
        src = Subset(src, train_subset_indices(len(src), fraction))
    if data_cfg.cache_decoded:
        src = cached_decoded(src, data_cfg)
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
    decoder = decoders.for_config(data_cfg)
    ds = ds.map(TrainFeatures(decoder))
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=decoder.batch_fn())
    ds = ds.map(CheckBatch(batch_size, train_image_size(data_cfg), decoder, with_mask=False))
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
    ds = ds.map(CheckBatch(batch_size, data_cfg.image_size, decoders.Decoder(), with_mask=True))
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
