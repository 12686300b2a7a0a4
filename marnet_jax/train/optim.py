"""Optimizer and learning-rate schedule from `config.optim`, with optax.

Weight decay skips biases, normalisation scales, position embeddings, class tokens and the ingredient
encoder's word vectors. Parameters fall in three groups, each with its learning-rate multiplier:
the vision backbone (a pretrained one should move slowly), the text side (the ingredient encoder, g_s
and the text head: a trained teacher stays fixed at 0) and the heads (everything else). A group at
multiplier 0 is frozen: its gradients are zeroed before clipping (they do not count in the global
norm) and its update after the optimizer (AdamW's decoupled weight decay included), so it stays
bit-identical.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

# ingredient_words: pretrained word vectors are not pulled towards zero (and frozen ones must not move)
_NO_DECAY_NAMES = ("bias", "scale", "pos_embedding", "cls", "logit_scale", "ingredient_words")


def make_schedule(optim_cfg: ml_collections.ConfigDict, num_updates: int) -> optax.Schedule:
    """Linear warm-up from 0 then cosine decay to `final_lr_fraction * lr` at `num_updates`."""
    warmup = min(int(optim_cfg.warmup_steps), max(num_updates - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim_cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(num_updates, warmup + 1),
        end_value=optim_cfg.lr * optim_cfg.final_lr_fraction,
    )


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def decay_mask(params: Any) -> Any:
    """True for matrices and kernels; False for biases, norm scales, posembs, tokens and scalars."""

    def one(path, leaf):
        names = _path_names(path)
        return leaf.ndim > 1 and not any(n in _NO_DECAY_NAMES for n in names)

    return jax.tree_util.tree_map_with_path(one, params)


GROUPS = ("backbone", "text", "heads")
_TEXT_PREFIXES = (["text_encoder"], ["text_head"], ["ema", "g_s"])


def param_group(names: list[str]) -> str:
    """'backbone' | 'text' | 'heads' for a parameter path (its key names)."""
    if names[:1] == ["backbone"]:
        return "backbone"
    if any(names[: len(p)] == p for p in _TEXT_PREFIXES):
        return "text"
    return "heads"


def group_mask(*groups: str):
    """A mask function: True for parameters in any of `groups`."""
    for g in groups:
        if g not in GROUPS:
            raise ValueError(f"unknown parameter group {g!r}; expected one of {GROUPS}")
    return lambda params: jax.tree_util.tree_map_with_path(
        lambda p, _: param_group(_path_names(p)) in groups, params
    )


def lr_multipliers(optim_cfg: ml_collections.ConfigDict) -> dict[str, float]:
    """{group: learning-rate multiplier} from config.optim (0 = frozen)."""
    mults = {
        "backbone": float(optim_cfg.backbone_lr_mult),
        "text": float(optim_cfg.text_lr_mult),
        "heads": float(optim_cfg.heads_lr_mult),
    }
    for group, m in mults.items():
        if m < 0:
            raise ValueError(f"config.optim.{group}_lr_mult={m}: expected >= 0 (0 freezes).")
    return mults


def make_optimizer(
    optim_cfg: ml_collections.ConfigDict, num_steps: int, frozen: tuple[str, ...] = ()
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, schedule). `num_steps` counts train steps (micro-batches); the groups in
    `frozen` (and those at multiplier 0) are frozen."""
    accum = int(optim_cfg.grad_accum_steps)
    if accum < 1:
        raise ValueError(f"config.optim.grad_accum_steps must be >= 1, got {accum}.")
    schedule = make_schedule(optim_cfg, max(num_steps // accum, 1))
    name = optim_cfg.name
    if name == "adamw":
        base = optax.adamw(
            schedule,
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            weight_decay=optim_cfg.weight_decay,
            mask=decay_mask,
        )
    elif name == "sgd":
        base = optax.chain(
            optax.add_decayed_weights(optim_cfg.weight_decay, mask=decay_mask),
            optax.sgd(schedule, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov),
        )
    else:
        raise ValueError(f"config.optim.name must be 'adamw' or 'sgd', got {name!r}.")
    mults = lr_multipliers(optim_cfg)
    frozen = [g for g, m in mults.items() if m == 0.0 or g in frozen]
    freeze = [optax.masked(optax.set_to_zero(), group_mask(*frozen))] if frozen else []
    parts = list(freeze)
    if optim_cfg.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
    parts.append(base)
    for group, m in mults.items():
        if group not in frozen and m != 1.0:
            parts.append(optax.masked(optax.scale(m), group_mask(group)))
    tx = optax.chain(*parts, *freeze)
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum)
    return tx, schedule
