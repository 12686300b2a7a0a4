"""The MARNet training loss.

L = CE(fused) + w_visual * CE(visual probe)
    + r(step) * [w_ema * L_EMA + w_mse * L_MSE + w_cdr * CE(cdr head) + w_aux * BCE(ingredient head)
                 + w_distill * T^2 KL(teacher_T || fused_T) + w_text * CE(text head)]

r(step) ramps the auxiliary terms up linearly over loss.aux_rampup_steps (1 without a ramp). The
visual probe reads stop-gradient features, so its term only trains the probe and never changes the
method. A module that is off contributes 0.0 and its key is still in `parts`.
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
PART_KEYS = ("ce", "ema", "mse", "ce_cdr", "ce_visual", "aux", "distill", "text")
# The auxiliary terms, each with its weight in config.loss; r(step) scales them all.
AUX_WEIGHTS = {
    "ema": "w_ema",
    "mse": "w_mse",
    "ce_cdr": "w_cdr",
    "aux": "w_aux",
    "distill": "w_distill",
    "text": "w_text",
}


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


def distillation_loss(
    logits: Array, teacher_logits: Array, temperature: float, mask: Array | None = None
) -> Array:
    """T^2 * KL(softmax(teacher / T) || softmax(logits / T)), averaged over (masked) examples
    (Hinton et al. 2015; generalized distillation, Lopez-Paz et al. 2016). The T^2 keeps the
    gradient's scale independent of T."""
    chex.assert_equal_shape([logits, teacher_logits])
    t = float(temperature)
    p_teacher = jax.nn.softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    log_student = jax.nn.log_softmax(logits.astype(jnp.float32) / t, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(p_teacher * (log_teacher - log_student), axis=-1) * t * t
    if mask is None:
        return jnp.mean(kl)
    mask = mask.astype(jnp.float32)
    return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def rampup(step: Array | int, steps: int) -> Array:
    """r(step): linear from 0 at step 0 to 1 at `steps` (1 throughout when steps <= 0)."""
    if steps <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(jnp.asarray(step, jnp.float32) / float(steps), 1.0)


def weighted_terms(
    parts: Mapping[str, Array], loss_cfg: ml_collections.ConfigDict, aux_scale: Array | float = 1.0
) -> dict[str, Array]:
    """Each term as it enters the total: 'ce', 'ce_visual' at their weights, the auxiliary terms
    at theirs times `aux_scale` (r(step))."""
    out = {"ce": parts["ce"]}
    for key in PART_KEYS[1:]:  # in PART_KEYS' order: the sum is the same in every release
        if key == "ce_visual":
            out[key] = loss_cfg.w_visual * parts[key]
        else:
            out[key] = aux_scale * loss_cfg.get(AUX_WEIGHTS[key], 0.0) * parts[key]
    return out


def marnet_loss(
    outputs: Mapping[str, Array],
    labels: Array,
    loss_cfg: ml_collections.ConfigDict,
    mask: Array | None = None,
    aux_scale: Array | float = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """Total loss and its unweighted parts (PART_KEYS).

    Which terms are on is read from `outputs` (the keys MARNet's train call returns): 'ema_z_v' /
    'ema_z_s' / 'ema_logit_scale' for EMA, 'cdr_pred' / 'cdr_target' / 'cdr_logits' for CDR,
    'aux_logits' / 'aux_targets' for the ingredient head, 'teacher_logits' for distillation,
    'text_logits' for the text head. `mask` (float [B], optional) drops padded examples from every
    term, including the contrastive negatives. `aux_scale` is r(step) (`rampup`).
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
    if "teacher_logits" in outputs:
        parts["distill"] = distillation_loss(
            outputs["logits"], outputs["teacher_logits"], loss_cfg.distill_temperature, mask
        )
    if "text_logits" in outputs:
        parts["text"] = cross_entropy(outputs["text_logits"], labels, ls, mask)
    total = sum(weighted_terms(parts, loss_cfg, aux_scale).values())
    return jnp.asarray(total, jnp.float32), parts
