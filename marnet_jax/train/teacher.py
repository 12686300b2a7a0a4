"""The text teacher stage: the ingredient channel trained alone, before the joint stage.

The ingredient encoder, g_s and the text head (MARNet.text_logits) learn to classify dishes from
their ingredient lists (CE), as the lab's ATNet trains its text channel before it trains both
channels together. The joint stage then starts from these weights (and, under the 'teacher'
protocol, keeps them fixed: optim.text_lr_mult = 0).

The channel is small (an encoder over multi-hots), so a split's ingredient lists and labels are held
in memory, and every batch is a pure function of (seed, step): a permutation of the split per epoch.
A stage killed part-way resumes from its newest checkpoint under `<workdir>/teacher/` and draws the
very batches it would have drawn. Once finished, its parameters enter the joint stage's initial state,
whose own checkpoints carry them from then on. `config.teacher.init_from` takes a finished teacher
from another run's workdir instead of training one.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import traverse_util

from marnet_jax.data import datasets, pipeline
from marnet_jax.models.losses import cross_entropy
from marnet_jax.models.marnet import MARNet
from marnet_jax.train import checkpoint, optim, sharding
from marnet_jax.train.loop import StopFlag
from marnet_jax.train.metrics import MetricWriter
from marnet_jax.train.steps import TrainState

log = logging.getLogger("marnet_jax")
SUBDIR = "teacher"  # <workdir>/teacher/checkpoints/<step>/
_EPOCH_STREAM = 0x7E  # keeps the teacher's permutations apart from any other use of the seed


# --------------------------------------------------------------------------------------------------
# Data: ingredient lists and labels in memory.


def text_split(
    data_cfg: ml_collections.ConfigDict, split: str, training: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(ingredients float32 [N, V], labels int32 [N]) of `split`; for the training split only the
    fixed part that data.train_fraction trains on (the images' runs see the same examples)."""
    src = datasets.source(data_cfg, split)
    indices = np.arange(len(src))
    fraction = float(data_cfg.train_fraction)
    if training and fraction != 1.0:
        indices = pipeline.train_subset_indices(len(src), fraction)
    ingredients, labels = [], []
    for start in range(0, len(indices), 1024):
        for record in src.__getitems__([int(i) for i in indices[start : start + 1024]]):
            ingredients.append(np.asarray(record["ingredients"], np.float32))
            labels.append(int(record["label"]))
    if not labels:
        raise ValueError(
            f"{data_cfg.name} split {split!r} is empty: nothing to train a teacher on."
        )
    return np.stack(ingredients), np.asarray(labels, np.int32)


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The global batch `step` of a stream of per-epoch permutations of `num_examples` (a batch may
    span two epochs): a pure function of its arguments."""
    out: list[np.ndarray] = []
    position = step * batch_size
    while sum(len(x) for x in out) < batch_size:
        epoch, offset = divmod(position, num_examples)
        perm = np.random.default_rng([seed, _EPOCH_STREAM, epoch]).permutation(num_examples)
        take = perm[offset : offset + batch_size - sum(len(x) for x in out)]
        out.append(take)
        position += len(take)
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------------
# The text side of MARNet's parameters.


def text_params(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters of optim's 'text' group (ingredient encoder, g_s, text head), as a tree."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if optim.param_group(list(k)) == "text"}
    )


def with_text_params(params: dict[str, Any], text: dict[str, Any]) -> dict[str, Any]:
    """`params` with its text group replaced by `text` (same paths, shapes and dtypes)."""
    flat = traverse_util.flatten_dict(params)
    new = traverse_util.flatten_dict(text)
    for k, v in new.items():
        if k not in flat or flat[k].shape != v.shape or flat[k].dtype != v.dtype:
            have = (flat[k].shape, flat[k].dtype) if k in flat else "nothing"
            raise ValueError(
                f"teacher parameter {'/'.join(k)} {v.shape} {v.dtype} does not fit the model "
                f"({have}): the teacher's text encoder, embed_dim or class count differ."
            )
    missing = [k for k in flat if optim.param_group(list(k)) == "text" and k not in new]
    if missing:
        raise ValueError(f"the teacher lacks {'/'.join(missing[0])} (and {len(missing) - 1} more).")
    flat.update(new)
    return traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------------------------------
# The stage.


def _optimizer(teacher_cfg: ml_collections.ConfigDict) -> tuple[Any, optax.Schedule]:
    schedule = optim.make_schedule(
        ml_collections.ConfigDict(
            dict(lr=teacher_cfg.lr, warmup_steps=teacher_cfg.warmup_steps, final_lr_fraction=0.0)
        ),
        teacher_cfg.steps,
    )
    tx = optax.adamw(schedule, weight_decay=teacher_cfg.weight_decay, mask=optim.decay_mask)
    return tx, schedule


def _init(params: Any, rng: jax.Array, *, tx: Any) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats={},
        opt_state=tx.init(params),
        rng=rng,
    )


def teacher_step(
    state: TrainState, batch: dict[str, jax.Array], *, model: MARNet, tx: Any, schedule: Any
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step of the text channel on a batch of ingredient lists and labels."""
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        logits = model.apply(
            {"params": params},
            batch["ingredients"],
            train=True,
            rngs={"dropout": rng},
            method=MARNet.text_logits,
        )
        return cross_entropy(logits, batch["label"]), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return new, {"loss": loss, "accuracy": accuracy, "lr": schedule(state.step)}


def _correct(params: Any, ingredients: jax.Array, labels: jax.Array, *, model: MARNet) -> jax.Array:
    logits = model.apply({"params": params}, ingredients, method=MARNet.text_logits)
    return jnp.sum(jnp.argmax(logits, -1) == labels)


class TeacherStage:
    """The teacher stage of one run: its model, optimizer, shardings, data and checkpoints."""

    def __init__(self, config: ml_collections.ConfigDict, model: MARNet, mesh: Any):
        self.config, self.model, self.mesh = config, model, mesh
        self.cfg = config.teacher
        self.tx, self.schedule = _optimizer(self.cfg)

    def _shardings(self, params: Any, rng: jax.Array) -> tuple[TrainState, TrainState]:
        abstract = jax.eval_shape(functools.partial(_init, tx=self.tx), params, rng)
        return abstract, sharding.tree_shardings(abstract, self.mesh, self.config.mesh)

    def evaluator(self, split: str) -> Any:
        """params -> top-1 of the text channel on `split`'s ingredient lists (every process holds
        the whole split, replicated)."""
        ingredients, labels = text_split(self.config.data, split, training=False)
        replicated = sharding.replicated(self.mesh)
        put = lambda x: jax.make_array_from_process_local_data(replicated, x)
        ingredients, count, labels = put(ingredients), len(labels), put(labels)
        fn = jax.jit(functools.partial(_correct, model=self.model), out_shardings=replicated)
        return lambda params: float(fn(params, ingredients, labels)) / count

    def load_finished(self, workdir: str | epath.Path, target: Any) -> Any:
        """The text parameters of the finished teacher in another run's `workdir`, placed like
        `target` (this model's text parameters)."""
        manager = checkpoint.make_manager(epath.Path(workdir) / SUBDIR, self.config.checkpoint)
        try:
            step = manager.latest_step()
            if step is None:
                raise FileNotFoundError(
                    f"config.teacher.init_from={str(workdir)!r}: no teacher checkpoint in "
                    f"{manager.directory}."
                )
            saved = checkpoint.restore_as_saved(manager, step, self.mesh, self.config.mesh)
        finally:
            manager.close()
        params = with_text_params(target, saved["params"])
        log.info("Teacher: loaded from %s (step %d).", workdir, step)
        return jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), params, target)

    def run(
        self,
        workdir: epath.Path,
        init_params: Any,
        rng: jax.Array,
        writer: MetricWriter,
        stop: StopFlag,
    ) -> tuple[Any, int | None]:
        """Trains the teacher from `init_params` (this model's initial text parameters), resuming
        from `<workdir>/teacher/`; returns (trained text parameters, None), or (None, step) when
        SIGTERM stopped it (after saving a checkpoint at that step)."""
        cfg = self.cfg
        abstract, shardings = self._shardings(init_params, rng)
        manager = checkpoint.make_manager(workdir / SUBDIR, self.config.checkpoint)
        start = manager.latest_step()
        if start is None:
            init = jax.jit(functools.partial(_init, tx=self.tx), out_shardings=shardings)
            state, start = init(init_params, rng), 0
        else:
            target = checkpoint.abstract_with_shardings(abstract, shardings)
            state = checkpoint.restore(manager, start, target, None)
            log.info("Teacher: resumed from step %d in %s.", start, manager.directory)
        if start >= cfg.steps:
            manager.close()
            return state.params, None

        ingredients, labels = text_split(self.config.data, self.config.data.train_split, True)
        local = sharding.per_process_batch(cfg.batch_size, self.mesh, "config.teacher.batch_size")
        rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
        validation_top1 = self.evaluator(self.config.data.eval_split)
        step_fn = jax.jit(
            functools.partial(teacher_step, model=self.model, tx=self.tx, schedule=self.schedule),
            in_shardings=(shardings, sharding.batch_sharding(self.mesh)),
            out_shardings=(shardings, sharding.replicated(self.mesh)),
            donate_argnums=(0,),
        )
        step = start
        while step < cfg.steps:
            idx = batch_indices(len(labels), cfg.batch_size, self.config.seed, step)[rows]
            batch = sharding.global_batch(
                {"ingredients": ingredients[idx], "label": labels[idx]}, self.mesh
            )
            state, metrics = step_fn(state, batch)
            step += 1
            preempted = stop.should_stop(step, self.config.train.stop_check_every)
            if step % cfg.log_every == 0 or step == cfg.steps:
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                host["validation_top1"] = validation_top1(state.params)
                writer.write(step, SUBDIR, host)
                log.info(
                    "Teacher step %d: loss %.3f, validation top-1 %.1f %%.",
                    step,
                    host["loss"],
                    100 * host["validation_top1"],
                )
            if preempted or step == cfg.steps or step % cfg.checkpoint_every == 0:
                checkpoint.save(manager, step, state, None, force=True)
            if preempted:
                manager.wait_until_finished()
                manager.close()
                log.warning("SIGTERM: saved the teacher at step %d; exiting.", step)
                return None, step
        manager.wait_until_finished()
        manager.close()
        return state.params, None


def provide(
    config: ml_collections.ConfigDict,
    model: MARNet,
    mesh: Any,
    state: TrainState,
    workdir: str | epath.Path,
    writer: MetricWriter,
    stop: StopFlag,
) -> tuple[TrainState | None, int | None]:
    """The joint stage's initial `state` with a trained teacher's text parameters: trained here
    (resuming), or taken from config.teacher.init_from. Returns (state, None), or (None, step)
    when SIGTERM stopped the teacher stage at `step`."""
    stage = TeacherStage(config, model, mesh)
    target = text_params(state.params)
    if config.teacher.init_from:
        text = stage.load_finished(config.teacher.init_from, target)
    else:
        rng = jax.random.fold_in(state.rng, _EPOCH_STREAM)
        text, stopped = stage.run(epath.Path(workdir), target, rng, writer, stop)
        if text is None:
            return None, stopped
    return state.replace(params=with_text_params(state.params, text)), None
