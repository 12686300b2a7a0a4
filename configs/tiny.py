"""Smallest end-to-end MARNet: the 'tiny' synthetic_food (32 px), a quarter-width ResNet-18. For tests.

    python -m marnet_jax.main --config configs/tiny.py --workdir /tmp/marnet_tiny

Trains 8 steps of batch 16 in seconds; its accuracy means nothing, only that every part runs.
"""

import ml_collections

from marnet_jax.config import apply_variant, base_config
from marnet_jax.data.config import get_data_config


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
    config = base_config()
    config.data = get_data_config("synthetic_food/tiny")
    config.data.read_threads = 0
    config.model.backbone = "resnet18"
    config.model.backbone_kwargs = ml_collections.ConfigDict({"stem": "small", "width": 0.125})
    config.model.embed_dim = 32
    config.model.ema.hidden_dim = 64
    config.model.cdr.num_steps = 20
    config.model.cdr.sample_steps = 4
    config.model.cdr.hidden_dim = 64
    config.model.cdr.num_blocks = 1
    config.model.cdr.time_embed_dim = 32
    config.train.num_steps = 8
    config.train.batch_size = 16
    config.train.eval_batch_size = 32
    config.train.log_every = 2
    config.optim.warmup_steps = 2
    config.checkpoint.every_steps = 4
    config.checkpoint.async_save = False
    apply_variant(config, arg)
    return config
