"""EMA (Embedding Matching Alignment): projection heads into a shared space and contrastive losses.

g_v and g_s map the visual feature x_v and the ingredient feature x_s into one `embed_dim` space.
The losses compare L2-normalised projections (cosine similarity), so they only shape directions;
x_EMA = g_v(x_v) is the raw projection that the fusion head reads.

Losses are pure functions of the normalised embeddings so that they can run inside any jit/sharding:
under a data-parallel mesh the arrays are global, so the negatives are the whole global batch.
"""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
_NEG = -1e9  # logit for excluded (masked) columns; finite so that 0 * _NEG stays 0 in float32


class ProjectionHead(nn.Module):
    """MLP head: [Dense(hidden) -> LayerNorm -> GELU] * (num_layers - 1) -> Dense(out_dim)."""

    out_dim: int
    hidden_dim: int = 512
    num_layers: int = 2
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        chex.assert_rank(x, 2)
        x = x.astype(self.dtype)
        for i in range(self.num_layers - 1):
            x = nn.Dense(self.hidden_dim, dtype=self.dtype, name=f"hidden_{i}")(x)
            x = nn.LayerNorm(dtype=self.dtype, name=f"norm_{i}")(x)
            x = nn.gelu(x)
        return nn.Dense(self.out_dim, dtype=self.dtype, name="out")(x)


class LogitScale(nn.Module):
    """Inverse temperature of the contrastive loss.

    Learnable: a log-scale parameter initialised at log(1 / temperature) and clipped at
    log(max_scale) as in CLIP (the clip keeps the softmax from becoming one-hot and the loss from
    blowing up). Fixed: a constant.
    """

    temperature: float = 0.07
    learnable: bool = True
    max_scale: float = 100.0

    @nn.compact
    def __call__(self) -> Array:
        init = math.log(1.0 / self.temperature)
        if not self.learnable:
            return jnp.asarray(1.0 / self.temperature, jnp.float32)
        log_scale = self.param("log_scale", nn.initializers.constant(init), (), jnp.float32)
        return jnp.exp(jnp.minimum(log_scale, math.log(self.max_scale)))


class EMAHeads(nn.Module):
    """g_v, g_s and the logit scale (the 'ema' parameter collection).

    Only the heads that are called get parameters: with EMA off but CDR on, only g_s exists (it
    defines the semantic target s0 = g_s(x_s)).
    """

    embed_dim: int = 128  # E: the shared space of g_v, g_s and of the diffusion
    hidden_dim: int = 512  # hidden width of MLP heads (num_layers > 1)
    # 1 = linear projection (CLIP); 2 = MLP (SimCLR-style). Linear: the fused classifier reads x_EMA,
    # and an MLP between it and the backbone slowed the backbone's training (docs/method.md).
    num_layers: int = 1
    temperature: float = 0.07  # initial (or fixed) InfoNCE temperature: CLIP's initial value
    learnable_temperature: bool = True  # learn log(1 / temperature) as in CLIP
    max_logit_scale: float = 100.0  # CLIP's cap on 1 / temperature: the softmax cannot saturate
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        head = lambda name: ProjectionHead(
            self.embed_dim, self.hidden_dim, self.num_layers, self.dtype, name=name
        )
        self.g_v = head("g_v")
        self.g_s = head("g_s")
        self.scale = LogitScale(
            self.temperature, self.learnable_temperature, self.max_logit_scale, name="temperature"
        )

    def project_visual(self, x_v: Array) -> Array:
        """x_EMA = g_v(x_v), float32 [B, embed_dim] (not normalised)."""
        return self.g_v(x_v).astype(jnp.float32)

    def project_semantic(self, x_s: Array) -> Array:
        """g_s(x_s), float32 [B, embed_dim] (not normalised)."""
        return self.g_s(x_s).astype(jnp.float32)

    def logit_scale(self) -> Array:
        """Inverse temperature, float32 scalar."""
        return self.scale()

    def __call__(self, x_v: Array, x_s: Array) -> tuple[Array, Array, Array]:
        return self.project_visual(x_v), self.project_semantic(x_s), self.logit_scale()


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
    """x / max(||x||, eps) along the last axis (float32).

    Written with rsqrt of the squared norm: the gradient of jnp.linalg.norm is NaN at 0, and an
    all-zero vector is common (an empty ingredient list through zero-initialised biases).
    """
    x = x.astype(jnp.float32)
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _masked_mean(values: Array, weights: Array) -> Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _positive_mask(batch: int, labels: Array | None, class_aware: bool) -> Array:
    """[B, B] float mask of positive pairs: the diagonal, plus same-label pairs when class-aware."""
    eye = jnp.eye(batch, dtype=jnp.float32)
    if not class_aware:
        return eye
    if labels is None:
        raise ValueError("class-aware InfoNCE needs labels")
    same = (labels[:, None] == labels[None, :]).astype(jnp.float32)
    return jnp.maximum(same, eye)


def _multi_positive_ce(logits: Array, positives: Array, col_mask: Array) -> Array:
    """Per row: -mean_{j in P(i)} log softmax(logits_i)_j; masked columns leave the softmax."""
    logits = jnp.where(col_mask[None, :] > 0, logits, _NEG)
    log_prob = jax.nn.log_softmax(logits, axis=-1)
    positives = positives * col_mask[None, :]
    return -jnp.sum(positives * log_prob, axis=-1) / jnp.maximum(jnp.sum(positives, axis=-1), 1.0)


def info_nce_loss(
    z_v: Array,
    z_s: Array,
    logit_scale: Array | float,
    labels: Array | None = None,
    *,
    class_aware: bool = False,
    mask: Array | None = None,
) -> Array:
    """Symmetric InfoNCE on cosine similarities (CLIP loss), optionally class-aware.

    Args:
      z_v, z_s: [B, E] embeddings (normalised here, so raw projections are fine).
      logit_scale: inverse temperature (scalar).
      labels: int [B]; needed when class_aware.
      class_aware: pairs that share a label count as positives (multi-positive InfoNCE: a row's
        loss is the average negative log-probability of its positives). Without it, two images of
        one class (or with one ingredient list, as on Ingredient-101) push each other's texts away.
      mask: optional float [B], 0 for padding: those rows are not averaged and those columns are
        no negatives.
    Returns:
      float32 scalar, the mean of the image->text and text->image losses.
    """
    chex.assert_rank([z_v, z_s], 2)
    chex.assert_equal_shape([z_v, z_s])
    batch = z_v.shape[0]
    mask = jnp.ones((batch,), jnp.float32) if mask is None else mask.astype(jnp.float32)
    sim = l2_normalize(z_v) @ l2_normalize(z_s).T  # [B_v, B_s]
    logits = jnp.asarray(logit_scale, jnp.float32) * sim
    pos = _positive_mask(batch, labels, class_aware)
    v2s = _multi_positive_ce(logits, pos, mask)
    s2v = _multi_positive_ce(logits.T, pos.T, mask)
    return 0.5 * (_masked_mean(v2s, mask) + _masked_mean(s2v, mask))


def cosine_loss(z_v: Array, z_s: Array, mask: Array | None = None) -> Array:
    """Mean pairwise 1 - cos(z_v_i, z_s_i). No negatives: other losses must prevent collapse."""
    chex.assert_equal_shape([z_v, z_s])
    cos = jnp.sum(l2_normalize(z_v) * l2_normalize(z_s), axis=-1)
    mask = jnp.ones_like(cos) if mask is None else mask.astype(jnp.float32)
    return _masked_mean(1.0 - cos, mask)


def ema_loss(
    z_v: Array,
    z_s: Array,
    logit_scale: Array | float,
    labels: Array | None,
    *,
    form: str = "infonce",
    class_aware: bool = True,
    mask: Array | None = None,
) -> Array:
    """L_EMA by name: 'infonce' (symmetric, optionally class-aware) | 'cosine' (1 - cos)."""
    if form == "infonce":
        return info_nce_loss(z_v, z_s, logit_scale, labels, class_aware=class_aware, mask=mask)
    if form == "cosine":
        return cosine_loss(z_v, z_s, mask)
    raise ValueError(f"unknown EMA loss form {form!r} (expected 'infonce' or 'cosine')")
