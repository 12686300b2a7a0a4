"""The XLA flags that the entry points set for XLA's CPU backend (before JAX starts it). The
convolutions the models run there are in marnet_jax.models.cpu_conv.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata

# jaxlib 0.10's XLA:CPU runs single convolutions through YNNPACK by default, which is slower than
# XLA's own (Eigen) convolutions on these ResNets (`python -m benchmarks.backbones`).
XLA_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


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
