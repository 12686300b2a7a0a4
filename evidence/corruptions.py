"""Test-time image corruptions at 5 severities: lighting, colour, viewpoint, blur, noise, occlusion.

Each corruption is a pure NumPy/PIL function `(image uint8 [H, W, 3], severity, rng) -> uint8 [H, W, 3]`:
severity 0 returns the image unchanged, 1..5 apply the parameter of that row of `SEVERITIES`. The random
draws (direction of a colour cast, sign of a rotation, position of a crop or an occluder, the noise) do
not depend on the severity, so one example at severities 1..5 is the same change, growing: its distance
from the clean image grows with the severity. Geometric sizes are fractions of the image side, so a
severity means the same at 32 and at 224 px.

`Corrupt(name, severity)` is the grain RandomMap that `pipeline.eval_batches(..., extra_transforms=[...],
seed=...)` applies after the resize and centre crop: grain draws each example's generator from (seed,
position), so a corrupted test set is a pure function of the seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import grain
import numpy as np
from PIL import Image, ImageFilter

Corruption = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]

# name -> parameter at severities 1..5 (what the parameter is: see the function of that name).
SEVERITIES: dict[str, tuple[float, ...]] = {
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added to every channel, in [0, 1] units
    "contrast": (0.6, 0.45, 0.3, 0.2, 0.1),  # contrast left (1 = unchanged)
    "colour_cast": (0.15, 0.3, 0.45, 0.6, 0.75),  # log-gain of the per-channel cast
    "rotation": (8.0, 16.0, 24.0, 32.0, 40.0),  # degrees
    "crop_scale": (0.9, 0.8, 0.7, 0.6, 0.5),  # side of the kept crop as a fraction of the image
    "blur": (0.008, 0.016, 0.024, 0.032, 0.047),  # Gaussian sigma as a fraction of the side
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),  # noise std, in [0, 1] units
    "occlusion": (0.05, 0.1, 0.2, 0.3, 0.4),  # occluded fraction of the image area
}
# What each corruption stands for (the nuisance of a food photo it simulates).
GROUPS: dict[str, str] = {
    "brightness": "lighting",
    "contrast": "lighting",
    "colour_cast": "lighting",
    "rotation": "viewpoint",
    "crop_scale": "viewpoint",
    "blur": "camera",
    "gaussian_noise": "camera",
    "occlusion": "clutter",
}
NAMES: tuple[str, ...] = tuple(SEVERITIES)
MAX_SEVERITY = 5


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def brightness(image: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Over-exposure (lighting): adds `amount` x 255 to every channel; highlights clip to white."""
    del rng
    return _to_uint8(image.astype(np.float32) + 255.0 * amount)


def contrast(image: np.ndarray, keep: float, rng: np.random.Generator) -> np.ndarray:
    """Flat, hazy light (lighting): blends the image with its mean grey level, keeping `keep`."""
    del rng
    x = image.astype(np.float32)
    return _to_uint8((x - x.mean()) * keep + x.mean())


def colour_cast(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Wrong white balance (tungsten, shade, coloured light): per-channel gains exp(strength x d)
    along a random direction d of unit norm with zero mean, so the overall brightness is kept."""
    d = rng.normal(size=3)
    d -= d.mean()
    d /= max(float(np.linalg.norm(d)), 1e-6)
    return _to_uint8(image.astype(np.float32) * np.exp(strength * d))


def _fill(image: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.rint(image.reshape(-1, 3).mean(0)))


def rotation(image: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    """Camera roll (viewpoint): rotation by `degrees` in a random direction about the centre; the
    corners it uncovers take the image's mean colour."""
    sign = 1.0 if rng.random() < 0.5 else -1.0
    out = Image.fromarray(image).rotate(
        sign * degrees, resample=Image.Resampling.BILINEAR, fillcolor=_fill(image)
    )
    return np.asarray(out)


def crop_scale(image: np.ndarray, keep: float, rng: np.random.Generator) -> np.ndarray:
    """Closer or off-centre framing (viewpoint): keeps a square of side `keep` x the image at a
    random position and scales it back up to the full size."""
    h, w = image.shape[:2]
    u, v = rng.random(2)
    ch, cw = max(1, round(h * keep)), max(1, round(w * keep))
    top, left = round(u * (h - ch)), round(v * (w - cw))
    out = Image.fromarray(image).resize(
        (w, h), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch)
    )
    return np.asarray(out)


def blur(image: np.ndarray, sigma_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """An out-of-focus camera (defocus): Gaussian blur with sigma = `sigma_fraction` x the side."""
    del rng
    radius = sigma_fraction * max(image.shape[:2])
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def gaussian_noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise in low light: adds N(0, std^2) per pixel and channel (in [0, 1] units)."""
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    return _to_uint8(image.astype(np.float32) + 255.0 * std * noise)


def occlusion(image: np.ndarray, area: float, rng: np.random.Generator) -> np.ndarray:
    """A hand, utensil or napkin in front of the dish (clutter): a square of a random solid colour
    covering `area` of the image. Its centre is random but placed so that the largest square of the
    table fits inside the image: the squares of severities 1..5 are nested."""
    h, w = image.shape[:2]
    cy, cx = rng.random(2)
    colour = rng.integers(0, 256, 3).astype(np.uint8)
    largest = math.sqrt(max(SEVERITIES["occlusion"]) * h * w)
    centre_y = largest / 2 + cy * (h - largest)
    centre_x = largest / 2 + cx * (w - largest)
    half = math.sqrt(area * h * w) / 2
    top, bottom = max(0, round(centre_y - half)), min(h, round(centre_y + half))
    left, right = max(0, round(centre_x - half)), min(w, round(centre_x + half))
    out = image.copy()
    out[top:bottom, left:right] = colour
    return out


_FUNCTIONS: dict[str, Corruption] = {
    "brightness": brightness,
    "contrast": contrast,
    "colour_cast": colour_cast,
    "rotation": rotation,
    "crop_scale": crop_scale,
    "blur": blur,
    "gaussian_noise": gaussian_noise,
    "occlusion": occlusion,
}


def check(name: str, severity: int) -> None:
    """Raises ValueError naming the bad corruption name or severity."""
    if name not in SEVERITIES:
        raise ValueError(f"Unknown corruption {name!r}; expected one of {list(NAMES)}.")
    if not (isinstance(severity, int | np.integer) and 0 <= severity <= MAX_SEVERITY):
        raise ValueError(
            f"Corruption severity must be an int in 0..{MAX_SEVERITY}, got {severity!r}."
        )


def corrupt(image: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """`image` (uint8 [H, W, 3]) under corruption `name` at `severity` (0 = the image itself)."""
    check(name, severity)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"Expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}.")
    if severity == 0:
        return image
    out = _FUNCTIONS[name](image, SEVERITIES[name][severity - 1], rng)
    assert out.shape == image.shape and out.dtype == np.uint8, (name, out.shape, out.dtype)
    return out


class Corrupt(grain.transforms.RandomMap):
    """grain transform: corrupts 'image' (uint8 [S, S, 3]) of each eval example; see `corrupt`."""

    def __init__(self, name: str, severity: int):
        check(name, severity)
        self.name = name
        self.severity = int(severity)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return {**element, "image": corrupt(element["image"], self.name, self.severity, rng)}

    def __repr__(self) -> str:
        return f"Corrupt({self.name!r}, {self.severity})"
