"""MARNet on Ingredient-101 (Food-101 images, 101 dishes, per-class ingredient lists), 224 px, one host.

Build the dataset once (see `python -m marnet_jax.build_dataset --help` and README), then:

    python -m marnet_jax.main --config configs/ingredient101.py --workdir runs/i101_r50 \
        --config.data.data_dir=DATA_DIR
    python -m marnet_jax.main --config configs/ingredient101.py:vit_b16 --workdir runs/i101_vit \
        --config.data.builder_config=simplified

Arg: 'BACKBONE[,VARIANT[,PROTOCOL]]', BACKBONE resnet50 (default) | vit_b16, VARIANT baseline | ema |
cdr | full (default) | aux | distill, PROTOCOL joint (default) | teacher (docs/method.md, "Training
protocol"; the settings tuned on synthetic_food are not carried over).
Batch 256, about 30 epochs (the schedule assumes ~68k training images: train + val are Food-101's
75,750 training images; the build prints the exact split sizes), AdamW with warm-up + cosine, bf16 compute.
The ingredient lists are per class, so every image of a class shares its text: the EMA loss treats
same-class pairs as positives (ema_class_aware), and prediction never reads text.

From ImageNet weights (a local file; README "Starting from ImageNet weights"), with the backbone at a
tenth of the heads' learning rate:

    python -m marnet_jax.main --config configs/ingredient101.py --workdir runs/i101_r50_in1k \
        --config.data.data_dir=DATA_DIR --config.model.init_from=/weights/resnet50.safetensors \
        --config.optim.backbone_lr_mult=0.1
    python -m marnet_jax.main --config configs/ingredient101.py:vit_b16 --workdir runs/i101_vit_in21k \
        --config.data.data_dir=DATA_DIR --config.optim.backbone_lr_mult=0.1 \
        --config.model.init_from=/weights/ViT-B_16.npz \
        --config.data.mean='(0.5, 0.5, 0.5)' --config.data.std='(0.5, 0.5, 0.5)'

(A big_vision / vision_transformer .npz keeps approximate_gelu=True; for timm weights add
--config.model.backbone_kwargs.approximate_gelu=False.)
Result: not measured here (the release cannot be downloaded on the project's machines).
"""

import ml_collections

from configs.paper_scale import paper_scale_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = paper_scale_config("ingredient101", arg, train_images=68_175)
    config.loss.ema_class_aware = True
    return config
