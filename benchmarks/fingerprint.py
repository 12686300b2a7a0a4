"""A fingerprint of this machine's numbers: a hash of a config's train state after a few steps.

    python -m benchmarks.fingerprint                 # configs/tiny.py, 4 steps, 1 device
    python -m benchmarks.fingerprint --portable      # with the CPU code pinned (see below)
    MARNET_PORTABLE_CPU=1 python -m marnet_jax.main --config configs/default.py --workdir DIR

The same seed gives the same numbers on one machine, but XLA compiles other code for another CPU
model (instruction set, platform math libraries) and so another trajectory. Two machines that print
the same fingerprint compute the same steps to the last bit; README's "Reproducibility" lists the
fingerprints of the CPUs the project has run on. `--portable` (for any command: the environment
variable MARNET_PORTABLE_CPU=1) sets XLA's switches for code that does not depend on the CPU
(marnet_jax.cpu.PORTABLE_XLA_FLAGS); what they cost per step is measured by `python -m
benchmarks.train_step` with and without the variable.

The batches are synthetic (benchmarks._common.synthetic_train_batch, seeded), so no dataset is read.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags

from marnet_jax import cli, cpu, reporting
from marnet_jax.data.config import train_image_size

PROG = "benchmarks.fingerprint"


def state_hash(state: Any) -> str:
    """sha256 over every array of `state` (tree order, shapes, dtypes and bytes): 16 hex digits."""
    import jax
    import numpy as np

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(state)):
        a = np.asarray(leaf)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def fingerprint(config_name: str = "tiny", arg: str | None = None, steps: int = 4) -> dict:
    """Trains `steps` steps of configs/<config_name>.py on synthetic batches, on one device."""
    import jax

    from benchmarks import _common
    from marnet_jax.data import datasets
    from marnet_jax.train import sharding
    from marnet_jax.train.experiment import Experiment

    module = importlib.import_module(f"configs.{config_name}")
    config = module.get_config(arg) if arg else module.get_config()
    config.mesh.num_devices = 1
    facts = datasets.shape_facts(config.data)
    exp = Experiment.build(config, facts)
    state, step = exp.initial_state(), exp.jit_train_step()
    losses = []
    for i in range(steps):
        host = _common.synthetic_train_batch(
            config.train.batch_size,
            train_image_size(config.data),
            facts.num_classes,
            facts.num_ingredients,
            seed=i,
        )
        state, metrics = step(state, sharding.global_batch(host, exp.mesh))
        losses.append(float(jax.device_get(metrics["loss"])))
    return {
        "fingerprint": state_hash(state),
        "config": f"{config_name}{':' + arg if arg else ''}",
        "steps": steps,
        "losses": losses,
        "portable": cpu.portable_requested(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "machine": reporting.machine(),
    }


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "config", "tiny", "A module of configs/ (tiny, default, ...).", flag_values=fv
    )
    flags.DEFINE_string("arg", None, "The config's argument (e.g. baseline).", flag_values=fv)
    flags.DEFINE_integer("steps", 4, "Train steps before the hash.", flag_values=fv)
    flags.DEFINE_bool(
        "portable", False, "Pin the CPU code (MARNET_PORTABLE_CPU=1).", flag_values=fv
    )
    flags.DEFINE_string("json", None, "Also write the result here.", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    fv, rest = cli.parse_flags(PROG, _define, argv, doc=__doc__)
    if rest:
        cli.usage_error(PROG, f"unexpected arguments {rest}.")
    if fv.steps < 1:
        cli.usage_error(PROG, f"--steps {fv.steps}: expected >= 1.")
    if fv.portable:
        os.environ[cpu.PORTABLE_ENV] = "1"
        cpu.configure_xla()  # before JAX starts its backend (cli.run has set the rest)
    out = fingerprint(fv.config, fv.arg, fv.steps)
    m = out["machine"]
    print(
        f"fingerprint {out['fingerprint']}  ({out['config']}, {out['steps']} steps, "
        f"{'portable' if out['portable'] else 'native'} CPU code; {m['cpu']}, "
        f"jax {m['jax_version']})"
    )
    print("losses: " + " ".join(f"{x:.6f}" for x in out["losses"]))
    if fv.json:
        reporting.write_json(fv.json, out)
    return 0


if __name__ == "__main__":
    cli.run(lambda: main(sys.argv[1:]))
