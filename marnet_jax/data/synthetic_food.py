"""synthetic_food: the embedded default dataset (procedural dish images with ingredient labels).

Every first run and every test uses this dataset, so it is built to be worth training on: dishes are
recipes over a shared ingredient vocabulary, an image shows a random subset of its dish's ingredients
on a plate under nuisance, and the per-image ingredient multi-hot is the privileged text. The image
alone is ambiguous (visually similar ingredients, colour cast, lighting, viewpoint, clutter, noise,
occlusion), while the ingredient labels carry most of the class signal.

Generation is a pure function of (config, split, seed): ``generate(config, split)`` returns the
images, labels and multi-hot labels as arrays without tfds, and the ``SyntheticFood`` tfds builder
writes the same examples to ArrayRecord (read back with ``tfds.data_source`` or
``builder.as_data_source``; no TensorFlow needed).

World
-----
- Ingredients (vocabulary of V): each has a visual signature: colour (RGB), shape (disc, ellipse,
  square, ring, stripe, triangle), texture (plain, dots, stripes, speckle), size, pieces per
  serving. Ingredients come in families of 1-3 that share shape and nearly share colour and differ
  by texture and size, so some ingredients are hard to tell apart from pixels.
- Dishes (C classes): recipes of 3-6 ingredients, built as groups of a base recipe plus variants
  that swap in a family sibling, swap in another ingredient, or add/drop one (1-2 edits), so many
  dish pairs differ by only one or two ingredients.
- Image: a plate on a cluttered table; each recipe ingredient is present with probability
  ``presence_prob`` (at least 2 present), drawn as 1-3 pieces at random positions, rotations and
  scales; the ingredient multi-hot marks the ingredients drawn (a piece may end up hidden under
  another piece or an occluder). Nuisance: viewpoint
  (rotation, tilt, zoom, shift), background clutter (distractor shapes not in the vocabulary, and
  low-contrast blobs), a distractor garnish on the plate, partial occlusion (utensil or napkin),
  illumination gradient, brightness/contrast, per-channel colour cast, blur and pixel noise.

How hard it is (an ingredient oracle, a visual-only ResNet, a colour-histogram baseline) and what it
costs to build: docs/synthetic_food.md.
"""

from __future__ import annotations

import colorsys
import dataclasses
import io
import math
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

SPLITS = ("train", "validation", "test")
SHAPES = ("disc", "ellipse", "square", "ring", "stripe", "triangle")
DISTRACTOR_SHAPES = ("cross", "crescent")
TEXTURES = ("plain", "dotted", "striped", "speckled")
_ALL_SHAPES = SHAPES + DISTRACTOR_SHAPES
_HUE_NAMES = (
    (0.00, "red"),
    (0.06, "orange"),
    (0.12, "amber"),
    (0.17, "yellow"),
    (0.25, "lime"),
    (0.36, "green"),
    (0.46, "teal"),
    (0.53, "cyan"),
    (0.61, "azure"),
    (0.68, "blue"),
    (0.76, "violet"),
    (0.84, "magenta"),
    (0.92, "pink"),
    (0.97, "red"),
)
# Fixed number of examples per random stream: a chunk is generated from its own seeded generator,
# so any example range can be regenerated without generating what precedes it.
CHUNK_SIZE = 256
GENERATOR_VERSION = 1


@dataclasses.dataclass(eq=False)
class SyntheticFoodConfig(tfds.core.BuilderConfig):
    """BuilderConfig holding every generation parameter (the generator reads only this)."""

    image_size: int = 64  # Side of the square RGB images in pixels.
    num_dishes: int = 30  # Number of dish classes.
    num_ingredients: int = 48  # Size of the ingredient vocabulary.
    num_train: int = 10_000  # Examples in the 'train' split.
    num_validation: int = 1_500  # Examples in the 'validation' split.
    num_test: int = 3_000  # Examples in the 'test' split.
    seed: int = 0  # Root seed: vocabulary, recipes and every split derive from it.
    presence_prob: float = 0.8  # Probability that a recipe ingredient appears in an image.
    min_present: int = 2  # Minimum number of ingredients drawn per image.
    recipe_size: tuple[int, int] = (3, 6)  # Inclusive range of ingredients per base recipe.
    nuisance: float = 1.0  # Scales the strength of every nuisance (0 = clean renders).

    def split_size(self, split: str) -> int:
        """Number of examples in ``split``."""
        return {
            "train": self.num_train,
            "validation": self.num_validation,
            "test": self.num_test,
        }[split]


DEFAULT_CONFIG = SyntheticFoodConfig(
    name="default",
    description="64x64 images, 30 dishes, 48 ingredients, 10k/1.5k/3k examples.",
)
TINY_CONFIG = SyntheticFoodConfig(
    name="tiny",
    description="32x32 images, 8 dishes, 16 ingredients, 200/64/64 examples (tests).",
    image_size=32,
    num_dishes=8,
    num_ingredients=16,
    num_train=200,
    num_validation=64,
    num_test=64,
)


def make_config(
    base: str = "default", *, name: str | None = None, **overrides
) -> SyntheticFoodConfig:
    """Returns a copy of config ``base`` with ``overrides`` (e.g. ``seed=3``).

    tfds requires a custom config to have a name of its own; by default it is derived from the
    overrides (``make_config('tiny', seed=3).name == 'tiny_seed3'``).
    """
    cfg = {c.name: c for c in (DEFAULT_CONFIG, TINY_CONFIG)}[base]
    if name is None:
        name = "_".join([base] + [f"{k.replace('_', '')}{v}" for k, v in sorted(overrides.items())])
        name = name.replace(".", "p").replace(" ", "").replace("(", "").replace(")", "")
        name = name.replace(",", "-")
    return dataclasses.replace(cfg, name=name, **overrides)


# ----------------------------------------------------------------------------------------------
# World: vocabulary and recipes.


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Visual signatures of the ingredients (index i = ingredient i)."""

    names: tuple[str, ...]
    rgb: np.ndarray  # float32 [V, 3] in [0, 1].
    shape: np.ndarray  # int32 [V], index into SHAPES.
    texture: np.ndarray  # int32 [V], index into TEXTURES.
    size: np.ndarray  # float32 [V], piece radius as a fraction of the image side.
    pieces: np.ndarray  # int32 [V, 2], inclusive range of pieces drawn per serving.
    family: np.ndarray  # int32 [V], ingredients of one family look alike.


def _colour_name(h: float, s: float, v: float) -> str:
    hue = min(_HUE_NAMES, key=lambda t: min(abs(h - t[0]), 1.0 - abs(h - t[0])))[1]
    prefix = "dark_" if v < 0.55 else ("pale_" if s < 0.5 else "")
    return prefix + hue


def make_vocabulary(config: SyntheticFoodConfig) -> Vocabulary:
    """Draws the ingredient vocabulary of ``config`` (deterministic in ``config.seed``)."""
    rng = np.random.default_rng([config.seed, 101])
    n = config.num_ingredients
    rgb, shape, texture, size, family, hsv = [], [], [], [], [], []
    fam = 0
    while len(rgb) < n:
        members = min(int(rng.choice([1, 2, 3], p=[0.25, 0.45, 0.3])), n - len(rgb))
        h, s, v = rng.random(), rng.uniform(0.45, 0.95), rng.uniform(0.45, 0.95)
        fam_shape = int(rng.integers(len(SHAPES)))
        textures = rng.permutation(len(TEXTURES))[:members]
        base_size = rng.uniform(0.055, 0.095)
        for m in range(members):
            hm = (h + rng.normal(0.0, 0.015)) % 1.0
            sm = float(np.clip(s + rng.normal(0.0, 0.05), 0.3, 1.0))
            vm = float(np.clip(v + rng.normal(0.0, 0.05), 0.35, 1.0))
            hsv.append((hm, sm, vm))
            rgb.append(colorsys.hsv_to_rgb(hm, sm, vm))
            shape.append(fam_shape)
            texture.append(int(textures[m]))
            size.append(min(base_size * (1.0 if m == 0 else rng.uniform(0.8, 1.25)), 0.1))
            family.append(fam)
        fam += 1
    size_arr = np.asarray(size, np.float32)
    # Small ingredients come in more pieces (like peas versus a fillet).
    lo = np.where(size_arr < 0.068, 2, 1)
    hi = np.where(size_arr < 0.068, 3, np.where(size_arr < 0.082, 2, 1))
    names: list[str] = []
    for i in range(n):
        size_word = "small" if size_arr[i] < 0.068 else ("large" if size_arr[i] >= 0.082 else "")
        parts = [size_word, _colour_name(*hsv[i]), TEXTURES[texture[i]], SHAPES[shape[i]]]
        base = "_".join(p for p in parts if p)
        cand, k = base, 2
        while cand in names:
            cand, k = f"{base}_{k}", k + 1
        names.append(cand)
    return Vocabulary(
        names=tuple(names),
        rgb=np.asarray(rgb, np.float32),
        shape=np.asarray(shape, np.int32),
        texture=np.asarray(texture, np.int32),
        size=size_arr,
        pieces=np.stack([lo, hi], axis=1).astype(np.int32),
        family=np.asarray(family, np.int32),
    )


def make_recipes(config: SyntheticFoodConfig, vocab: Vocabulary | None = None) -> np.ndarray:
    """Recipe matrix bool [C, V]: row c marks the ingredients of dish c.

    Dishes are made in groups: a base recipe and variants with 1-2 edits (swap in a family sibling,
    swap in any ingredient, add one, drop one), so recipes overlap and some differ by one or two
    ingredients only. The dish order is shuffled so groups are not adjacent class indices.
    """
    vocab = make_vocabulary(config) if vocab is None else vocab
    rng = np.random.default_rng([config.seed, 202])
    v_count, c_count = config.num_ingredients, config.num_dishes
    lo, hi = config.recipe_size
    if not 1 <= lo <= hi <= v_count:
        raise ValueError(f"recipe_size {config.recipe_size} does not fit {v_count} ingredients.")
    usage = np.zeros(v_count)
    recipes: list[frozenset[int]] = []

    def pick(k: int, exclude: set[int]) -> list[int]:
        # Least-used ingredients first (random tie-break), so the vocabulary is covered.
        score = usage + rng.random(v_count) * 0.9
        score[list(exclude)] = np.inf
        return [int(i) for i in np.argsort(score)[:k]]

    def edit(base: frozenset[int]) -> frozenset[int]:
        cur = set(base)
        for _ in range(int(rng.choice([1, 2], p=[0.6, 0.4]))):
            op = rng.choice(["sibling", "swap", "add", "drop"], p=[0.35, 0.35, 0.15, 0.15])
            if op == "drop" and len(cur) <= lo:
                op = "swap"
            if op == "add" and len(cur) >= hi:
                op = "swap"
            if op == "add":
                cur.add(pick(1, cur)[0])
            elif op == "drop":
                cur.remove(int(rng.choice(sorted(cur))))
            else:
                out = int(rng.choice(sorted(cur)))
                siblings = [
                    int(j)
                    for j in np.flatnonzero(vocab.family == vocab.family[out])
                    if j not in cur
                ]
                cur.remove(out)
                if op == "sibling" and siblings:
                    cur.add(int(rng.choice(siblings)))
                else:
                    cur.add(pick(1, cur | {out})[0])
        return frozenset(cur)

    attempts = 0
    while len(recipes) < c_count:
        attempts += 1
        if attempts > 100 * c_count:
            raise ValueError(f"Cannot make {c_count} distinct recipes from {v_count} ingredients.")
        base = frozenset(pick(int(rng.integers(lo, hi + 1)), set()))
        group = [base] if base not in recipes else []
        tries = 0
        while len(group) < 3 and len(recipes) + len(group) < c_count and tries < 50:
            tries += 1
            cand = edit(base)
            if cand not in recipes and cand not in group:
                group.append(cand)
        for r in group:
            usage[list(r)] += 1
        recipes.extend(group)
    order = rng.permutation(c_count)
    matrix = np.zeros((c_count, v_count), bool)
    for row, c in enumerate(order):
        matrix[row, sorted(recipes[c])] = True
    return matrix


def dish_names(config: SyntheticFoodConfig) -> list[str]:
    """Class names: ``dish_00``, ``dish_01``, ..."""
    width = max(2, len(str(config.num_dishes - 1)))
    return [f"dish_{i:0{width}d}" for i in range(config.num_dishes)]


# ----------------------------------------------------------------------------------------------
# Rendering (vectorised over a chunk of images).


def _rot(theta: np.ndarray) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)  # [..., 2, 2]


def _sdf(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (unit-sized shape, negative inside) of shape ``_ALL_SHAPES[kind]``."""
    name = _ALL_SHAPES[kind]
    if name == "disc":
        return np.sqrt(u * u + v * v) - 1.0
    if name == "ellipse":
        return (np.sqrt(u * u + (v / 0.55) ** 2) - 1.0) * 0.55
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.85
    if name == "ring":
        return np.abs(np.sqrt(u * u + v * v) - 0.75) - 0.28
    if name == "stripe":
        return np.maximum(np.abs(u) - 1.45, np.abs(v) - 0.38)
    if name == "triangle":
        return np.maximum(np.abs(u) * 0.866 + v * 0.5, -v) - 0.55
    if name == "cross":
        a = np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.28)
        b = np.maximum(np.abs(u) - 0.28, np.abs(v) - 1.0)
        return np.minimum(a, b)
    if name == "crescent":
        outer = np.sqrt(u * u + v * v) - 1.0
        inner = np.sqrt((u - 0.55) ** 2 + v * v) - 0.85
        return np.maximum(outer, -inner)
    raise ValueError(name)


def _texture(kind: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative texture field of ``TEXTURES[kind]`` on local coordinates."""
    name = TEXTURES[kind]
    if name == "plain":
        return np.ones_like(u)
    if name == "dotted":
        g = np.cos(np.pi * 2.4 * u) * np.cos(np.pi * 2.4 * v)
        return 1.0 - 0.5 * np.clip((g - 0.35) * 3.0, 0.0, 1.0)
    if name == "striped":
        return 1.0 - 0.45 * np.clip(np.sin(np.pi * 2.2 * u) * 2.5, 0.0, 1.0)
    if name == "speckled":
        return 1.0 + 0.9 * (rng.random(u.shape, dtype=np.float32) - 0.5)
    raise ValueError(name)


# Farthest point of each unit shape from its centre (patch sizing).
_EXTENT = {
    "disc": 1.0,
    "ellipse": 1.0,
    "square": 1.21,
    "ring": 1.03,
    "stripe": 1.5,
    "triangle": 1.1,
    "cross": 1.04,
    "crescent": 1.0,
}
_EXTENT_ARR = np.asarray([_EXTENT[k] for k in _ALL_SHAPES], np.float32)
_PATCH_STEP = 6


@dataclasses.dataclass
class _Canvas:
    """A padded chunk of images plus the id map of the topmost ingredient per pixel."""

    rgb: np.ndarray  # float32 [N, S + 2m, S + 2m, 3]
    ids: np.ndarray  # int16 [N, S + 2m, S + 2m], -1 = no ingredient
    margin: int


def _paint(
    canvas: _Canvas,
    rng: np.random.Generator,
    img: np.ndarray,
    center: np.ndarray,
    lin: np.ndarray,
    kind: np.ndarray,
    rgb: np.ndarray,
    texture: np.ndarray | None,
    ident: np.ndarray,
) -> None:
    """Alpha-composites one shape into each image ``img`` (one shape per image per call).

    ``center`` [n, 2] pixel (x, y); ``lin`` [n, 2, 2] maps pixel offsets to unit-shape coordinates;
    ``kind`` [n] index into _ALL_SHAPES; ``rgb`` [n, 3]; ``texture`` [n] index into TEXTURES or
    None; ``ident`` [n] ingredient id to record in the id map (-1 = none). Shapes are drawn on square
    patches around their centres, grouped by patch size so small shapes cost little.
    """
    if img.size == 0:
        return
    sv = np.linalg.svd(lin, compute_uv=False)  # [n, 2], local units per pixel
    extent = _EXTENT_ARR[kind] / sv[:, 1]  # farthest pixel distance of the shape
    need = 2 * np.ceil(extent).astype(np.int64) + 3
    bucket = np.minimum(-(-need // _PATCH_STEP) * _PATCH_STEP, 2 * canvas.margin)
    aa = 1.0 / np.sqrt(sv[:, 0] * sv[:, 1])  # pixels per local unit (anti-aliasing)
    for p in np.unique(bucket):
        sel = np.flatnonzero(bucket == p)
        _paint_patch(
            canvas,
            rng,
            int(p),
            img[sel],
            center[sel],
            lin[sel],
            aa[sel],
            kind[sel],
            rgb[sel],
            None if texture is None else texture[sel],
            ident[sel],
        )


def _paint_patch(canvas, rng, p, img, center, lin, aa, kind, rgb, texture, ident) -> None:
    m = canvas.margin
    size = canvas.rgb.shape[1] - 2 * m
    origin = np.clip(np.round(center).astype(np.int64) - p // 2, -m, size + m - p)  # [n, 2]
    grid = np.arange(p)
    px = (origin[:, 0, None] + grid + 0.5 - center[:, 0, None]).astype(np.float32)  # [n, P]
    py = (origin[:, 1, None] + grid + 0.5 - center[:, 1, None]).astype(np.float32)
    lin = lin.astype(np.float32)
    u = lin[:, 0, 0, None, None] * px[:, None, :] + lin[:, 0, 1, None, None] * py[:, :, None]
    v = lin[:, 1, 0, None, None] * px[:, None, :] + lin[:, 1, 1, None, None] * py[:, :, None]
    sdf = np.empty_like(u)
    for k in np.unique(kind):
        sel = kind == k
        sdf[sel] = _sdf(int(k), u[sel], v[sel])
    alpha = np.clip(0.5 - sdf * aa[:, None, None].astype(np.float32), 0.0, 1.0)
    shade = 0.82 + 0.3 * np.clip(-sdf, 0.0, 0.6)
    if texture is not None:
        tex = np.empty_like(u)
        for k in np.unique(texture):
            sel = texture == k
            tex[sel] = _texture(int(k), u[sel], v[sel], rng)
        shade = shade * tex
    colour = rgb[:, None, None, :].astype(np.float32) * shade[..., None]
    rows = (origin[:, 1, None] + m + grid)[:, :, None]
    cols = (origin[:, 0, None] + m + grid)[:, None, :]
    b = img[:, None, None]
    a = alpha[..., None]
    canvas.rgb[b, rows, cols] = canvas.rgb[b, rows, cols] * (1.0 - a) + colour * a
    ids = canvas.ids[b, rows, cols]
    canvas.ids[b, rows, cols] = np.where(alpha > 0.5, ident[:, None, None].astype(np.int16), ids)


def _present(
    recipes: np.ndarray, labels: np.ndarray, prob: float, min_present: int, rng: np.random.Generator
) -> np.ndarray:
    """Per-image subset of the dish's ingredients: bool [n, V], at least ``min_present``."""
    rec = recipes[labels]
    u = rng.random(rec.shape)
    u = np.where(rec, u, np.inf)
    present = rec & (u < prob)
    ranks = np.argsort(np.argsort(u, axis=1), axis=1)
    return present | (rec & (ranks < min_present))


def _render_chunk(
    config: SyntheticFoodConfig,
    vocab: Vocabulary,
    recipes: np.ndarray,
    n: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Draws ``n`` examples from ``rng``; returns image/label/ingredients/visible arrays."""
    s = config.image_size
    nz = config.nuisance
    v_count = config.num_ingredients
    labels = rng.integers(config.num_dishes, size=n)
    present = _present(recipes, labels, config.presence_prob, config.min_present, rng)

    # Viewpoint: pixel = centre + zoom * R(theta) diag(1, tilt) scene.
    theta = rng.uniform(0.0, 2.0 * np.pi, n)
    tilt = 1.0 - nz * rng.uniform(0.0, 0.3, n)
    zoom = np.exp(nz * rng.uniform(-0.15, 0.15, n))
    centre = s / 2.0 + nz * rng.normal(0.0, 0.05 * s, (n, 2))
    fwd = (
        zoom[:, None, None] * _rot(theta) @ (np.eye(2) * np.stack([np.ones(n), tilt], -1)[:, None])
    )
    inv = np.linalg.inv(fwd)  # pixel offset -> scene

    max_extent = 1.6 * float(vocab.size.max()) * 1.35 * math.exp(0.15) * s
    patch = int(2 * math.ceil(max_extent) + 2)
    margin = patch // 2 + 1
    full = s + 2 * margin
    canvas = _Canvas(
        rgb=np.zeros((n, full, full, 3), np.float32),
        ids=np.full((n, full, full), -1, np.int16),
        margin=margin,
    )

    # Table: base colour, smooth low-frequency variation.
    table = np.stack(
        [
            np.asarray(colorsys.hsv_to_rgb(h, sat, val))
            for h, sat, val in zip(
                rng.random(n), rng.uniform(0.05, 0.45, n), rng.uniform(0.25, 0.75, n)
            )
        ]
    ).astype(np.float32)
    # Whole-image layers are drawn on the visible crop only (the margin just holds patches).
    crop = canvas.rgb[:, margin : margin + s, margin : margin + s]
    pix = np.arange(s, dtype=np.float32) + 0.5
    coarse = rng.normal(0.0, 0.08 * nz, (n, 2, 3)).astype(np.float32)
    wave = np.cos(np.pi * pix / s * 1.5)
    shade = 1.0 + coarse[:, 0, None, None, :] * wave[None, None, :, None]
    shade = shade + coarse[:, 1, None, None, :] * wave[None, :, None, None]
    crop[:] = table[:, None, None, :] * shade

    # Pixel grid in scene coordinates (for plate and occluders).
    inv32, c32 = inv.astype(np.float32), centre.astype(np.float32)
    dx = pix[None, None, :] - c32[:, 0, None, None]
    dy = pix[None, :, None] - c32[:, 1, None, None]
    sx = inv32[:, 0, 0, None, None] * dx + inv32[:, 0, 1, None, None] * dy
    sy = inv32[:, 1, 0, None, None] * dx + inv32[:, 1, 1, None, None] * dy
    px_scale = (zoom * np.sqrt(tilt)).astype(np.float32)

    def lin_for(rotation: np.ndarray, radius: np.ndarray, sel: np.ndarray) -> np.ndarray:
        return _rot(-rotation) @ inv[sel] / radius[:, None, None]

    # Background clutter: distractor shapes and low-contrast blobs, partly under the plate.
    clutter = 3
    for _ in range(clutter):
        sel = np.flatnonzero(rng.random(n) < 0.8 * min(nz, 1.0))
        k = len(sel)
        pos = rng.uniform(0.0, s, (k, 2))
        rad = rng.uniform(0.05, 0.12, k) * s
        low = rng.random(k) < 0.5
        kind = np.where(
            low, rng.integers(len(SHAPES), size=k), len(SHAPES) + rng.integers(2, size=k)
        )
        col = rng.random((k, 3)).astype(np.float32)
        col = np.where(low[:, None], table[sel] * rng.uniform(0.75, 1.25, (k, 1)), col)
        lin = _rot(-rng.uniform(0.0, 2.0 * np.pi, k)) / rad[:, None, None]
        _paint(canvas, rng, sel, pos, lin, kind, col, None, np.full(k, -1))

    # Plate: a light disc with a darker rim, in scene coordinates (tilted by the viewpoint).
    plate_r = (rng.uniform(0.40, 0.46, n) * s).astype(np.float32)[:, None, None]
    r = np.sqrt(sx * sx + sy * sy)
    tint = rng.uniform(0.0, 0.12, (n, 3)) * nz
    plate_col = (rng.uniform(0.82, 0.97, (n, 1)) - tint).astype(np.float32)[:, None, None, :]
    a_plate = np.clip(0.5 - (r - plate_r) * px_scale[:, None, None], 0.0, 1.0)
    rim = np.clip(1.0 - np.abs(r - 0.9 * plate_r) * np.float32(20.0 / s), 0.0, 1.0)
    crop *= (1.0 - a_plate)[..., None]
    crop += (a_plate * (1.0 - 0.12 * rim))[..., None] * plate_col
    plate_r = plate_r[:, 0, 0]

    # Ingredient pieces: each present ingredient gets a few pieces; draw order is shuffled.
    lo, hi = vocab.pieces[:, 0], vocab.pieces[:, 1]
    counts = rng.integers(lo[None], hi[None] + 1, size=(n, v_count)) * present
    flat = np.repeat(np.arange(n * v_count), counts.ravel())
    piece_img, piece_ing = flat // v_count, flat % v_count
    order = np.lexsort((rng.random(len(flat)), piece_img))
    piece_img, piece_ing = piece_img[order], piece_ing[order]
    starts = np.concatenate([[0], np.cumsum(counts.sum(1))[:-1]])
    slot = np.arange(len(flat)) - starts[piece_img]
    for j in range(int(slot.max(initial=-1)) + 1):
        on = slot == j
        sel, ing = piece_img[on], piece_ing[on]
        k = len(sel)
        rho = np.sqrt(rng.random(k)) * 0.72 * plate_r[sel]
        phi = rng.uniform(0.0, 2.0 * np.pi, k)
        scene = np.stack([rho * np.cos(phi), rho * np.sin(phi)], -1)
        pos = centre[sel] + np.einsum("nij,nj->ni", fwd[sel], scene)
        rad = vocab.size[ing] * s * np.exp(np.clip(rng.normal(0.0, 0.12, k), -0.3, 0.3))
        lin = lin_for(rng.uniform(0.0, 2.0 * np.pi, k), rad, sel)
        col = vocab.rgb[ing] * np.exp(rng.normal(0.0, 0.04, (k, 3))).astype(np.float32)
        _paint(canvas, rng, sel, pos, lin, vocab.shape[ing], col, vocab.texture[ing], ing)

    # Garnish on the plate: a distractor shape in a random colour.
    sel = np.flatnonzero(rng.random(n) < 0.5 * min(nz, 1.0))
    k = len(sel)
    rho = np.sqrt(rng.random(k)) * 0.7 * plate_r[sel]
    phi = rng.uniform(0.0, 2.0 * np.pi, k)
    pos = centre[sel] + np.einsum(
        "nij,nj->ni", fwd[sel], np.stack([rho * np.cos(phi), rho * np.sin(phi)], -1)
    )
    rad = rng.uniform(0.04, 0.07, k) * s
    kind = len(SHAPES) + rng.integers(2, size=k)
    col = rng.random((k, 3)).astype(np.float32)
    lin = lin_for(rng.uniform(0.0, 2.0 * np.pi, k), rad, sel)
    _paint(canvas, rng, sel, pos, lin, kind, col, None, np.full(k, -1))

    # Partial occlusion: a utensil (long grey bar) or a napkin (large pale rectangle from an edge).
    occ = np.flatnonzero(rng.random(n) < 0.4 * min(nz, 1.0))
    k = len(occ)
    napkin = rng.random(k) < 0.4
    ang = rng.uniform(0.0, 2.0 * np.pi, (k, 1, 1)).astype(np.float32)
    half = np.where(napkin, s, rng.uniform(0.03, 0.06, k) * s).astype(np.float32)[:, None, None]
    shift = np.where(napkin, s + rng.uniform(0.15, 0.35, k) * s, rng.uniform(-0.05, 0.2, k) * s)
    occ_col = np.where(
        napkin[:, None], rng.uniform(0.7, 1.0, (k, 3)), rng.uniform(0.55, 0.8, (k, 1))
    ).astype(np.float32)[:, None, None, :]
    pd = pix - s / 2.0
    along = np.cos(ang) * pd[None, None, :] + np.sin(ang) * pd[None, :, None]
    across = np.cos(ang) * pd[None, :, None] - np.sin(ang) * pd[None, None, :]
    across -= shift.astype(np.float32)[:, None, None]
    d_occ = np.maximum(np.abs(across) - half, np.abs(along) - s)
    a_occ = np.clip(0.5 - d_occ, 0.0, 1.0)
    sheen = a_occ * (1.0 + 0.15 * np.cos(across * 0.9))
    crop[occ] = crop[occ] * (1.0 - a_occ)[..., None] + sheen[..., None] * occ_col
    vis_ids = canvas.ids[:, margin : margin + s, margin : margin + s]
    vis_ids[occ] = np.where(a_occ > 0.5, np.int16(-1), vis_ids[occ])

    # Photometric nuisance: illumination gradient, brightness, colour cast, contrast, blur, noise.
    f32 = lambda x: np.asarray(x, np.float32)
    grid = (np.arange(s, dtype=np.float32) + 0.5) / s - 0.5
    g_ang = f32(rng.uniform(0.0, 2.0 * np.pi, (n, 1, 1)))
    g_str = f32(nz * rng.uniform(0.0, 0.6, (n, 1, 1)))
    bright = f32(np.exp(nz * rng.uniform(-0.35, 0.25, (n, 1, 1, 1))))
    cast = f32(np.exp(nz * rng.normal(0.0, 0.12, (n, 1, 1, 3))))
    contrast = f32(np.exp(nz * rng.uniform(-0.35, 0.2, (n, 1, 1, 1))))
    ramp = 1.0 + g_str * (np.cos(g_ang) * grid[None, None, :] + np.sin(g_ang) * grid[None, :, None])
    img = crop * ramp[..., None]
    img *= (255.0 * bright) * cast
    mean = img.mean(axis=(1, 2, 3), keepdims=True)
    img *= contrast
    img += mean * (1.0 - contrast)
    blur = np.flatnonzero(rng.random(n) < 0.4 * min(nz, 1.0))
    blur_w = f32(rng.uniform(0.0, 0.8, (len(blur), 1, 1, 1)))
    sub = img[blur]
    pad = np.pad(sub, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    box = pad[:, :-2] + pad[:, 1:-1] + pad[:, 2:]
    box = (box[:, :, :-2] + box[:, :, 1:-1] + box[:, :, 2:]) * np.float32(1.0 / 9.0)
    img[blur] = sub + (box - sub) * blur_w
    # Uniform noise with standard deviation sigma (cheaper to draw than Gaussian).
    sigma = f32(nz * rng.uniform(0.01, 0.06, (n, 1, 1, 1)) * 255.0 * math.sqrt(12.0))
    img += (rng.random(img.shape, dtype=np.float32) - 0.5) * sigma
    img += 0.5
    image = np.clip(img, 0.0, 255.0, out=img).astype(np.uint8)

    visible = vis_ids
    return {
        "image": image,
        "label": labels.astype(np.int32),
        "ingredients": present.astype(np.uint8),
        "visible": visible.copy(),
    }


def _split_seed(config: SyntheticFoodConfig, split: str, chunk: int) -> list[int]:
    return [config.seed, 1000 + SPLITS.index(split), chunk]


def iter_chunks(
    config: SyntheticFoodConfig, split: str, *, with_visible: bool = False
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yields (start index, arrays) for consecutive chunks of ``split`` (see ``generate``)."""
    vocab = make_vocabulary(config)
    recipes = make_recipes(config, vocab)
    total = config.split_size(split)
    for chunk, start in enumerate(range(0, total, CHUNK_SIZE)):
        rng = np.random.default_rng(_split_seed(config, split, chunk))
        out = _render_chunk(config, vocab, recipes, min(CHUNK_SIZE, total - start), rng)
        if not with_visible:
            out.pop("visible")
        yield start, out


def generate(
    config: SyntheticFoodConfig, split: str, *, with_visible: bool = False
) -> dict[str, np.ndarray]:
    """All examples of ``split`` as arrays, a pure function of (config, split, config.seed).

    Returns 'image' uint8 [N, S, S, 3], 'label' int32 [N], 'ingredients' uint8 [N, V] (multi-hot of
    the ingredients drawn) and, with ``with_visible``, 'visible' int16 [N, S, S]: the ingredient
    index on top at each pixel (-1: none), for checks on the rendered signal.
    """
    parts = [arr for _, arr in iter_chunks(config, split, with_visible=with_visible)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, 3] image (tfds Image features take bytes without TensorFlow)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def metadata(config: SyntheticFoodConfig) -> dict:
    """JSON-serialisable description of the world: ingredient names, recipes, signatures."""
    vocab = make_vocabulary(config)
    recipes = make_recipes(config, vocab)
    names = dish_names(config)
    return {
        "ingredient_names": list(vocab.names),
        "recipes": {
            names[c]: [vocab.names[i] for i in np.flatnonzero(recipes[c])]
            for c in range(len(names))
        },
        "recipe_indices": [np.flatnonzero(r).tolist() for r in recipes],
        "ingredient_signatures": [
            {
                "name": vocab.names[i],
                "rgb": [round(float(x), 4) for x in vocab.rgb[i]],
                "shape": SHAPES[vocab.shape[i]],
                "texture": TEXTURES[vocab.texture[i]],
                "size": round(float(vocab.size[i]), 4),
                "family": int(vocab.family[i]),
            }
            for i in range(config.num_ingredients)
        ],
        "generator": {
            "version": GENERATOR_VERSION,
            "seed": config.seed,
            "image_size": config.image_size,
            "presence_prob": config.presence_prob,
            "min_present": config.min_present,
            "nuisance": config.nuisance,
        },
    }


class SyntheticFood(tfds.core.GeneratorBasedBuilder):
    """Procedural dish images with per-image ingredient multi-hot labels (no download).

    Configs 'default' and 'tiny' (see ``make_config`` for variants such as another seed). Features:
    'image' (PNG, [S, S, 3] uint8), 'label' (dish ClassLabel), 'ingredients' (uint8 [V] multi-hot of
    the ingredients drawn), 'image_path' (``'<split>/<index>.png'``, also the record key). Metadata:
    'ingredient_names', 'recipes' (dish -> ingredient names), 'recipe_indices',
    'ingredient_signatures', 'generator' (seed and parameters).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    BUILDER_CONFIGS: ClassVar[list[SyntheticFoodConfig]] = [DEFAULT_CONFIG, TINY_CONFIG]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        cfg: SyntheticFoodConfig = self.builder_config
        s = cfg.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=dish_names(cfg)),
                    "ingredients": tfds.features.Tensor(
                        shape=(cfg.num_ingredients,), dtype=np.uint8
                    ),
                    "image_path": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(metadata(cfg)),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        for start, arrays in iter_chunks(self.builder_config, split):
            for i in range(len(arrays["label"])):
                path = f"{split}/{start + i:06d}.png"
                yield (
                    path,
                    {
                        "image": encode_png(arrays["image"][i]),
                        "label": int(arrays["label"][i]),
                        "ingredients": arrays["ingredients"][i],
                        "image_path": path,
                    },
                )
