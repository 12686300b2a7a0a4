"""MARNet on synthetic_food (64 px) with a small-stem quarter-width ResNet-18, sized for 2 CPU cores.

    python -m marnet_jax.main --config configs/default.py --workdir /tmp/marnet_default
    python -m marnet_jax.main --config configs/default.py:baseline --workdir /tmp/marnet_baseline

Arg: the variant, baseline (visual only) | ema | cdr | full (default).
The first run builds synthetic_food/default into ~/tensorflow_datasets (about a minute).

Result: 450 steps, seeds 0/1/2, test split (3,000 images, 30 dishes, chance 3.3%), top-1 / top-5 in %,
on the project's 2-core CPU machine (no GPU, no other job), from `python -m marnet_jax.evidence.ablation
--config configs/default.py --workdir W` (all four variants, 25 min in all; docs/results.md):

    variant   fused top-1         fused top-5         visual probe top-1  CDR head top-1     train wall
    baseline  28.0 / 36.6 / 32.6  75.4 / 85.8 / 82.6  25.1 / 33.5 / 31.3  -                  108-112 s
    ema       26.3 / 30.1 / 31.8  76.0 / 77.6 / 81.8  25.7 / 27.4 / 31.0  -                  117-129 s
    cdr       29.2 / 36.5 / 30.9  79.2 / 88.3 / 81.0  29.3 / 36.4 / 30.7  8.7 / 11.7 / 10.4  129-139 s
    full      23.0 / 29.2 / 35.0  72.8 / 81.9 / 86.1  24.3 / 29.5 / 36.0  8.5 / 8.3 / 13.4   136-146 s

Mean +- std of fused top-1: full 29.0 +- 6.0, baseline 32.4 +- 4.3: at this budget neither EMA nor
CDR helps consistently (EMA alone is behind the baseline on every seed). The spread is mostly chance
in the optimisation: runs of the same seed whose gradients differ only by float rounding (XLA's own
conv gradients, conv_impl='xla', against the default CPU path, identical after step 1 and 3e-4 apart
after step 3) ended at 37.2 / 35.7 / 31.0 fused top-1 for full MARNet against the 23.0 / 29.2 / 35.0
above, and an earlier code version measured 34.9 / 32.4 / 33.6. Differences of a few points between
variants are within that noise. The CDR head reads x_CDR from the image-only DDIM-10 chain but is
trained on the one-step estimate s0_hat (near the text embedding); that mismatch keeps it at 8-13%.
(Train wall includes compilation and the validation/test passes.)
"""

import ml_collections

from marnet_jax.config import apply_variant, base_config
from marnet_jax.data.config import get_data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config()
    config.data = get_data_config("synthetic_food")
    # 3x3 stride-2 stem, no pool: the stages run at 32/16/8/4 px. The stride-1 small stem (64/32/16/8)
    # costs 4x more per step, which 2 CPU cores cannot afford in a few minutes.
    config.model.backbone = "resnet18"
    config.model.backbone_kwargs = ml_collections.ConfigDict(
        {"stem": "small", "stem_stride": 2, "width": 0.25}
    )
    config.model.embed_dim = 128
    # A denoiser as wide as the embedding: the fused classifier trains on the 10-step reverse chain, and
    # at width 256 that chain took half of each step on 2 CPU cores.
    config.model.cdr.hidden_dim = 128
    config.train.batch_size = 64
    config.train.eval_batch_size = 500
    config.train.num_steps = 450
    config.train.log_every = 25
    config.optim.lr = 2e-3
    config.optim.warmup_steps = 50
    config.checkpoint.every_steps = 200
    return apply_variant(config, arg)
