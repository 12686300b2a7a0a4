"""MARNet on Ingredient-101 (Food-101 images, 101 dishes, per-class ingredient lists), 224 px, one host.

Build the dataset once (see `python -m marnet_jax.data.build --help` and README), then:

    python -m marnet_jax.main --config configs/ingredient101.py --workdir runs/i101_r50 \
        --config.data.data_dir=DATA_DIR
    python -m marnet_jax.main --config configs/ingredient101.py:vit_b16 --workdir runs/i101_vit \
        --config.data.builder_config=simplified

Arg: 'BACKBONE[,VARIANT]', BACKBONE resnet50 (default) | vit_b16, VARIANT baseline | ema | cdr | full.
Batch 256, about 30 epochs (the schedule assumes ~68k training images: train + val are Food-101's
75,750 training images; the build prints the exact split sizes), AdamW with warm-up + cosine, bf16 compute.
The ingredient lists are per class, so every image of a class shares its text: the EMA loss treats
same-class pairs as positives (ema_class_aware), and prediction never reads text.
Result: not measured here (the release cannot be downloaded on the project's machines).
"""

import ml_collections

from configs.paper_scale import paper_scale_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = paper_scale_config("ingredient101", arg, train_images=68_175)
    config.loss.ema_class_aware = True
    return config
