"""Test session set-up: 8 fake CPU devices (for sharding tests), the CPU backend only, parsed absl flags
(for grain workers), and no persistent XLA compilation cache."""

import os

# Tests are compile-bound on tiny models: skipping LLVM optimisation compiles them much faster.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
# No persistent compilation cache, for this process or the subprocesses the tests start: with jaxlib
# 0.10.2 a process that loaded a cached executable of the 8-device sharded train step aborted
# (SIGABRT inside XLA, no Python error).
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
# CPU only, here and in subprocesses: with the TPU runtime library installed (for the preflight), jax
# would otherwise probe for TPU chips and print libtpu's warnings into the stderr the tests read.
# The preflight's topologies do not need the TPU backend.
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import pytest
from absl import flags

from marnet_jax import cpu

cpu.configure_xla()  # as the entry points do

flags.FLAGS.mark_as_parsed()
jax.config.update("jax_threefry_partitionable", True)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """The 'tiny' synthetic_food dataset, built once per test session."""
    from configs import tiny
    from marnet_jax.data import datasets

    data_dir = tmp_path_factory.mktemp("tfds")
    config = tiny.get_config()
    config.data.data_dir = str(data_dir)
    datasets.prepare(config.data)
    return data_dir
