"""The convolutions the models run on XLA's CPU backend: their `conv_impl='auto'` picks these there
(GPU and TPU run XLA's own). Same parameters and results up to float rounding; the speed-ups they buy
are measured by `python -m benchmarks.backbones` and `python -m benchmarks.conv_layers`. The XLA flag
that goes with them is set by the entry points (marnet_jax.cpu).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from marnet_jax.models.layers import conv_nhwc

Array = jax.Array

CONV_IMPLS = ("auto", "xla", "cpu")


def resolve_conv_impl(impl: str) -> str:
    """'auto' -> 'cpu' on the CPU backend, else 'xla'."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv_impl {impl!r}; expected one of {CONV_IMPLS}")
    if impl == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return impl


def _patches(x: Array, kh: int, kw: int, stride: int, pad: int) -> Array:
    """[B, H, W, C] -> [B, Ho, Wo, kh * kw * C] by strided slices; ordered (kh, kw, C) like HWIO."""
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (h + 2 * pad - kh) // stride + 1
    wo = (w + 2 * pad - kw) // stride + 1
    cols = [
        lax.slice(
            xp,
            (0, i, j, 0),
            (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
            (1, stride, stride, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(cols, axis=-1)


def _im2col_conv(x: Array, kernel: Array, stride: int, pad: int) -> Array:
    """Convolution as patch extraction (slices only) + one matmul; NHWC input, HWIO kernel."""
    kh, kw, cin, cout = kernel.shape
    patches = _patches(x, kh, kw, stride, pad)
    return jnp.einsum("bhwk,ko->bhwo", patches, kernel.reshape(kh * kw * cin, cout))


def _kernel_grad_stride1(x: Array, g: Array, k: int, pad: int) -> Array:
    """Kernel gradient [k, k, Cin, Cout] of a stride-1 conv, from its input x and output gradient g.

    XLA differentiates a conv's kernel with a convolution that needs x with the batch as its minor
    dimension. On the CPU that transpose is fused with the elementwise ops that produced x (BatchNorm,
    ReLU, the residual sums of up to three blocks) and runs several times slower than a plain
    transpose. Here g is the convolution's image instead (batch = Cout, features = the batch) and x
    its kernel: x needs only a cheap transpose (batch to third place), and g, which the input
    gradient has already materialised, takes the batch-minor one. The result comes out flipped.
    (Strided convs keep XLA's gradient: rewritten this way, through space-to-depth, they were slower.)
    """
    lo = k - 1 - pad
    # Padded here, not as conv padding: XLA swaps the operands back when the kernel is the larger.
    g = jnp.pad(
        g,
        ((0, 0), (lo, pad + x.shape[1] - g.shape[1]), (lo, pad + x.shape[2] - g.shape[2]), (0, 0)),
    )
    flipped = lax.conv_general_dilated(
        g,
        x,
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=("CHWN", "IHWO", "NHWC"),
        preferred_element_type=jnp.float32,
    )  # [Cout, k, k, Cin]
    return jnp.transpose(flipped[:, ::-1, ::-1, :], (1, 2, 3, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_stride1(x: Array, kernel: Array, pad: int) -> Array:
    """XLA's stride-1 conv; its kernel gradient from `_kernel_grad_stride1`."""
    return conv_nhwc(x, kernel, 1, pad)


def _conv_stride1_fwd(x: Array, kernel: Array, pad: int):
    return conv_nhwc(x, kernel, 1, pad), (x, kernel)


def _conv_stride1_bwd(pad: int, res: tuple[Array, Array], g: Array):
    x, kernel = res
    (dx,) = jax.linear_transpose(lambda x_: conv_nhwc(x_, kernel, 1, pad), x)(g)
    return dx, _kernel_grad_stride1(x, g, kernel.shape[0], pad).astype(kernel.dtype)


_conv_stride1.defvjp(_conv_stride1_fwd, _conv_stride1_bwd)


def conv2d(x: Array, kernel: Array, stride: int, pad: int) -> Array:
    """NHWC x HWIO convolution with symmetric padding, the way XLA's CPU backend runs it fastest:
    maps smaller than the kernel (2x2 under a 3x3) as patches + matmul (XLA's CPU conv is far
    slower there), stride-1 convs with `_kernel_grad_stride1` as their kernel gradient."""
    if min(x.shape[1], x.shape[2]) < kernel.shape[0]:
        return _im2col_conv(x, kernel, stride, pad)
    if stride == 1:
        return _conv_stride1(x, kernel, pad)
    return conv_nhwc(x, kernel, stride, pad)


def depthwise_shifts(
    x: Array, kernel: Array, stride: int, padding: tuple[tuple[int, int], tuple[int, int]]
) -> Array:
    """Depthwise convolution as a sum of k * k strided slices of the padded input, each times its
    per-channel weights: the grouped convolution's result from elementwise ops, whose gradients XLA's
    CPU backend runs far faster than its grouped-convolution gradients."""
    k = kernel.shape[0]
    b, h, w, c = x.shape
    (top, bottom), (left, right) = padding
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    ho = (h + top + bottom - k) // stride + 1
    wo = (w + left + right - k) // stride + 1
    out = None
    for i in range(k):
        for j in range(k):
            window = lax.slice(
                xp,
                (0, i, j, 0),
                (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                (1, stride, stride, 1),
            )
            term = window * kernel[i, j, 0]
            out = term if out is None else out + term
    return out
