"""Image files -> the evaluation's uint8 crops, for images that are not in a dataset: photos given to
`marnet_jax.predict` and to `marnet_jax.check_weights`. The crop is the evaluation pipeline's own
transform (pipeline.ResizeCentreCrop); photometric.eval_images makes the model input of it.
"""

from __future__ import annotations

import ml_collections
import numpy as np
from PIL import Image

from marnet_jax.data import pipeline

# What PIL raises for a missing, unreadable, truncated, corrupt or oversized image.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def preprocess(data_cfg: ml_collections.ConfigDict, encoded: bytes) -> np.ndarray:
    """An encoded image -> uint8 [S, S, 3] crop, with the evaluation pipeline's own transform."""
    crop = pipeline.ResizeCentreCrop(
        data_cfg.image_size, data_cfg.eval_crop_ratio, data_cfg.interpolation
    )
    return np.ascontiguousarray(crop.map({"image": encoded})["image"], np.uint8)


def load_image(data_cfg: ml_collections.ConfigDict, path: str) -> np.ndarray:
    """An image file -> uint8 [S, S, 3] crop (preprocess); IMAGE_ERRORS when it cannot be read."""
    with open(path, "rb") as f:
        return preprocess(data_cfg, f.read())
