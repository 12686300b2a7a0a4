"""Vision Transformer backbones (ViT-Ti/16, S/16, B/16), written the big_vision way, in Flax linen.

images [B, H, W, 3] -> patch-embedding conv -> + position embedding -> (class token) -> pre-LN encoder
blocks (self-attention + MLP) -> final LayerNorm -> pool ('tok': class token, 'gap': mean over patches)
-> float32 feature [B, width]. No classification head.

The learned position embedding covers the patch grid only and is added before the class token is
prepended (as in big_vision); its size is fixed at init by the image size (h/p * w/p positions).
`dtype` is the compute dtype (bf16 works; the attention softmax runs in float32), `param_dtype` the
parameter dtype (float32 by default). `remat=True` recomputes each block in the backward pass (memory).

Parameter naming ('params'), identical to big_vision's ViT (without 'head' / 'pre_logits'):
  embedding/{kernel [p, p, 3, D], bias}
  pos_embedding [1, N, D]                       (posemb='learn')
  cls [1, 1, D]                                 (pool_type='tok')
  Transformer/encoderblock_{i}/LayerNorm_0/{scale, bias}
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value}/{kernel [D, H, D/H],
      bias [H, D/H]}, .../out/{kernel [H, D/H, D], bias [D]}
  Transformer/encoderblock_{i}/LayerNorm_1/{scale, bias}
  Transformer/encoderblock_{i}/MlpBlock_0/{Dense_0, Dense_1}/{kernel, bias}
  Transformer/encoder_norm/{scale, bias}
timm (vit_*_patch16_*) -> this module:
  patch_embed.proj.weight (O, I, p, p) -> embedding/kernel (transpose(2, 3, 1, 0)); .bias -> embedding/bias
  pos_embed[:, 1:] -> pos_embedding;  cls_token + pos_embed[:, :1] -> cls (the class token is a constant,
      so folding its position embedding into it is exact)
  blocks.{i}.norm1 / norm2 -> encoderblock_{i}/LayerNorm_0 / LayerNorm_1 (weight -> scale)
  blocks.{i}.attn.qkv.weight [3D, D] -> split in q, k, v; each .T.reshape(D, H, D/H); qkv.bias -> [H, D/H]
  blocks.{i}.attn.proj.weight [D, D] -> out/kernel = weight.T.reshape(H, D/H, D); proj.bias -> out/bias
  blocks.{i}.mlp.fc1 / fc2 -> MlpBlock_0/Dense_0 / Dense_1 (weight.T);  norm -> Transformer/encoder_norm
  timm uses exact GELU: build with approximate_gelu=False (big_vision checkpoints use the tanh form).
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from marnet_jax.models import layers

Array = jax.Array
Dtype = Any

POOL_TYPES = ("tok", "gap")
POSEMBS = ("learn", "sincos2d")

# name -> (width, depth, mlp_dim, num_heads)
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
}


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [1, h * w, width] (MoCo v3 / big_vision)."""
    if width % 4:
        raise ValueError(f"width must be a multiple of 4 for sincos2d, got {width}")
    y, x = np.mgrid[:h, :w]
    omega = np.arange(width // 4) / max(width // 4 - 1, 1)
    omega = 1.0 / (temperature**omega)
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return pe[None].astype(np.float32)


class MlpBlock(nn.Module):
    """Dense -> GELU -> dropout -> Dense (back to the input width)."""

    mlp_dim: int
    dropout: float = 0.0
    deterministic: bool = True
    approximate_gelu: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = functools.partial(
            nn.Dense,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        d = x.shape[-1]
        x = dense(self.mlp_dim, name="Dense_0")(x)
        x = nn.gelu(x, approximate=self.approximate_gelu)
        x = layers.Dropout(rate=self.dropout)(x, deterministic=self.deterministic)
        return dense(d, name="Dense_1")(x)


class Encoder1DBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)). Optional key mask [B, L]."""

    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    deterministic: bool = True
    approximate_gelu: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        ln = functools.partial(nn.LayerNorm, dtype=self.dtype, param_dtype=self.param_dtype)
        attn_mask = None if mask is None else nn.make_attention_mask(mask, mask)
        y = ln(name="LayerNorm_0")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            kernel_init=nn.initializers.xavier_uniform(),
            deterministic=self.deterministic,
            force_fp32_for_softmax=True,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="MultiHeadDotProductAttention_0",
        )(y, y, mask=attn_mask)
        y = layers.Dropout(rate=self.dropout)(y, deterministic=self.deterministic)
        x = x + y
        y = ln(name="LayerNorm_1")(x)
        y = MlpBlock(
            mlp_dim=self.mlp_dim,
            dropout=self.dropout,
            deterministic=self.deterministic,
            approximate_gelu=self.approximate_gelu,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="MlpBlock_0",
        )(y)
        y = layers.Dropout(rate=self.dropout)(y, deterministic=self.deterministic)
        return x + y


class Encoder(nn.Module):
    """Stack of `depth` blocks 'encoderblock_{i}' followed by LayerNorm 'encoder_norm'."""

    depth: int
    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    deterministic: bool = True
    remat: bool = False
    approximate_gelu: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        block_cls = nn.remat(Encoder1DBlock) if self.remat else Encoder1DBlock
        for i in range(self.depth):
            x = block_cls(
                mlp_dim=self.mlp_dim,
                num_heads=self.num_heads,
                dropout=self.dropout,
                deterministic=self.deterministic,
                approximate_gelu=self.approximate_gelu,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"encoderblock_{i}",
            )(x, mask)
        return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="encoder_norm")(x)


class ViT(nn.Module):
    """ViT feature extractor: images [B, H, W, C] -> pooled float32 features [B, width]."""

    patch_size: int = 16
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    pool_type: str = "tok"
    posemb: str = "learn"
    dropout: float = 0.0
    remat: bool = False
    approximate_gelu: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def feature_dim(self) -> int:
        """Size D of the pooled feature."""
        return self.width

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"unknown pool_type {self.pool_type!r}; expected one of {POOL_TYPES}")
        if self.posemb not in POSEMBS:
            raise ValueError(f"unknown posemb {self.posemb!r}; expected one of {POSEMBS}")
        chex.assert_rank(x, 4)
        b, height, width_px, _ = x.shape
        p = self.patch_size
        if height % p or width_px % p:
            raise ValueError(f"image size {height}x{width_px} is not a multiple of patch {p}")
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(
            self.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            kernel_init=layers.variance_scaling(1.0, "fan_in", "truncated_normal"),  # lecun_normal
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="embedding",
        )(x)
        _, h, w, c = x.shape
        x = jnp.reshape(x, (b, h * w, c))
        if self.posemb == "learn":
            pe = self.param(
                "pos_embedding",
                layers.normal(stddev=1 / np.sqrt(c)),
                (1, h * w, c),
                self.param_dtype,
            )
        else:
            pe = posemb_sincos_2d(h, w, c)
        x = x + jnp.asarray(pe, self.dtype)
        if self.pool_type == "tok":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c), self.param_dtype)
            x = jnp.concatenate([jnp.tile(jnp.asarray(cls, self.dtype), (b, 1, 1)), x], axis=1)
        x = layers.Dropout(rate=self.dropout)(x, deterministic=not train)
        x = Encoder(
            depth=self.depth,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout=self.dropout,
            deterministic=not train,
            remat=self.remat,
            approximate_gelu=self.approximate_gelu,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="Transformer",
        )(x)
        chex.assert_type(x, self.dtype)
        x = x[:, 0] if self.pool_type == "tok" else jnp.mean(x, axis=1)
        feat = x.astype(jnp.float32)
        chex.assert_shape(feat, (b, self.width))
        return feat


def vit_variant(variant: str, patch_size: int = 16, **kwargs: Any) -> ViT:
    """ViT of a named size ('Ti', 'S', 'B'); kwargs override any field (e.g. depth for tests)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; expected one of {sorted(VARIANTS)}")
    width, depth, mlp_dim, num_heads = VARIANTS[variant]
    fields = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
    fields.update(kwargs)
    return ViT(patch_size=patch_size, **fields)
