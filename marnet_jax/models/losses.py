"""The MARNet training loss.

L = CE(fused) + w_ema * L_EMA + w_mse * L_MSE + w_cdr * CE(cdr head) + w_visual * CE(visual probe)
    + w_aux * BCE(ingredient head) (the `aux` reference only).

The visual probe reads stop-gradient features, so its term only trains the probe and never changes
the method. A module that is off contributes 0.0 and its key is still in `parts`.
"""

from __future__ import annotations

from collections.abc import Mapping

import chex
import jax
import jax.numpy as jnp
import ml_collections
import optax

from marnet_jax.models.alignment import ema_loss
from marnet_jax.models.diffusion import mse_loss

Array = jax.Array
PART_KEYS = ("ce", "ema", "mse", "ce_cdr", "ce_visual", "aux")


def cross_entropy(
    logits: Array, labels: Array, label_smoothing: float = 0.0, mask: Array | None = None
) -> Array:
    """Mean softmax cross-entropy (float32) of int labels [B]; optional label smoothing, mask."""
    chex.assert_rank([logits, labels], [2, 1])
    chex.assert_equal_shape_prefix([logits, labels], 1)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    if mask is None:
        return jnp.mean(ce)
    mask = mask.astype(jnp.float32)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def multilabel_bce(logits: Array, targets: Array, mask: Array | None = None) -> Array:
    """Sigmoid binary cross-entropy averaged over labels and (masked) examples, float32 scalar."""
    chex.assert_equal_shape([logits, targets])
    bce = jnp.mean(
        optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32)),
        axis=-1,
    )
    if mask is None:
        return jnp.mean(bce)
    mask = mask.astype(jnp.float32)
    return jnp.sum(bce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def marnet_loss(
    outputs: Mapping[str, Array],
    labels: Array,
    loss_cfg: ml_collections.ConfigDict,
    mask: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Total loss and its unweighted parts ('ce', 'ema', 'mse', 'ce_cdr', 'ce_visual', 'aux').

    Which terms are on is read from `outputs` (the keys MARNet's train call returns): 'ema_z_v' /
    'ema_z_s' / 'ema_logit_scale' for EMA, 'cdr_pred' / 'cdr_target' / 'cdr_logits' for CDR,
    'aux_logits' / 'aux_targets' for the ingredient head. `mask`
    (float [B], optional) drops padded examples from every term, including the contrastive
    negatives.
    """
    ls = float(loss_cfg.label_smoothing)
    zero = jnp.zeros((), jnp.float32)
    parts = dict.fromkeys(PART_KEYS, zero)
    parts["ce"] = cross_entropy(outputs["logits"], labels, ls, mask)
    parts["ce_visual"] = cross_entropy(outputs["visual_logits"], labels, ls, mask)
    if "ema_z_v" in outputs:
        parts["ema"] = ema_loss(
            outputs["ema_z_v"],
            outputs["ema_z_s"],
            outputs["ema_logit_scale"],
            labels,
            form=loss_cfg.ema_form,
            class_aware=loss_cfg.ema_class_aware,
            mask=mask,
        )
    if "cdr_pred" in outputs:
        parts["mse"] = mse_loss(outputs["cdr_pred"], outputs["cdr_target"], mask)
        parts["ce_cdr"] = cross_entropy(outputs["cdr_logits"], labels, ls, mask)
    if "aux_logits" in outputs:
        parts["aux"] = multilabel_bce(outputs["aux_logits"], outputs["aux_targets"], mask)
    total = (
        parts["ce"]
        + loss_cfg.w_ema * parts["ema"]
        + loss_cfg.w_mse * parts["mse"]
        + loss_cfg.w_cdr * parts["ce_cdr"]
        + loss_cfg.w_visual * parts["ce_visual"]
        + loss_cfg.w_aux * parts["aux"]
    )
    return total.astype(jnp.float32), parts
