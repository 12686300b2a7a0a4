"""Per-pixel work on the accelerator: the photometric half of training augmentation, and the
normalisation of training and evaluation crops.

The host pipeline ships uint8 crops. A training batch also carries what the host drew per example:
the flips ('flip' bool [B]) and the colour jitter's factors ('jitter' [B, 3]); `train_images` turns
it into the model's input: the flip, PIL's (and torchvision's) ImageEnhance Brightness -> Contrast
-> Color blends with those factors, then (x / 255 - mean) / std in the compute dtype.
`eval_images` normalises evaluation and prediction crops. On an accelerator this costs next to
nothing, the host is spared every per-pixel pass after the crop, and it sends a quarter of float32's
bytes. Everything here is per image and exact where it reduces (integer sums), so the model's input
is bit-identical however the batch is split over devices.

With data.decoder 'cpu_decode' the host does not resize either: it ships each crop's decoded box in
a fixed uint8 canvas, and `resize_crops` resamples it to S x S here with PIL's own filter weights
and rounding, leaving the host the JPEG decode alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import ml_collections

Array = jax.Array
LUMA = (0.299, 0.587, 0.114)  # PIL's RGB -> L weights


def _luma(x: Array) -> Array:
    return x[..., 0] * LUMA[0] + x[..., 1] * LUMA[1] + x[..., 2] * LUMA[2]


def brightened_mean_grey(images: Array, brightness: Array) -> Array:
    """Mean grey level (luma) of each uint8-valued image [B, H, W, 3] after the brightness blend,
    clipped to 255: the level the contrast blend pulls towards. [B] float32.

    From integer sums (exact, so the same however the batch is sharded): the clipped pixels
    contribute 255 each, the others brightness * their value."""
    chex.assert_rank([images, brightness], [4, 1])
    x = images.astype(jnp.int32)
    b = brightness.astype(jnp.float32)
    clipped = x.astype(jnp.float32) * b[:, None, None, None] >= 255.0  # as color_jitter clips
    kept_sum = jnp.sum(jnp.where(clipped, 0, x), axis=(1, 2)).astype(jnp.float32)  # [B, 3]
    clipped_count = jnp.sum(clipped.astype(jnp.int32), axis=(1, 2)).astype(jnp.float32)
    pixels = images.shape[1] * images.shape[2]
    return _luma((b[:, None] * kept_sum + 255.0 * clipped_count) / pixels)


def color_jitter(images: Array, factors: Array) -> Array:
    """Brightness, contrast, saturation of uint8-valued RGB images [B, H, W, 3] ([0, 255], any
    dtype), in that order; float32 out.

    Each is PIL's ImageEnhance blend: with black, with the brightened image's mean grey level
    (brightened_mean_grey), with its greyscale version, clipped to [0, 255] after each as the uint8
    originals are (they also round to integers, which this float version does not). `factors`
    [B, 3]: the brightness, contrast and saturation factors (pipeline.ColorJitter draws them).
    """
    chex.assert_rank([images, factors], [4, 2])
    chex.assert_axis_dimension(factors, 1, 3)
    grey_level = brightened_mean_grey(images, factors[:, 0])[:, None, None, None]
    f = factors.astype(jnp.float32)[:, None, None, None, :]
    x = jnp.clip(images.astype(jnp.float32) * f[..., 0], 0.0, 255.0)
    x = jnp.clip(grey_level + f[..., 1] * (x - grey_level), 0.0, 255.0)
    grey = _luma(x)[..., None]
    return jnp.clip(grey + f[..., 2] * (x - grey), 0.0, 255.0)


def flip(images: Array, flips: Array) -> Array:
    """Images [B, H, W, C] mirrored left-right where `flips` [B] is true."""
    chex.assert_rank([images, flips], [4, 1])
    return jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)


def _bilinear(x: Array) -> Array:
    return jnp.maximum(1.0 - jnp.abs(x), 0.0)


def _bicubic(x: Array) -> Array:
    a, x = -0.5, jnp.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def _lanczos(x: Array) -> Array:
    return jnp.where(jnp.abs(x) < 3.0, jnp.sinc(x) * jnp.sinc(x / 3.0), 0.0)


# PIL's resampling filters (Resample.c): name -> (support in input pixels at scale 1, kernel).
FILTERS: dict[str, tuple[float, Callable[[Array], Array]]] = {
    "bilinear": (1.0, _bilinear),
    "bicubic": (2.0, _bicubic),
    "lanczos": (3.0, _lanczos),
}


def filter_support(interpolation: str) -> float:
    """Reach, in input pixels at scale 1, of the data.interpolation filter that resize_crops
    applies (it scales with the shrink factor)."""
    if interpolation not in FILTERS:
        raise ValueError(
            f"data.decoder='cpu_decode' resizes on the accelerator with {sorted(FILTERS)}; "
            f"data.interpolation is {interpolation!r}."
        )
    return FILTERS[interpolation][0]


def resize_weights(
    start: Array, end: Array, extent: Array, in_size: int, out_size: int, interpolation: str
) -> Array:
    """[out_size, in_size] weights that resample [start, end) of an axis of `extent` real pixels
    to out_size pixels: PIL's (Resample.c precompute_coeffs) for the box, antialiased when it
    shrinks, renormalised where the filter meets the image's edge."""
    filter_support(interpolation)
    kernel = FILTERS[interpolation][1]
    scale = (end - start) / out_size
    stretch = jnp.maximum(scale, 1.0)
    centre = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
    pixel = jnp.arange(in_size, dtype=jnp.float32)
    w = kernel((pixel[None, :] + 0.5 - centre[:, None]) / stretch)
    w = jnp.where(pixel[None, :] < extent, w, 0.0)
    total = jnp.sum(w, axis=1, keepdims=True)
    return w / jnp.where(total == 0.0, 1.0, total)  # no pixel in reach: zeros, as PIL leaves them


def _rounded_pass(spec: str, weights: Array, pixels: Array) -> Array:
    """einsum(spec, weights, pixels) rounded half up and clipped to [0, 255], as PIL's 8-bit passes
    are. `pixels` are integers in [0, 255], exact in bfloat16; the weights go in as a bfloat16 pair
    (high part + remainder), so two native bfloat16 products give float32 accuracy."""
    x = pixels.astype(jnp.bfloat16)
    high = weights.astype(jnp.bfloat16)
    low = (weights - high.astype(jnp.float32)).astype(jnp.bfloat16)
    total = jnp.einsum(spec, high, x, preferred_element_type=jnp.float32) + jnp.einsum(
        spec, low, x, preferred_element_type=jnp.float32
    )
    return jnp.clip(jnp.floor(total + 0.5), 0.0, 255.0)


def resize_crops(
    canvases: Array, boxes: Array, extents: Array, size: int, interpolation: str
) -> Array:
    """Boxes of uint8 canvases resized to size x size, as PIL's Image.resize(box=...) does it.

    canvases: uint8 [B, C, C, 3], each holding a decoded image's pixels in its top-left corner
    (decoders.CanvasCrop); boxes: float32 [B, 4] (left, top, right, bottom) in canvas pixels;
    extents: int32 [B, 2] (height, width) of the real pixels, where the filter is cut off and
    renormalised. Horizontal pass, then vertical, each rounded to integers: float32
    [B, size, size, 3] with PIL's values (within one level where a sum lands on a rounding tie).
    """
    chex.assert_type([canvases, extents], [jnp.uint8, jnp.int32])
    chex.assert_rank(canvases, 4)
    b, height, width, _ = canvases.shape
    chex.assert_shape([boxes, extents], [(b, 4), (b, 2)])
    boxes = boxes.astype(jnp.float32)

    def axis(start: Array, end: Array, extent: Array, in_size: int) -> Array:
        return jax.vmap(resize_weights, in_axes=(0, 0, 0, None, None, None))(
            start, end, extent, in_size, size, interpolation
        )

    across = axis(boxes[:, 0], boxes[:, 2], extents[:, 1], width)  # [B, S, W]
    down = axis(boxes[:, 1], boxes[:, 3], extents[:, 0], height)  # [B, S, H]
    rows = _rounded_pass("bsw,bhwc->bhsc", across, canvases)
    return _rounded_pass("bsh,bhwc->bswc", down, rows)


def normalize(images: Array, mean: Sequence[float], std: Sequence[float], dtype: str) -> Array:
    """[..., 3] pixel values in [0, 255] -> (x / 255 - mean) / std in `dtype` ('float32' or
    'bfloat16', data.dtype)."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(
            f"Unknown image dtype {dtype!r} (data.dtype); expected 'float32' or 'bfloat16'."
        )
    m = jnp.asarray(mean, jnp.float32) * 255.0
    inv = 1.0 / (jnp.asarray(std, jnp.float32) * 255.0)
    return ((images.astype(jnp.float32) - m) * inv).astype(jnp.dtype(dtype))


def eval_images(images: Array, data_cfg: ml_collections.ConfigDict) -> Array:
    """The model input of evaluation and prediction crops (uint8 [..., S, S, 3], as eval_batches
    and images.preprocess give them): normalised to data_cfg.dtype."""
    chex.assert_type(images, jnp.uint8)
    return normalize(images, data_cfg.mean, data_cfg.std, data_cfg.dtype)


def train_images(
    crops: Array, batch: Mapping[str, Array], data_cfg: ml_collections.ConfigDict
) -> Array:
    """A training batch's model input: its `crops` [B, S, S, 3] (decoders.Decoder.crops: uint8,
    or the integer levels of resize_crops in float32) flipped where the batch's 'flip' says and
    jittered with its 'jitter' (each when the pipeline drew it), normalised to data_cfg.dtype."""
    chex.assert_rank(crops, 4)
    x = crops
    if "flip" in batch:
        x = flip(x, batch["flip"])
    if "jitter" in batch:
        x = color_jitter(x, batch["jitter"])
    return normalize(x, data_cfg.mean, data_cfg.std, data_cfg.dtype)
