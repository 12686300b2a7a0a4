"""Checkpoints with orbax: the sharded train state plus each process's input-iterator state.

Orbax writes every checkpoint into a temporary directory and renames it only once complete, so a crash or
kill mid-save never leaves a step directory that restores silently. The train state is restored straight
onto the target shardings, so a run can resume on another mesh or device count.
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

_STATE = "state"
_DATA = "data_iter"


def make_manager(workdir: str | epath.Path, ckpt_cfg: ml_collections.ConfigDict):
    """CheckpointManager under `<workdir>/checkpoints` keeping the `keep` newest steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep,
        enable_async_checkpointing=ckpt_cfg.async_save,
        create=True,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(
        epath.Path(workdir) / "checkpoints",
        options=options,
        item_handlers={
            _STATE: ocp.StandardCheckpointHandler(),
            _DATA: grain.checkpoint.CheckpointHandler(),
        },
    )


def save(manager, step: int, state: Any, data_iter: Any | None, *, force: bool = False) -> bool:
    """Starts an (async) save of `state` and the data iterator position at `step`."""
    args = {_STATE: ocp.args.StandardSave(state)}
    if data_iter is not None:
        args[_DATA] = grain.checkpoint.CheckpointSave(data_iter)
    return manager.save(step, args=ocp.args.Composite(**args), force=force)


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings: orbax restores directly onto them."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_state,
        shardings,
    )


def restore(manager, step: int, target: Any, data_iter: Any | None) -> Any:
    """Restores the state at `step` onto `target` (see abstract_with_shardings) and the iterator.

    The iterator state is per process; when the checkpoint was written by a different number of
    processes it cannot be mapped, so the iterator starts afresh and a warning says so.
    """
    restored = manager.restore(
        step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
    )
    state = restored[_STATE]
    if data_iter is not None:
        index, count = jax.process_index(), jax.process_count()
        path = (
            epath.Path(manager.directory) / str(step) / _DATA / f"process_{index}-of-{count}.json"
        )
        if path.exists():
            manager.restore(
                step,
                args=ocp.args.Composite(**{_DATA: grain.checkpoint.CheckpointRestore(data_iter)}),
            )
        else:
            logging.getLogger("marnet_jax").warning(
                "No input-iterator state for process %d of %d in checkpoint %d (written by another "
                "process count); the input pipeline restarts from its first batch.",
                index,
                count,
                step,
            )
    return state
