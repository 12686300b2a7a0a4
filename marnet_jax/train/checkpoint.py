"""Checkpoints with orbax: the sharded train state plus each process's input-iterator state.

Orbax writes every checkpoint into a temporary directory and renames it only once complete, so a crash or
kill mid-save never leaves a step directory that restores silently. The train state is restored straight
onto the target shardings, so a run can resume on another mesh or device count. A checkpoint that cannot
be read, or lacks this process's input-iterator state, stops the run with a CheckpointError that names it
and says how to resume from an earlier one (config.checkpoint.resume_step).
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from marnet_jax.train import sharding

_STATE = "state"
_DATA = "data_iter"
SET_ASIDE = (
    "checkpoints_set_aside"  # under the workdir: newer checkpoints passed over by resume_step
)
log = logging.getLogger("marnet_jax")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names it and the way to go on."""


def is_run_dir(path: str | epath.Path) -> bool:
    """Whether `path` is a training workdir (config.json and checkpoints/), not a weights file."""
    path = epath.Path(path)
    return (path / "config.json").exists() and (path / "checkpoints").is_dir()


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


def _earlier_hint(manager, step: int) -> str:
    earlier = [s for s in manager.all_steps() if s < step]
    if not earlier:
        return "No earlier checkpoint is kept: start the run afresh in a new workdir."
    return (
        f"Resume from the previous one with --config.checkpoint.resume_step={max(earlier)} "
        f"(checkpoints after it are then moved to {SET_ASIDE}/ in the workdir)."
    )


def _restore_iterator(manager, step: int, data_iter: Any) -> None:
    """Restores this process's iterator position; a position that is missing while the checkpoint
    was written by as many processes as now is an error (the data stream would silently restart)."""
    index, count = jax.process_index(), jax.process_count()
    data_dir = epath.Path(manager.directory) / str(step) / _DATA
    path = data_dir / f"process_{index}-of-{count}.json"
    written = (
        sorted(p.name for p in data_dir.glob("process_*-of-*.json")) if data_dir.exists() else []
    )
    if path.exists():
        manager.restore(
            step, args=ocp.args.Composite(**{_DATA: grain.checkpoint.CheckpointRestore(data_iter)})
        )
    elif written and not any(name.endswith(f"-of-{count}.json") for name in written):
        log.warning(
            "No input-iterator state for process %d of %d in checkpoint %d (written by another "
            "process count: %s); the input pipeline restarts from its first batch.",
            index,
            count,
            step,
            ", ".join(written),
        )
    else:
        raise CheckpointError(
            f"{path} is missing: checkpoint {step} has no input-iterator position for process "
            f"{index} of {count}. Resuming would restart the data stream from its first batch and "
            f"the run would no longer match an uninterrupted one. " + _earlier_hint(manager, step)
        )


def restore(manager, step: int, target: Any, data_iter: Any | None) -> Any:
    """Restores the state at `step` onto `target` (see abstract_with_shardings) and the iterator.

    The iterator state is per process; when the checkpoint was written by a different number of
    processes it cannot be mapped, so the iterator starts afresh and a warning says so. An unreadable
    checkpoint, or a missing iterator state otherwise, raises CheckpointError.
    """
    where = epath.Path(manager.directory) / str(step)
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
        )
        if data_iter is not None:
            _restore_iterator(manager, step, data_iter)
    except CheckpointError:
        raise
    except Exception as e:  # orbax and tensorstore raise many types for a damaged checkpoint
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        # tensorstore appends the repr of a bound C++ method, not details: keep what precedes it.
        first = first.split(" See full TensorStore details")[0]
        raise CheckpointError(
            f"Checkpoint {where} cannot be read ({type(e).__name__}: {first}): it is damaged, "
            "or the config's model is not the one the run trained. " + _earlier_hint(manager, step)
        ) from e
    return restored[_STATE]


def saved_tree(manager, step: int) -> Any:
    """The state tree of checkpoint `step` as saved, from its metadata: shapes and dtypes, no
    arrays read."""
    return manager.item_metadata(step)[_STATE].tree


def restore_as_saved(manager, step: int, mesh, mesh_cfg: ml_collections.ConfigDict) -> Any:
    """The state of checkpoint `step` in the tree it was saved with (no model needed: the tree
    comes from the checkpoint's metadata), placed on `mesh` by its FSDP rules."""
    saved = saved_tree(manager, step)
    shardings = sharding.tree_shardings(saved, mesh, mesh_cfg)
    target = jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), saved, shardings
    )
    return restore(manager, step, target, None)


def resume_step(manager, workdir: str | epath.Path, requested: int) -> int | None:
    """The step to resume from: the newest (`requested` < 0) or `requested`.

    Checkpoints after a requested step are moved to `<workdir>/checkpoints_set_aside/` (kept, not
    deleted) so that the resumed run can write its own at those steps. The request is carried out
    once: a marker there makes a later run with the same flag (a restart after preemption, say)
    resume from its newest checkpoint instead of going back again.
    """
    steps = sorted(manager.all_steps())
    newest = steps[-1] if steps else None
    if requested < 0:
        return newest
    aside = epath.Path(workdir) / SET_ASIDE
    done = aside / f"resumed_from_{requested}"
    if done.exists():
        log.warning(
            "config.checkpoint.resume_step=%d was carried out before (%s); resuming from the "
            "newest checkpoint, %s.",
            requested,
            done,
            newest,
        )
        return newest
    if requested not in steps:
        raise ValueError(
            f"config.checkpoint.resume_step={requested}: no such checkpoint in "
            f"{manager.directory}; it has steps {steps}."
        )
    later = [s for s in steps if s > requested]
    if jax.process_index() == 0:
        aside.mkdir(parents=True, exist_ok=True)
        for s in later:
            dest = aside / str(s)
            n = 1
            while dest.exists():
                dest, n = aside / f"{s}.{n}", n + 1
            shutil.move(str(epath.Path(manager.directory) / str(s)), str(dest))
            log.warning("Resuming from step %d: moved checkpoint %d to %s.", requested, s, dest)
        done.write_text(f"moved aside: {later}\n")
    multihost_utils.sync_global_devices("marnet_jax_resume_step")
    if later:
        manager.reload()
    return requested
