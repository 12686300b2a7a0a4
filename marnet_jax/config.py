"""The full experiment config: every section with its documented defaults.

Files under configs/ start from `base_config()` and override what their experiment needs. The data, model
and loss sections are documented where they are defined (marnet_jax/data/config.py,
marnet_jax/models/config.py); the trainer's sections are documented here.
"""

from __future__ import annotations

import ml_collections

from marnet_jax.data.config import get_data_config
from marnet_jax.models.config import get_loss_config, get_model_config


def train_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            num_steps=1000,  # train steps (micro-batches); the schedule spans num_steps / grad_accum_steps
            batch_size=64,  # global batch over all processes and devices
            eval_batch_size=256,  # global; the last batch is padded and masked
            log_every=50,  # steps between train-metric lines (JSONL, TensorBoard, progress bar)
            eval_every=0,  # steps between validation passes; 0 = only after training
            stop_check_every=10,  # steps between cross-process checks for SIGTERM (multi-host only)
        )
    )


def optim_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name="adamw",  # 'adamw' | 'sgd' (with momentum)
            lr=1e-3,  # peak learning rate of the heads (and of a backbone trained from scratch)
            warmup_steps=100,  # linear warm-up in optimizer updates, then cosine decay
            final_lr_fraction=0.0,  # the cosine decays to lr * final_lr_fraction
            b1=0.9,  # AdamW
            b2=0.999,  # AdamW
            momentum=0.9,  # SGD
            nesterov=True,  # SGD
            weight_decay=0.05,  # decoupled; not applied to biases, norm scales, posembs, tokens
            grad_clip_norm=1.0,  # global-norm clipping; 0 disables
            backbone_lr_mult=1.0,  # backbone lr = lr * this; use ~0.1 with a pretrained backbone
            grad_accum_steps=1,  # >1 accumulates gradients over this many micro-batches (optax.MultiSteps)
        )
    )


def mesh_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            num_devices=-1,  # devices to use: -1 = all; N = the first N (single-process runs only)
            data=-1,  # size of the pure data-parallel axis; -1 = all devices not used by fsdp
            fsdp=1,  # size of the axis that also shards parameters and optimizer state
            # (regex over the parameter path, action): first match wins; 'fsdp' shards the largest
            # divisible dimension, 'replicate' keeps the array whole.
            fsdp_rules=[(".*", "fsdp")],
            fsdp_min_size=2**18,  # arrays with fewer elements stay replicated
        )
    )


def checkpoint_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            every_steps=500,  # also saved at the end and on SIGTERM; 0 = only those
            keep=3,  # newest checkpoints kept
            async_save=True,  # write in the background while training continues
            # resume from this step instead of the newest (-1), e.g. when the newest is damaged;
            # checkpoints after it are moved to <workdir>/checkpoints_set_aside/. Acts once: a
            # later run with the same value resumes from the newest checkpoint.
            resume_step=-1,
        )
    )


# name -> (use_ema, use_cdr, use_aux): the paper's ablation grid from one code path, plus 'aux', the
# visual-only model with an ingredient-prediction head (the simplest use of the same text).
VARIANTS = {
    "baseline": (False, False, False),
    "ema": (True, False, False),
    "cdr": (False, True, False),
    "full": (True, True, False),
    "aux": (False, False, True),
}


def apply_variant(config: ml_collections.ConfigDict, name: str | None) -> ml_collections.ConfigDict:
    """Sets the variant: 'baseline' (visual only), 'ema', 'cdr', 'full' or 'aux'."""
    name = name or "full"
    if name not in VARIANTS:
        raise ValueError(f"Unknown variant {name!r}; expected one of {sorted(VARIANTS)}.")
    config.model.use_ema, config.model.use_cdr, config.model.use_aux = VARIANTS[name]
    config.variant = name
    return config


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.variant = (
        "full"  # informational: set by apply_variant (baseline | ema | cdr | full | aux)
    )
    config.seed = 0  # one seed for initialisation, data order, augmentation and diffusion noise
    config.data = get_data_config()
    config.model = get_model_config()
    config.loss = get_loss_config()
    config.train = train_config()
    config.optim = optim_config()
    config.mesh = mesh_config()
    config.checkpoint = checkpoint_config()
    return config
