"""Test session set-up: 8 fake CPU devices (for sharding tests) and parsed absl flags (for grain workers)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
jax.config.update("jax_threefry_partitionable", True)
