"""MARNet on Vireo Food-172 (110,241 images, 172 dishes, 353 per-image ingredients), 224 px, one host.

Build the dataset once (see `python -m marnet_jax.build_dataset --help` and README), then:

    python -m marnet_jax.main --config configs/vireo_food172.py --workdir runs/vireo_r50 \
        --config.data.data_dir=DATA_DIR
    python -m marnet_jax.main --config configs/vireo_food172.py:vit_b16,baseline --workdir runs/vireo_vit_base

Arg: 'BACKBONE[,VARIANT[,PROTOCOL]]', BACKBONE resnet50 (default) | vit_b16, VARIANT baseline | ema |
cdr | full (default) | aux | distill, PROTOCOL joint (default) | teacher (docs/method.md, "Training
protocol"; the settings tuned on synthetic_food are not carried over).
Batch 256, 30 epochs of TR.txt's 66,071 images (7,742 steps), AdamW with warm-up + cosine, bf16 compute.

From ImageNet weights (a local file; README "Starting from ImageNet weights"), with the backbone at a
tenth of the heads' learning rate:

    python -m marnet_jax.main --config configs/vireo_food172.py --workdir runs/vireo_r50_in1k \
        --config.data.data_dir=DATA_DIR --config.model.init_from=/weights/resnet50.pth \
        --config.optim.backbone_lr_mult=0.1
    python -m marnet_jax.main --config configs/vireo_food172.py:vit_b16 --workdir runs/vireo_vit_in21k \
        --config.data.data_dir=DATA_DIR --config.optim.backbone_lr_mult=0.1 \
        --config.model.init_from=/weights/vit_base_patch16_224.safetensors \
        --config.model.backbone_kwargs.approximate_gelu=False \
        --config.data.mean='(0.5, 0.5, 0.5)' --config.data.std='(0.5, 0.5, 0.5)'

(timm ViT: exact GELU; a big_vision .npz keeps approximate_gelu=True. AugReg/big_vision ViTs were trained
on inputs scaled to [-1, 1], hence mean = std = 0.5; torchvision ResNets use the default ImageNet
mean/std.)
Result: not measured here (the release cannot be downloaded on the project's machines).
"""

import ml_collections

from configs.paper_scale import paper_scale_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = paper_scale_config("vireo_food172", arg, train_images=66_071)
    # Ingredients are per image here, so plain InfoNCE positives (the image's own list) are right;
    # class-aware positives remain available.
    config.loss.ema_class_aware = False
    return config
