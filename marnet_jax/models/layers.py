"""Initializers and dropout that draw their random numbers as flat vectors; the plain NHWC conv.

With partitionable threefry (JAX's default), XLA on CPU compiles the sampling of a rank-3 or rank-4
array (a conv kernel [kh, kw, in, out], a position embedding [1, N, D], a dropout mask [B, L, D])
several times slower than that of a vector of the same size: a few seconds per array on a 2-core
machine, which adds up to most of a ResNet's init compile time. Sampling a vector and reshaping gives
the same distribution (elements are i.i.d.); only the particular values for a given key differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Initializer = Callable[..., Array]

# std of a standard normal truncated to [-2, 2] (as in jax.nn.initializers.variance_scaling).
_TRUNCATED_STD = 0.87962566103423978


def variance_scaling(scale: float, mode: str, distribution: str) -> Initializer:
    """jax.nn.initializers.variance_scaling for kernels laid out [..., in, out], sampled flat.

    Fans as in JAX: receptive field = prod(shape[:-2]); fan_in = receptive * shape[-2], fan_out =
    receptive * shape[-1]. distribution: 'truncated_normal' (alias 'normal', as in JAX),
    'untruncated_normal' or 'uniform'.
    """
    if mode not in ("fan_in", "fan_out", "fan_avg"):
        raise ValueError(f"unknown mode {mode!r}")
    if distribution not in ("truncated_normal", "normal", "untruncated_normal", "uniform"):
        raise ValueError(f"unknown distribution {distribution!r}")

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        receptive = math.prod(shape[:-2])
        fan_in, fan_out = receptive * shape[-2], receptive * shape[-1]
        denom = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        std = math.sqrt(scale / denom)
        n = (math.prod(shape),)
        if distribution in ("truncated_normal", "normal"):
            x = jax.random.truncated_normal(key, -2.0, 2.0, n, dtype) * (std / _TRUNCATED_STD)
        elif distribution == "untruncated_normal":
            x = jax.random.normal(key, n, dtype) * std
        else:
            x = jax.random.uniform(key, n, dtype, -1.0, 1.0) * (std * math.sqrt(3.0))
        return jnp.reshape(x, shape)

    return init


def normal(stddev: float) -> Initializer:
    """N(0, stddev^2) of any shape, sampled flat."""

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jnp.reshape(jax.random.normal(key, (math.prod(shape),), dtype) * stddev, shape)

    return init


class Dropout(nn.Module):
    """Inverted dropout like nn.Dropout (rng stream 'dropout'), mask sampled flat."""

    rate: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        if self.rate >= 1.0:
            return jnp.zeros_like(x)
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.size,))
        mask = jnp.reshape(mask, x.shape)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def conv_nhwc(x: Array, kernel: Array, stride: int, pad: int) -> Array:
    """XLA's NHWC x HWIO convolution with symmetric padding `pad` (torch's k // 2 layout)."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
