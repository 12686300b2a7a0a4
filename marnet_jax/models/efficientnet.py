"""EfficientNet-Lite backbones (lite0..lite4) in Flax linen, laid out like the TensorFlow reference.

The backbone maps images [B, H, W, 3] to a globally average-pooled float32 feature [B, 1280]; it has
no classification head. Lite is EfficientNet without squeeze-and-excitation, with ReLU6 instead of
swish and with the stem (32 channels) and head (1280 channels) kept at their base size when the
model is scaled (Tan & Le's efficientnet_lite_builder.py).

Numerics as in the reference: convolutions pad like TensorFlow's 'SAME' (a stride-2 layer pads
less before than after), BatchNorm momentum 0.99 and eps 1e-3 (PyTorch ports: momentum 0.01), drop
connect (stochastic depth) on the residual branch at a rate growing linearly from 0 to
`drop_path_rate` over the blocks, drawn from the 'dropout' rng stream in training.

Options: width / depth come from the variant (LITE_VARIANTS); `remat` recomputes every block in the
backward pass; `conv_impl` as in resnet.py (on the CPU backend 'auto' computes depthwise convolutions
as sums of shifted slices, `depthwise_shifts`); `dtype` is the compute dtype, `param_dtype` the
parameters' (BatchNorm statistics are computed in float32 whatever the compute dtype).

Parameter naming, the PyTorch port's state dict (efficientnet_lite_pytorch; `_blocks.{i}` numbers
the blocks 0..N-1 across stages) -> this module:
  _conv_stem.weight                    -> stem_conv/kernel               (OIHW -> HWIO)
  _bn0.{weight,bias,running_*}         -> stem_bn/{scale,bias}, batch_stats stem_bn/{mean,var}
  _blocks.{i}._expand_conv.weight      -> block{i}/expand_conv/kernel    (absent where expand = 1)
  _blocks.{i}._bn0.*                   -> block{i}/expand_bn/*
  _blocks.{i}._depthwise_conv.weight   -> block{i}/depthwise_conv/kernel ([C, 1, k, k] -> [k, k, 1, C])
  _blocks.{i}._bn1.*                   -> block{i}/depthwise_bn/*
  _blocks.{i}._project_conv.weight     -> block{i}/project_conv/kernel
  _blocks.{i}._bn2.*                   -> block{i}/project_bn/*
  _conv_head.weight                    -> head_conv/kernel
  _bn1.*                               -> head_bn/*
  _fc.*                                -> (no classifier here)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from marnet_jax.models import cpu_conv, layers

Array = jax.Array
Dtype = Any

# (width multiplier, depth multiplier, native resolution, classifier dropout) per variant.
LITE_VARIANTS: dict[str, tuple[float, float, int, float]] = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3),
    "lite4": (1.4, 1.8, 300, 0.3),
}

# Stages of the base network: (repeats, kernel, stride, expand ratio, input channels, output channels).
STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FEATURES = 32
HEAD_FEATURES = 1280

# TF EfficientNet's conv init: N(0, 2 / fan_out), sampled flat (layers.py).
conv_kernel_init = layers.variance_scaling(2.0, "fan_out", "untruncated_normal")


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by `width`, rounded to a multiple of `divisor`, never down by more than 10 %."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def stage_plan(width: float, depth: float) -> list[tuple[int, int, int, int, int, int]]:
    """STAGES scaled to a variant; Lite keeps the first and last stages' repeats and the first
    stage's input (the stem) unscaled."""
    plan = []
    for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(STAGES):
        fixed = i in (0, len(STAGES) - 1)
        repeats = repeats if fixed else math.ceil(depth * repeats)
        cin = STEM_FEATURES if i == 0 else round_filters(cin, width)
        plan.append((repeats, kernel, stride, expand, cin, round_filters(cout, width)))
    return plan


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding of one spatial dimension: (before, after), the extra one after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv(nn.Module):
    """Bias-free convolution with TF 'SAME' padding; `depthwise` gives one filter per channel.
    conv_impl: as in resnet.py ('auto': cpu_conv.depthwise_shifts on the CPU backend)."""

    features: int
    kernel_size: int
    strides: int = 1
    depthwise: bool = False
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = conv_kernel_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        chex.assert_rank(x, 4)
        k, cin = self.kernel_size, x.shape[-1]
        if self.depthwise and self.features != cin:
            raise ValueError(f"a depthwise conv keeps the channels: {cin} in, {self.features} out")
        shape = (k, k, 1 if self.depthwise else cin, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        padding = tuple(same_padding(x.shape[d], k, self.strides) for d in (1, 2))
        if self.depthwise and cpu_conv.resolve_conv_impl(self.conv_impl) == "cpu":
            return cpu_conv.depthwise_shifts(x, kernel, self.strides, padding)
        return lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(self.strides, self.strides),
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=cin if self.depthwise else 1,
        )


def drop_path(x: Array, rate: float, rng: Array) -> Array:
    """Drops whole examples of a residual branch with probability `rate`, scaling the kept by
    1 / (1 - rate) (the reference's drop_connect)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],))
    return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))[:, None, None, None]


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand -> kxk depthwise (strided) -> 1x1 project, ReLU6, no SE.
    The identity is added where stride and channels allow it."""

    features: int
    kernel_size: int
    strides: int
    expand_ratio: int
    drop_path_rate: float
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        cin = x.shape[-1]
        hidden = cin * self.expand_ratio
        y = x
        if self.expand_ratio != 1:
            y = self.conv(hidden, 1, name="expand_conv")(y)
            y = nn.relu6(self.norm(use_running_average=not train, name="expand_bn")(y))
        y = self.conv(
            hidden, self.kernel_size, self.strides, depthwise=True, name="depthwise_conv"
        )(y)
        y = nn.relu6(self.norm(use_running_average=not train, name="depthwise_bn")(y))
        y = self.conv(self.features, 1, name="project_conv")(y)
        y = self.norm(use_running_average=not train, name="project_bn")(y)
        if self.strides != 1 or cin != self.features:
            return y
        if train and self.drop_path_rate > 0:
            y = drop_path(y, self.drop_path_rate, self.make_rng("dropout"))
        return x + y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite feature extractor: images [B, H, W, C] -> pooled float32 features [B, 1280]."""

    variant: str = "lite0"
    drop_path_rate: float = 0.2  # the reference's drop_connect_rate (all variants)
    remat: bool = False  # nn.remat on every block (memory for compute)
    conv_impl: str = "auto"  # depthwise convs: 'auto' | 'xla' | 'cpu' (SameConv)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def feature_dim(self) -> int:
        """Size D of the pooled feature."""
        return HEAD_FEATURES

    @property
    def resolution(self) -> int:
        """The variant's native (ImageNet-training) image size."""
        return self._variant()[2]

    def _variant(self) -> tuple[float, float, int, float]:
        if self.variant not in LITE_VARIANTS:
            raise ValueError(
                f"unknown EfficientNet-Lite variant {self.variant!r}; known: {sorted(LITE_VARIANTS)}"
            )
        return LITE_VARIANTS[self.variant]

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        width, depth, _, _ = self._variant()
        chex.assert_rank(x, 4)
        batch = x.shape[0]
        cpu_conv.resolve_conv_impl(self.conv_impl)  # a bad value fails here, before any layer
        conv = functools.partial(
            SameConv, conv_impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype
        )
        norm = functools.partial(
            nn.BatchNorm,
            momentum=0.99,
            epsilon=1e-3,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        x = jnp.asarray(x, self.dtype)
        x = conv(STEM_FEATURES, 3, 2, name="stem_conv")(x)
        x = nn.relu6(norm(use_running_average=not train, name="stem_bn")(x))
        # train (argument 2, counting the module) is a Python bool: static under remat.
        block = nn.remat(MBConv, static_argnums=(2,)) if self.remat else MBConv
        plan = stage_plan(width, depth)
        num_blocks = sum(stage[0] for stage in plan)
        i = 0
        for repeats, kernel, stride, expand, _, cout in plan:
            for r in range(repeats):
                x = block(
                    features=cout,
                    kernel_size=kernel,
                    strides=stride if r == 0 else 1,
                    expand_ratio=expand,
                    drop_path_rate=self.drop_path_rate * i / num_blocks,
                    conv=conv,
                    norm=norm,
                    name=f"block{i}",
                )(x, train)
                i += 1
        x = conv(HEAD_FEATURES, 1, name="head_conv")(x)
        x = nn.relu6(norm(use_running_average=not train, name="head_bn")(x))
        chex.assert_type(x, self.dtype)
        feat = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        chex.assert_shape(feat, (batch, self.feature_dim))
        return feat
