"""ResNet v1.5 backbones (ResNet-18/34/50/101) in Flax linen, laid out like torchvision.

The backbone maps images [B, H, W, 3] to a globally average-pooled float32 feature [B, D]
(D = 512 * width for ResNet-18/34, 2048 * width for ResNet-50/101). It has no classification head.

v1.5: in a Bottleneck block the stride sits on the 3x3 conv (as in torchvision), not on the first 1x1.
Convolutions have no bias; padding is explicit (k // 2 on each side) so strided convs and the max-pool
line up with PyTorch exactly (flax 'SAME' pads stride-2 layers asymmetrically). BatchNorm uses
momentum 0.9 and eps 1e-5, the same running-average update as torchvision's momentum 0.1 (torchvision
updates running_var with the unbiased batch variance, flax with the biased one: a factor n / (n - 1)).

Options:
  stem='imagenet': 7x7/2 conv + 3x3/2 max-pool (224 px inputs, pretrained weights).
  stem='small': 3x3/1 conv, no pool, for low-resolution inputs (32-96 px): at 64 px the stages run at
    64/32/16/8 instead of 16/8/4/2. stem_stride=2 makes it 3x3/2 (32/16/8/4 at 64 px, 4x cheaper).
  width: multiplier of the base width 64 (width=0.125 gives 8/16/32/64 channels: cheap test models).
  zero_init_residual: the last BN scale of every block starts at 0, so each block starts as identity.
  remat: recompute each residual block's activations in the backward pass instead of keeping them
    (nn.remat): less memory for big batches, about one more forward pass of compute.
  dtype: compute dtype (e.g. jnp.bfloat16); param_dtype: parameter dtype (float32 by default). BatchNorm
    statistics are computed in float32 whatever the compute dtype.
  conv_impl: 'xla' (lax.conv_general_dilated and XLA's autodiff), 'cpu' or 'auto' (the default: 'cpu'
    on the CPU backend, 'xla' elsewhere). 'cpu' is cpu_conv.conv2d: the same parameters
    and results, computed the way XLA's CPU backend runs fastest.

Parameter naming (collections 'params' and 'batch_stats'), torchvision name -> this module:
  conv1.weight                      -> conv_init/kernel            (OIHW -> HWIO: transpose(2, 3, 1, 0))
  bn1.{weight,bias}                 -> bn_init/{scale,bias}
  bn1.{running_mean,running_var}    -> batch_stats: bn_init/{mean,var}
  layer{s}.{b}.conv{k}.weight       -> layer{s}/block{b}/conv{k}/kernel     (k = 1, 2 (, 3))
  layer{s}.{b}.bn{k}.*              -> layer{s}/block{b}/bn{k}/*
  layer{s}.{b}.downsample.0.weight  -> layer{s}/block{b}/downsample_conv/kernel
  layer{s}.{b}.downsample.1.*       -> layer{s}/block{b}/downsample_bn/*
  fc.*                              -> (no head here)
  (s = 1..4 and b = 0.. as in torchvision; num_batches_tracked has no counterpart.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from marnet_jax.models import cpu_conv, layers

Array = jax.Array
Dtype = Any

# torchvision's conv init, kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2 / fan_out),
# sampled flat (layers.py: much faster to compile on CPU than a rank-4 draw).
conv_kernel_init = layers.variance_scaling(2.0, "fan_out", "untruncated_normal")

STEMS = ("imagenet", "small")


def conv2d(x: Array, kernel: Array, stride: int, pad: int, impl: str = "auto") -> Array:
    """NHWC x HWIO convolution with symmetric padding `pad`, computed the way `impl` says."""
    if cpu_conv.resolve_conv_impl(impl) == "cpu":
        return cpu_conv.conv2d(x, kernel, stride, pad)
    return layers.conv_nhwc(x, kernel, stride, pad)


class Conv2D(nn.Module):
    """Square bias-free conv with torch-style symmetric padding k // 2; param 'kernel' [k, k, in, out].

    Same parameter layout as nn.Conv(use_bias=False). impl: 'xla', 'cpu' or 'auto' (module docstring).
    """

    features: int
    kernel_size: int
    strides: int = 1
    impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = conv_kernel_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        chex.assert_rank(x, 4)
        k = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype
        )
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return conv2d(x, kernel, self.strides, k // 2, self.impl)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). Output channels = features."""

    features: int
    strides: int = 1
    conv: Callable[..., nn.Module] = Conv2D
    norm: Callable[..., nn.Module] = nn.BatchNorm
    zero_init_residual: bool = False

    expansion = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.conv(self.features, 3, self.strides, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, 3, 1, name="conv2")(y)
        y = self.norm(scale_init=last_scale, name="bn2")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = self.conv(self.features, 1, self.strides, name="downsample_conv")(x)
            x = self.norm(name="downsample_bn")(x)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 (ResNet-50/101). Output channels = 4 * features."""

    features: int
    strides: int = 1
    conv: Callable[..., nn.Module] = Conv2D
    norm: Callable[..., nn.Module] = nn.BatchNorm
    zero_init_residual: bool = False

    expansion = 4

    @nn.compact
    def __call__(self, x: Array) -> Array:
        last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        out = self.features * self.expansion
        y = self.conv(self.features, 1, 1, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, 3, self.strides, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(out, 1, 1, name="conv3")(y)
        y = self.norm(scale_init=last_scale, name="bn3")(y)
        if self.strides != 1 or x.shape[-1] != out:
            x = self.conv(out, 1, self.strides, name="downsample_conv")(x)
            x = self.norm(name="downsample_bn")(x)
        return nn.relu(x + y)


class ResNetStage(nn.Module):
    """One stage ('layer1'..'layer4'): blocks 'block0'.. ; the first one carries the stride."""

    block: type[nn.Module]
    num_blocks: int
    features: int
    strides: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(self.num_blocks):
            x = self.block(
                features=self.features,
                strides=self.strides if i == 0 else 1,
                conv=self.conv,
                norm=self.norm,
                zero_init_residual=self.zero_init_residual,
                name=f"block{i}",
            )(x)
        return x


class ResNet(nn.Module):
    """ResNet v1.5 feature extractor: images [B, H, W, C] -> pooled float32 features [B, D]."""

    stage_sizes: Sequence[int]
    block: type[nn.Module] = BasicBlock
    width: float = 1.0
    stem: str = "imagenet"
    stem_stride: int = (
        1  # stride of the small stem's 3x3 conv (2 halves every stage's map, 1/4 cost)
    )
    zero_init_residual: bool = False
    conv_impl: str = "auto"
    remat: bool = False  # nn.remat on every residual block (memory for compute)
    bn_axis_name: str | None = None  # only for pmap/shard_map; jit + sharding needs none
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def base_width(self) -> int:
        return max(1, round(64 * self.width))

    @property
    def feature_dim(self) -> int:
        """Size D of the pooled feature."""
        return self.base_width * 2 ** (len(self.stage_sizes) - 1) * self.block.expansion

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if self.stem not in STEMS:
            raise ValueError(f"unknown stem {self.stem!r}; expected one of {STEMS}")
        cpu_conv.resolve_conv_impl(
            self.conv_impl
        )  # a bad value fails here, before any layer is built
        chex.assert_rank(x, 4)
        batch = x.shape[0]
        conv = functools.partial(
            Conv2D,
            impl=self.conv_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            axis_name=self.bn_axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        x = jnp.asarray(x, self.dtype)
        if self.stem == "imagenet":
            x = conv(self.base_width, 7, 2, name="conv_init")(x)
            x = nn.relu(norm(name="bn_init")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = conv(self.base_width, 3, self.stem_stride, name="conv_init")(x)
            x = nn.relu(norm(name="bn_init")(x))
        block = nn.remat(self.block) if self.remat else self.block
        for i, num_blocks in enumerate(self.stage_sizes):
            x = ResNetStage(
                block=block,
                num_blocks=num_blocks,
                features=self.base_width * 2**i,
                strides=1 if i == 0 else 2,
                conv=conv,
                norm=norm,
                zero_init_residual=self.zero_init_residual,
                name=f"layer{i + 1}",
            )(x)
        chex.assert_type(x, self.dtype)
        feat = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        chex.assert_shape(feat, (batch, self.feature_dim))
        return feat


ResNet10 = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), block=BasicBlock)
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block=Bottleneck)
