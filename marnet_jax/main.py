"""Command line: python -m marnet_jax.main --config configs/default.py[:arg] --workdir DIR [--mode eval]

Any config field can be overridden, e.g. `--config.train.num_steps=200 --config.model.use_cdr=False`.
The config is locked: a mistyped field is an error naming the field.

Multi-process jobs (TPU pod slices, SLURM, launch/*.sh) start JAX's distributed runtime by themselves;
`--multihost=on|off` (or MARNET_MULTIHOST=1|0) overrides the detection, see `multihost_reason`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence

import jax
from absl import flags

from marnet_jax import cli

PROG = "marnet_jax.main"


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None) -> None:
    cli.define_config(fv, argv, "Directory for checkpoints, metrics and results.")
    flags.DEFINE_enum(
        "mode",
        "train",
        ["train", "eval"],
        "train: train then test; eval: evaluate the newest checkpoint.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "multihost",
        None,
        ["auto", "on", "off"],
        "Start JAX's multi-process runtime (jax.distributed.initialize) before the run: 'auto' "
        "detects a multi-process job (see maybe_initialize_distributed), 'on' always starts it and "
        "lets JAX find the cluster (Cloud TPU, SLURM, Open MPI, Kubernetes), 'off' never does. "
        "Default: $MARNET_MULTIHOST (auto | on | off, also 1 | 0), else auto.",
        flag_values=fv,
    )


_MULTIHOST_ENV = "MARNET_MULTIHOST"
_MODES = {
    "auto": "auto",
    "on": "on",
    "1": "on",
    "true": "on",
    "off": "off",
    "0": "off",
    "false": "off",
}


def _on_cloud_tpu_vm() -> bool:
    """Whether this is a Cloud TPU VM with TPU chips and libtpu: jax records it when it is imported."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:  # a private module: if it moves, say no (use --multihost=on there)
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def multihost_reason(mode: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """Why this process should call jax.distributed.initialize(), or None for a single-process run.

    mode: 'auto' | 'on' | 'off' (None: $MARNET_MULTIHOST, else 'auto'). In 'auto':
      - JAX_COORDINATOR_ADDRESS is set (our launchers, custom launchers, local tests);
      - SLURM with more than one task;
      - Cloud TPU: TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES list several hosts (GKE), or this is a
        Cloud TPU VM at all. A VM created by hand (`gcloud compute tpus tpu-vm create`) sets neither
        variable; JAX reads the workers from the VM metadata server instead. On a single-host TPU VM the
        call finds one process and changes nothing; JAX recommends it on every Cloud TPU VM.
    Plain CPU and single-host GPU runs match none of these.
    """
    env = os.environ if env is None else env
    raw = mode if mode is not None else env.get(_MULTIHOST_ENV, "auto")
    if raw.strip().lower() not in _MODES:
        raise ValueError(
            f"{_MULTIHOST_ENV}/--multihost must be one of auto, on, off (or 1, 0); got {raw!r}."
        )
    mode = _MODES[raw.strip().lower()]
    if mode == "off":
        return None
    if "JAX_COORDINATOR_ADDRESS" in env:
        return "JAX_COORDINATOR_ADDRESS is set"
    if mode == "on":
        return "--multihost=on"
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM job with several tasks"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if "," in hosts:
        return "TPU worker list in the environment"
    if _on_cloud_tpu_vm():
        return "Cloud TPU VM"
    return None


def maybe_initialize_distributed(mode: str | None = None) -> str | None:
    """Starts JAX's multi-controller runtime when `multihost_reason` says so; returns the reason.

    With JAX_COORDINATOR_ADDRESS the job is described explicitly by JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID (and JAX_NUM_CPU_DEVICES, JAX_INIT_TIMEOUT); otherwise
    jax.distributed.initialize() detects the cluster itself (Cloud TPU metadata, SLURM, Open MPI, ...).
    Must run before anything touches a device.
    """
    reason = multihost_reason(mode)
    if reason is None:
        return None
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
    else:
        jax.distributed.initialize()
    logging.getLogger("marnet_jax").info(
        "Multi-process runtime started (%s): process %d of %d.",
        reason,
        jax.process_index(),
        jax.process_count(),
    )
    return reason


def main(argv: Sequence[str] | None = None) -> int:
    """Trains and tests (--mode train) or evaluates (--mode eval) the config in --workdir; the exit
    status."""
    args, rest = cli.parse_flags(
        PROG, lambda fv: define_flags(fv, argv), argv, "--config FILE --workdir DIR", __doc__
    )
    if rest:
        cli.usage_error(PROG, f"unexpected arguments {rest}.")
    try:
        maybe_initialize_distributed(args.multihost)
    except ValueError as e:  # a bad MARNET_MULTIHOST
        cli.usage_error(PROG, str(e))
    from marnet_jax.train import checkpoint, trainer  # after distributed init: touches devices

    try:
        if args.mode == "train":
            trainer.train_and_evaluate(args.config, args.workdir)
        else:
            trainer.evaluate(args.config, args.workdir)
    except checkpoint.CheckpointError as e:
        # orbax leaves its reads of a damaged checkpoint unfinished; asyncio would log each one
        # at exit under the one-line error.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
