"""The photometric half of training augmentation, run on the accelerator in the train step.

The host pipeline ships each training batch as uint8 crops plus the colour jitter it drew per
example ('jitter' [B, 4]: three factors and a mean grey level); `train_images` turns them into the
model's input: PIL's (and torchvision's) ImageEnhance Brightness -> Contrast -> Color blends with
those factors, then (x / 255 - mean) / std in the compute dtype. On an accelerator this costs next
to nothing, the host is spared the per-pixel float work, and it sends a quarter of float32's bytes.
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


def color_jitter(images: Array, jitter: Array) -> Array:
    """Brightness, contrast, saturation of float RGB images [B, H, W, 3] in [0, 255], in that order.

    Each is PIL's ImageEnhance blend: with black, with the image's mean grey level, with its
    greyscale version, clipped to [0, 255] after each as the uint8 originals are (they also round to
    integers, which this float version does not). `jitter` [B, 4]: the three factors and the mean
    grey level of the brightened image (pipeline.ColorJitter measures it on the host, so that
    everything here is elementwise).
    """
    chex.assert_rank([images, jitter], [4, 2])
    chex.assert_axis_dimension(jitter, 1, 4)
    j = jitter.astype(jnp.float32)[:, None, None, None, :]
    x = jnp.clip(images.astype(jnp.float32) * j[..., 0], 0.0, 255.0)
    x = jnp.clip(j[..., 3] + j[..., 1] * (x - j[..., 3]), 0.0, 255.0)
    grey = _luma(x)[..., None]
    return jnp.clip(grey + j[..., 2] * (x - grey), 0.0, 255.0)


def normalize(images: Array, mean: Sequence[float], std: Sequence[float], dtype: str) -> Array:
    """[..., 3] pixel values in [0, 255] -> (x / 255 - mean) / std in `dtype`."""
    m = jnp.asarray(mean, jnp.float32) * 255.0
    inv = 1.0 / (jnp.asarray(std, jnp.float32) * 255.0)
    return ((images.astype(jnp.float32) - m) * inv).astype(jnp.dtype(dtype))


def train_images(batch: Mapping[str, Array], data_cfg: ml_collections.ConfigDict) -> Array:
    """A training batch's model input: uint8 'image' [B, S, S, 3] jittered with 'jitter' (when
    the pipeline drew it) and normalised to data_cfg.dtype."""
    chex.assert_type(batch["image"], jnp.uint8)
    x = batch["image"].astype(jnp.float32)
    if "jitter" in batch:
        x = color_jitter(x, batch["jitter"])
    return normalize(x, data_cfg.mean, data_cfg.std, data_cfg.dtype)
