"""The full experiment config: every section with its documented defaults.

Files under configs/ start from `base_config()` and override what their experiment needs. The data, model
and loss sections are documented where they are defined (marnet_jax/data/config.py,
marnet_jax/models/config.py); the trainer's sections are documented here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import ml_collections

from marnet_jax.data.config import get_data_config
from marnet_jax.models.config import get_loss_config, get_model_config, upgrade_model_config


def train_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            num_steps=1000,  # train steps (micro-batches); the schedule spans num_steps / grad_accum_steps
            batch_size=64,  # global batch over all processes and devices
            eval_batch_size=256,  # global; the last batch is padded and masked
            log_every=50,  # steps between train-metric lines (JSONL, TensorBoard, progress bar)
            eval_every=0,  # steps between validation passes; 0 = only after training
            # steps between gradient diagnostics (steps.grad_diagnostics: each loss term's gradient
            # on the backbone, its norm and its cosine with the CE's; one forward and a backward
            # per term, on the step's own batch); 0 = off
            grad_diag_every=0,
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
            # per-group lr = lr * multiplier (optim.py); 0 freezes the group (no gradient, no
            # update, no weight decay). backbone: ~0.1 for a pretrained one; text: the ingredient
            # encoder, g_s and the text head (model.freeze_text freezes it whatever this says)
            backbone_lr_mult=1.0,
            text_lr_mult=1.0,
            heads_lr_mult=1.0,
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


def teacher_config() -> ml_collections.ConfigDict:
    """config.teacher: the text teacher stage (marnet_jax/train/teacher.py). It runs before the
    joint stage when the model has a text head (model.use_text_head, set by the 'teacher'
    protocol and the 'distill' variant): the ingredient encoder, g_s and the text head learn to
    classify from the ingredient lists alone (CE), with their own checkpoints."""
    return ml_collections.ConfigDict(
        dict(
            steps=3000,  # teacher steps (a small MLP on multi-hots: seconds on a CPU)
            batch_size=256,  # global batch of ingredient lists
            lr=1e-3,  # AdamW peak learning rate (warm-up, then cosine decay to 0)
            warmup_steps=100,
            weight_decay=0.0,
            log_every=500,  # steps between teacher metric lines (train loss, validation top-1)
            checkpoint_every=1000,  # also saved at the end and on SIGTERM
            # a finished run's workdir whose teacher to use instead of training one (its model's
            # text side must match this one's); '' = train the teacher here
            init_from="",
        )
    )


# name -> (use_ema, use_cdr, use_aux, use_distill): the paper's ablation grid from one code path,
# plus two references that use the same text more simply: 'aux', the visual-only model with an
# ingredient-prediction head, and 'distill', the visual-only model distilled from the text teacher.
VARIANTS = {
    "baseline": (False, False, False, False),
    "ema": (True, False, False, False),
    "cdr": (False, True, False, False),
    "full": (True, True, False, False),
    "aux": (False, False, True, False),
    "distill": (False, False, False, True),
}

# How a variant that reads the text is trained (docs/method.md, "Training protocol"):
# 'joint': both encoders from random initialisation, trained together; the alignment moves both.
# 'teacher': the text channel is trained first, alone (config.teacher), then frozen (no dropout, no
#   gradient, no update); the alignment targets are stop-gradient, so only the image side moves
#   (the lab's ATNet protocol).
# Config files may tune the rest of a protocol (classifier_input, align_fraction, weights, ramp).
PROTOCOLS: dict[str, dict[str, object]] = {
    "joint": {
        "model.use_text_head": False,
        "model.freeze_text": False,
        "model.align_moves": "both",
    },
    "teacher": {
        "model.use_text_head": True,
        "model.freeze_text": True,
        "model.align_moves": "image",
    },
}


def apply_variant(
    config: ml_collections.ConfigDict, arg: str | None, default_protocol: str = "joint"
) -> ml_collections.ConfigDict:
    """Sets the variant and the protocol from a config arg 'VARIANT[,PROTOCOL]': VARIANT one of
    VARIANTS (default 'full'), PROTOCOL one of PROTOCOLS (default `default_protocol`). The
    protocol matters only to variants that read the text; 'distill' always has its teacher."""
    name, _, protocol = (arg or "full").partition(",")
    protocol = protocol or default_protocol
    if name not in VARIANTS:
        raise ValueError(f"Unknown variant {name!r}; expected one of {sorted(VARIANTS)}.")
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}.")
    m = config.model
    m.use_ema, m.use_cdr, m.use_aux, m.use_distill = VARIANTS[name]
    protocol = "teacher" if m.use_distill else protocol
    # The baseline and aux never read the text: their runs are the same under every protocol.
    reads_text = m.use_ema or m.use_cdr or m.use_distill
    for field, value in PROTOCOLS[protocol if reads_text else "joint"].items():
        section, key = field.split(".")
        config[section][key] = value
    config.variant = name
    config.protocol = protocol
    return config


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.variant = "full"  # informational: set by apply_variant (a key of VARIANTS)
    config.protocol = "joint"  # informational: set by apply_variant (a key of PROTOCOLS)
    config.seed = 0  # one seed for initialisation, data order, augmentation and diffusion noise
    config.data = get_data_config()
    config.model = get_model_config()
    config.loss = get_loss_config()
    config.train = train_config()
    config.optim = optim_config()
    config.mesh = mesh_config()
    config.checkpoint = checkpoint_config()
    config.teacher = teacher_config()
    return config


def upgrade(config: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A run's config as an earlier layout wrote it (its config.json) -> this layout: the one place
    that knows the earlier layouts, applied wherever a saved config is read. Values are kept, moved
    model fields move (models.config.upgrade_model_config), and every field added since takes its
    default, which is what those runs did: the data section's from its dataset's preset, the
    protocol 'joint' (the only one before there were two)."""
    old = json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config))
    defaults = base_config().to_dict()
    defaults["data"] = get_data_config(old.get("data", {}).get("name", "synthetic_food")).to_dict()
    defaults["protocol"] = "joint"
    model = old.pop("model", None)
    upgraded = ml_collections.ConfigDict(_merged(defaults, old))
    if model is not None:
        upgraded.model = upgrade_model_config(ml_collections.ConfigDict(model))
    return upgraded


def _merged(defaults: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """`defaults` with `values` on top, section by section (nested dicts merged key by key)."""
    out = dict(defaults)
    for key, value in values.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out
