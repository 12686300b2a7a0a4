"""Per-pixel work on the accelerator: the photometric half of training augmentation, and the
normalisation of training and evaluation crops.

The host pipeline ships uint8 crops. A training batch also carries what the host drew per example:
the flips ('flip' bool [B]) and the colour jitter's factors ('jitter' [B, 3]); `train_images` turns
it into the model's input: the flip, PIL's (and torchvision's) ImageEnhance Brightness -> Contrast
-> Color blends with those factors, then (x / 255 - mean) / std in the compute dtype.
`eval_images` normalises evaluation and prediction crops. On an accelerator this costs next to
nothing, the host is spared every per-pixel pass after the crop, and it sends a quarter of float32's
bytes. Everything here is per image and exact where it reduces (integer sums), so the model's input
is bit-identical however the batch is split over devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import ml_collections

Array = jax.Array
LUMA = (0.299, 0.587, 0.114)  # PIL's RGB -> L weights


def _luma(x: Array) -> Array:
    return x[..., 0] * LUMA[0] + x[..., 1] * LUMA[1] + x[..., 2] * LUMA[2]


def brightened_mean_grey(images: Array, brightness: Array) -> Array:
    """Mean grey level (luma) of each uint8-valued image [B, H, W, 3] after the brightness blend,
    clipped to 255: the level the contrast blend pulls towards. [B] float32.

    From integer sums (exact, so the same however the batch is sharded): the clipped pixels
    contribute 255 each, the others brightness * their value."""
    chex.assert_rank([images, brightness], [4, 1])
    x = images.astype(jnp.int32)
    b = brightness.astype(jnp.float32)
    clipped = x.astype(jnp.float32) * b[:, None, None, None] >= 255.0  # as color_jitter clips
    kept_sum = jnp.sum(jnp.where(clipped, 0, x), axis=(1, 2)).astype(jnp.float32)  # [B, 3]
    clipped_count = jnp.sum(clipped.astype(jnp.int32), axis=(1, 2)).astype(jnp.float32)
    pixels = images.shape[1] * images.shape[2]
    return _luma((b[:, None] * kept_sum + 255.0 * clipped_count) / pixels)


def color_jitter(images: Array, factors: Array) -> Array:
    """Brightness, contrast, saturation of uint8-valued RGB images [B, H, W, 3] ([0, 255], any
    dtype), in that order; float32 out.

    Each is PIL's ImageEnhance blend: with black, with the brightened image's mean grey level
    (brightened_mean_grey), with its greyscale version, clipped to [0, 255] after each as the uint8
    originals are (they also round to integers, which this float version does not). `factors`
    [B, 3]: the brightness, contrast and saturation factors (pipeline.ColorJitter draws them).
    """
    chex.assert_rank([images, factors], [4, 2])
    chex.assert_axis_dimension(factors, 1, 3)
    grey_level = brightened_mean_grey(images, factors[:, 0])[:, None, None, None]
    f = factors.astype(jnp.float32)[:, None, None, None, :]
    x = jnp.clip(images.astype(jnp.float32) * f[..., 0], 0.0, 255.0)
    x = jnp.clip(grey_level + f[..., 1] * (x - grey_level), 0.0, 255.0)
    grey = _luma(x)[..., None]
    return jnp.clip(grey + f[..., 2] * (x - grey), 0.0, 255.0)


def flip(images: Array, flips: Array) -> Array:
    """Images [B, H, W, C] mirrored left-right where `flips` [B] is true."""
    chex.assert_rank([images, flips], [4, 1])
    return jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)


def normalize(images: Array, mean: Sequence[float], std: Sequence[float], dtype: str) -> Array:
    """[..., 3] pixel values in [0, 255] -> (x / 255 - mean) / std in `dtype` ('float32' or
    'bfloat16', data.dtype)."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(
            f"Unknown image dtype {dtype!r} (data.dtype); expected 'float32' or 'bfloat16'."
        )
    m = jnp.asarray(mean, jnp.float32) * 255.0
    inv = 1.0 / (jnp.asarray(std, jnp.float32) * 255.0)
    return ((images.astype(jnp.float32) - m) * inv).astype(jnp.dtype(dtype))


def eval_images(images: Array, data_cfg: ml_collections.ConfigDict) -> Array:
    """The model input of evaluation and prediction crops (uint8 [..., S, S, 3], as eval_batches
    and predict.preprocess give them): normalised to data_cfg.dtype."""
    chex.assert_type(images, jnp.uint8)
    return normalize(images, data_cfg.mean, data_cfg.std, data_cfg.dtype)


def train_images(batch: Mapping[str, Array], data_cfg: ml_collections.ConfigDict) -> Array:
    """A training batch's model input: uint8 'image' [B, S, S, 3] flipped where 'flip' says and
    jittered with 'jitter' (each when the pipeline drew it), normalised to data_cfg.dtype."""
    chex.assert_type(batch["image"], jnp.uint8)
    x = batch["image"]
    if "flip" in batch:
        x = flip(x, batch["flip"])
    if "jitter" in batch:
        x = color_jitter(x, batch["jitter"])
    return normalize(x, data_cfg.mean, data_cfg.std, data_cfg.dtype)
