"""MARNet models: backbones, ingredient encoders, EMA alignment, CDR diffusion and the fused
classifier.

`build_backbone` and `marnet_loss` are resolved on first use: marnet_jax.losses imports from this
package, so an eager import here would be circular.
"""

from typing import Any

from marnet_jax.models.marnet import MARNet, build_model

__all__ = ["MARNet", "build_backbone", "build_model", "marnet_loss"]


def __getattr__(name: str) -> Any:
    if name == "build_backbone":
        from marnet_jax.models.backbones import build_backbone

        return build_backbone
    if name == "marnet_loss":
        from marnet_jax.losses import marnet_loss

        return marnet_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
