"""MARNet models: backbones, ingredient encoders, EMA alignment, CDR diffusion, the fused classifier
and the training loss."""

from marnet_jax.models.backbones import build_backbone
from marnet_jax.models.losses import marnet_loss
from marnet_jax.models.marnet import MARNet, build_model

__all__ = ["MARNet", "build_backbone", "build_model", "marnet_loss"]
