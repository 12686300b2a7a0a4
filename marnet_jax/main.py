"""Command line: python -m marnet_jax.main --config configs/default.py[:arg] --workdir DIR [--mode eval]

Any config field can be overridden, e.g. `--config.train.num_steps=200 --config.model.use_cdr=False`.
The config is locked: a mistyped field is an error naming the field.
"""

from __future__ import annotations

import logging
import os
import re
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval"],
    "train: train then test; eval: evaluate the newest checkpoint.",
)


def maybe_initialize_distributed() -> None:
    """Starts JAX's multi-controller runtime when the environment describes a multi-process job.

    Explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (local tests, custom launchers).
    Automatic (jax.distributed.initialize() detects them): Cloud TPU pod slices, SLURM with >1 task.
    """
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        if "JAX_NUM_CPU_DEVICES" in env:
            jax.config.update("jax_num_cpu_devices", int(env["JAX_NUM_CPU_DEVICES"]))
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
            initialization_timeout=int(env.get("JAX_INIT_TIMEOUT", "300")),
        )
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def main(argv) -> None:
    del argv
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required.")
    maybe_initialize_distributed()
    absl_logging.set_verbosity(absl_logging.WARNING)  # library INFO logs (orbax) are noise here
    logging.getLogger("marnet_jax").setLevel(logging.INFO)
    from marnet_jax.train import trainer  # after distributed init: it touches devices on import

    if _MODE.value == "train":
        trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    else:
        trainer.evaluate(_CONFIG.value, _WORKDIR.value)


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, with a mistyped config field reported in one line that names it."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        message = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\n", " ")
        message = re.sub(r"[\\'\"]+", "'", message).strip("'")
        key = re.match(r"[A-Za-z_]\w*", message)
        overrides = [a[2:].split("=")[0] for a in argv if a.startswith("--config.")]
        named = [o for o in overrides if key and key.group(0) in o.split(".")]
        field = named[0] if named else "in a --config override"
        hint = message.split("'", 1)[1].strip(" '") if "'" in message else message
        sys.exit(f"marnet_jax.main: unknown config field {field}. {hint}")
    except flags.Error as e:
        sys.exit(f"marnet_jax.main: {e}")


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
