"""Vision backbone registry: build_backbone(name, dtype, **kwargs) -> module(images, train) -> [B, D].

Names: resnet10..resnet101 (see resnet.py: kwargs stem, width, zero_init_residual,
im2col_max_size, ...), vit_ti16, vit_s16, vit_b16 (see vit.py: kwargs pool_type, posemb, dropout,
depth, width, ...) and efficientnet_lite0..lite4 (see efficientnet.py: kwargs drop_path_rate, remat).
Every backbone returns a float32 pooled feature [B, D]; `dtype` is the compute dtype,
parameters are float32 unless `param_dtype` is given.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from marnet_jax.models import efficientnet, resnet, vit

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet10": resnet.ResNet10,
    "resnet18": resnet.ResNet18,
    "resnet34": resnet.ResNet34,
    "resnet50": resnet.ResNet50,
    "resnet101": resnet.ResNet101,
    "vit_ti16": functools.partial(vit.vit_variant, "Ti", patch_size=16),
    "vit_s16": functools.partial(vit.vit_variant, "S", patch_size=16),
    "vit_b16": functools.partial(vit.vit_variant, "B", patch_size=16),
    **{
        f"efficientnet_{v}": functools.partial(efficientnet.EfficientNetLite, variant=v)
        for v in efficientnet.LITE_VARIANTS
    },
}


def build_backbone(name: str, dtype: Any = jnp.float32, **kwargs: Any) -> nn.Module:
    """Returns the named backbone with compute dtype `dtype`; kwargs override its fields."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    try:
        return BACKBONES[name](dtype=dtype, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise ValueError(
            f"backbone {name!r} does not take model.backbone_kwargs {dict(kwargs)}: {e}"
        ) from None


def feature_dim(name: str, **kwargs: Any) -> int:
    """Size D of the pooled feature of build_backbone(name, **kwargs), without building params."""
    return build_backbone(name, **kwargs).feature_dim
