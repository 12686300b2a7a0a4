"""What XLA's CPU backend needs, in one place: the XLA flag that the entry points set, and the
convolutions the models run on the CPU backend (their `conv_impl='auto'` picks these there; GPU and
TPU run XLA's own). Same parameters and results up to float rounding; the speed-ups they buy are
measured by `python -m benchmarks.backbones` and `python -m benchmarks.conv_layers`.
"""

from __future__ import annotations

import functools
import logging
import os
from importlib import metadata

import jax
import jax.numpy as jnp
from jax import lax

from marnet_jax.models.layers import conv_nhwc

Array = jax.Array

# jaxlib 0.10's XLA:CPU runs single convolutions through YNNPACK by default, which is slower than
# XLA's own (Eigen) convolutions on these ResNets (`python -m benchmarks.backbones`).
XLA_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
CONV_IMPLS = ("auto", "xla", "cpu")


def xla_flags_with_cpu_conv(xla_flags: str, jaxlib_version: str) -> str:
    """XLA_FLAGS with XLA's own CPU convolutions chosen, unless the user already set the option or
    the jaxlib may not know it (an unknown flag aborts the process)."""
    option = XLA_CPU_FLAG.split("=")[0]
    if not jaxlib_version.startswith("0.10.") or option in xla_flags:
        return xla_flags
    return f"{xla_flags} {XLA_CPU_FLAG}".strip()


# XLA's switches for CPU code that does not depend on the CPU model: no platform-dependent math
# (vendor libraries, approximations picked by instruction set) and no instruction set beyond AVX2,
# which every x86-64 server CPU of the last decade has. Opt-in (MARNET_PORTABLE_CPU=1): they may cost
# speed, and whether two CPU models then agree is for their fingerprints to show
# (`python -m benchmarks.fingerprint --portable`).
PORTABLE_ENV = "MARNET_PORTABLE_CPU"
PORTABLE_XLA_FLAGS = ("--xla_cpu_enable_platform_dependent_math=false", "--xla_cpu_max_isa=AVX2")


def portable_requested() -> bool:
    """Whether the environment asks for portable CPU code (MARNET_PORTABLE_CPU=1)."""
    return os.environ.get(PORTABLE_ENV, "") not in ("", "0")


def with_portable_flags(xla_flags: str) -> str:
    """XLA_FLAGS plus the portable switches the user has not set otherwise."""
    extra = [f for f in PORTABLE_XLA_FLAGS if f.split("=")[0] not in xla_flags]
    return " ".join([xla_flags, *extra]).strip()


def configure_xla() -> None:
    """Sets XLA_FLAGS for the CPU backend (and, with MARNET_PORTABLE_CPU=1, the portable switches);
    entry points call it before JAX starts a backend."""
    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        version = ""
    flags = xla_flags_with_cpu_conv(os.environ.get("XLA_FLAGS", ""), version)
    if portable_requested():
        flags = with_portable_flags(flags)
    if flags != os.environ.get("XLA_FLAGS", "") and _backends_started():
        logging.getLogger("marnet_jax").warning("JAX already started: %s has no effect.", flags)
    os.environ["XLA_FLAGS"] = flags


def _backends_started() -> bool:
    """Whether JAX has created a backend (its flags are read then); False where jax's private
    module that knows has moved."""
    try:
        from jax._src import xla_bridge
    except ImportError:
        return False
    return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())


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
