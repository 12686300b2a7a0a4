"""marnet_jax: MARNet (multimodal alignment + cross-modal diffusion reconstruction) in JAX/Flax."""

import os
from importlib import metadata

__version__ = "0.1.0"

# XLA:CPU in jaxlib 0.10 runs single convolutions through YNNPACK by default. On the ResNets here that
# made a train step about twice as slow as XLA's own (Eigen) convolutions: 470-520 ms against
# 270-320 ms for the default config's backbone step, 1.95 s against 0.93 s for a ResNet-18 at 224 px,
# batch 8 (2-core x86 CPU; `python -m benchmarks.backbones`). The flag is read when the first backend
# starts, so it takes effect if this package is imported before JAX first runs anything. A user's own
# setting of the same option in XLA_FLAGS wins; other jaxlib versions, which may not know the flag
# (an unknown flag aborts the process), are left alone.
_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def _with_cpu_conv_flag(xla_flags: str, jaxlib_version: str) -> str:
    """XLA_FLAGS with XLA's own CPU convolutions chosen, unless already decided or unsupported."""
    option = _CPU_FLAG.split("=")[0]
    if not jaxlib_version.startswith("0.10.") or option in xla_flags:
        return xla_flags
    return f"{xla_flags} {_CPU_FLAG}".strip()


def _jaxlib_version() -> str:
    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return ""


os.environ["XLA_FLAGS"] = _with_cpu_conv_flag(os.environ.get("XLA_FLAGS", ""), _jaxlib_version())
