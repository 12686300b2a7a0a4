"""Optimizer and learning-rate schedule from `config.optim`, with optax.

Weight decay skips biases, normalisation scales, position embeddings, class tokens and the ingredient
encoder's word vectors; the vision backbone
can train at a fraction of the heads' learning rate (a pretrained backbone should move slowly).
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


def backbone_mask(params: Any) -> Any:
    """True for parameters of the vision backbone (top-level collection 'backbone')."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _path_names(p)[:1] == ["backbone"], params)


def make_optimizer(
    optim_cfg: ml_collections.ConfigDict, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, schedule). `num_steps` counts train steps (micro-batches)."""
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
    parts = []
    if optim_cfg.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
    parts.append(base)
    if optim_cfg.backbone_lr_mult != 1.0:
        parts.append(optax.masked(optax.scale(optim_cfg.backbone_lr_mult), backbone_mask))
    tx = optax.chain(*parts)
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum)
    return tx, schedule
