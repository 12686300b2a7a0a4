"""Shared set-up of the paper-scale configs (vireo_food172.py, ingredient101.py): 224 px, one host.

Not a config itself: `paper_scale_config(dataset, arg)` is called by those files. `arg` is
'BACKBONE[,VARIANT[,PROTOCOL]]' with BACKBONE 'resnet50' (default) or 'vit_b16', VARIANT a key of
VARIANTS (default full) and PROTOCOL a key of PROTOCOLS (default joint).
"""

import ml_collections

from marnet_jax.config import VARIANTS, apply_variant, base_config
from marnet_jax.data.config import get_data_config

BACKBONES = {
    # name -> (backbone kwargs, peak lr, weight decay, global batch)
    "resnet50": ({"stem": "imagenet"}, 1e-3, 0.05, 256),
    # approximate_gelu: True for big_vision weights, False for timm weights (exact GELU)
    "vit_b16": ({"pool_type": "tok", "dropout": 0.0, "approximate_gelu": True}, 3e-4, 0.05, 256),
}


def parse_arg(arg: str | None) -> tuple[str, str]:
    """'BACKBONE[,VARIANT[,PROTOCOL]]' -> (backbone, 'VARIANT[,PROTOCOL]' for apply_variant)."""
    backbone, _, rest = (arg or "resnet50").partition(",")
    variant, _, protocol = rest.partition(",")
    if backbone not in BACKBONES:
        raise ValueError(
            f"Unknown backbone {backbone!r} in config arg; expected one of {sorted(BACKBONES)}."
        )
    variant = variant or "full"
    if variant not in VARIANTS:
        raise ValueError(
            f"Unknown variant {variant!r} in config arg; expected one of {sorted(VARIANTS)}."
        )
    return backbone, f"{variant},{protocol}" if protocol else variant


def paper_scale_config(
    dataset: str, arg: str | None, train_images: int
) -> ml_collections.ConfigDict:
    """ResNet-50 or ViT-B/16 at 224 px, bf16 compute, AdamW, 30 epochs of `train_images`."""
    backbone, variant = parse_arg(arg)
    kwargs, lr, weight_decay, batch_size = BACKBONES[backbone]
    config = base_config()
    config.data = get_data_config(dataset)
    config.data.worker_count = 8  # JPEG decode + augmentation at 224 px needs several CPU processes
    config.data.dtype = "bfloat16"
    config.model.backbone = backbone
    config.model.backbone_kwargs = ml_collections.ConfigDict(kwargs)
    config.model.dtype = "bfloat16"
    config.model.embed_dim = 256
    config.model.cdr.hidden_dim = 1024
    config.model.fusion_dropout = 0.2
    config.train.batch_size = batch_size
    config.train.eval_batch_size = 512
    config.train.num_steps = 30 * train_images // batch_size  # 30 epochs
    config.train.log_every = 100
    config.train.eval_every = 2000
    config.optim.lr = lr
    config.optim.weight_decay = weight_decay
    config.optim.warmup_steps = 1000
    config.checkpoint.every_steps = 2000
    return apply_variant(config, variant)
