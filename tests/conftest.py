"""Test session set-up: 8 fake CPU devices (for sharding tests) and parsed absl flags (for grain workers)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
from absl import flags

flags.FLAGS.mark_as_parsed()
jax.config.update("jax_threefry_partitionable", True)


import pytest  # noqa: E402


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
