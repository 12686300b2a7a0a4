"""Test session set-up: 8 fake CPU devices (for sharding tests), parsed absl flags (for grain workers),
and a persistent XLA compilation cache shared by the in-process runs and the subprocesses they start
(many tests compile the same tiny train step: compiled once, loaded afterwards)."""

import os
import tempfile

# Tests are compile-bound on tiny models: skipping LLVM optimisation compiles ~40% faster.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "marnet_jax_test_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax
import pytest
from absl import flags

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
