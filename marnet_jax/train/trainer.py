"""Train and evaluate MARNet: `train_and_evaluate`, plus `evaluate` and `load_trained` for a finished run.

The same code runs on one CPU, on many fake CPU devices, on a GPU and across the hosts of a TPU pod: the
state is initialised directly into its shardings (eval_shape, then jit with out_shardings), every batch is
a global array sharded over the mesh, and the steps are jitted with donated state buffers.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from tqdm import tqdm

from marnet_jax.data import dali, datasets, pipeline
from marnet_jax.models import build_model
from marnet_jax.models.config import upgrade_model_config
from marnet_jax.models.marnet import MARNet
from marnet_jax.train import checkpoint, sharding, teacher
from marnet_jax.train.experiment import Experiment, jit_eval_step
from marnet_jax.train.loop import DevicePrefetcher, NonFiniteLossError, PendingMetrics, StopFlag
from marnet_jax.train.metrics import MetricWriter, summary_table

__all__ = ["NonFiniteLossError", "Trained", "evaluate", "load_trained", "train_and_evaluate"]

log = logging.getLogger("marnet_jax")
# "jitter", "flip" when drawn; "box", "extent" with data.decoder 'cpu_decode'
TRAIN_KEYS = ("image", "box", "extent", "jitter", "flip", "label", "ingredients")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from the newest checkpoint in `workdir`), then evaluates on the validation
    and test splits. Returns {split: accuracies (fractions) of the fused, visual and CDR heads}, or
    {'preempted_at_step': step} after SIGTERM."""
    workdir = epath.Path(workdir)
    is_main = jax.process_index() == 0
    exp = Experiment.build(config)
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    exp.log_layout()

    train_iter = pipeline.train_iterator(
        config.data,
        config.data.train_split,
        batch_size=sharding.per_process_batch(
            config.train.batch_size, exp.mesh, "config.train.batch_size"
        ),
        seed=config.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    train_iter = dali.decoded(train_iter, sharding.batch_sharding(exp.mesh), config.data)
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    start = checkpoint.resume_step(manager, workdir, config.checkpoint.resume_step)
    writer = MetricWriter(workdir, enabled=is_main)
    with StopFlag() as stop:
        if start is None:
            state, start = exp.initial_state(), 0
            if exp.model.use_text_head:
                state, stopped = teacher.provide(
                    config, exp.model, exp.mesh, state, workdir, writer, stop
                )
                if state is None:
                    writer.close()
                    manager.close()
                    return {"preempted_at_step": stopped, "stage": "teacher"}
        else:
            state = checkpoint.restore(manager, start, exp.restore_target(), train_iter)
            log.info("Resumed from step %d in %s.", start, workdir)
        p_eval = exp.jit_eval_step()
        results = _train(config, exp, p_eval, state, start, train_iter, manager, writer, stop)
    if "preempted_at_step" not in results:
        results = _final_evaluation(
            p_eval,
            results.pop("variables"),
            config,
            exp.mesh,
            writer,
            results.pop("step"),
        )
    writer.close()
    manager.close()
    return results


def _train(config, exp, p_eval, state, start, train_iter, manager, writer, stop) -> dict[str, Any]:
    """The joint stage's loop from `start` to config.train.num_steps: {'variables', 'step'} at the
    end, or {'preempted_at_step'} after SIGTERM (a checkpoint saved at that step)."""
    is_main = jax.process_index() == 0
    p_train = exp.jit_train_step()
    p_diag = exp.jit_grad_diagnostics() if config.train.get("grad_diag_every", 0) else None
    num_steps, last_saved = config.train.num_steps, (start or None)
    pending = PendingMetrics()
    batches = DevicePrefetcher(train_iter, exp.mesh, TRAIN_KEYS)
    window_start, window_steps = time.perf_counter(), 0
    bar = tqdm(total=num_steps, initial=start, disable=not is_main, mininterval=2.0, unit="step")

    step = start
    while step < num_steps:
        batch = next(batches)
        if p_diag is not None and step % config.train.grad_diag_every == 0:
            writer.write(step, "grad", jax.device_get(p_diag(state, batch)))
        state, metrics = p_train(state, batch)
        step += 1
        window_steps += 1
        pending.add(step, metrics, last_saved)

        if step % config.train.log_every == 0 or step == num_steps:
            pending.drain(last_saved)
            host = jax.device_get(metrics)
            elapsed = time.perf_counter() - window_start
            host["step_time_s"] = elapsed / window_steps
            host["examples_per_s"] = config.train.batch_size * window_steps / elapsed
            writer.write(step, "train", host)
            bar.set_postfix(loss=f"{host['loss']:.3f}", acc=f"{host['accuracy']:.3f}")
            window_start, window_steps = time.perf_counter(), 0
        bar.update(1)

        preempted = stop.should_stop(step, config.train.stop_check_every)
        every = config.checkpoint.every_steps
        if preempted or step == num_steps or (every and step % every == 0):
            pending.drain(last_saved)
            checkpoint.save(manager, step, state, batches.position(), force=True)
            last_saved = step
        if preempted:
            log.warning("SIGTERM: saved a checkpoint at step %d; exiting.", step)
            manager.wait_until_finished()
            bar.close()
            return {"preempted_at_step": step}

        if config.train.eval_every and step % config.train.eval_every == 0 and step < num_steps:
            split = config.data.eval_split
            val = _evaluate_split(p_eval, state.variables(), config, split, exp.mesh)
            writer.write(step, split, val)
            window_start, window_steps = time.perf_counter(), 0
    bar.close()
    manager.wait_until_finished()
    return {"variables": state.variables(), "step": step}


def _evaluate_split(p_eval, variables, config, split: str, mesh) -> dict[str, float]:
    """Accuracy of every head over one split (image-only, every example counted once)."""
    batch_size = sharding.per_process_batch(
        config.train.eval_batch_size, mesh, "config.train.eval_batch_size"
    )
    rng = jax.random.PRNGKey(config.seed)
    totals = None
    for i, local in enumerate(
        pipeline.eval_batches(
            config.data,
            split,
            batch_size=batch_size,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )
    ):
        local = {k: local[k] for k in ("image", "label", "ingredients", "mask")}
        sums = p_eval(variables, sharding.global_batch(local, mesh), jax.random.fold_in(rng, i))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals.pop("count")), 1.0)
    return {k: float(v) / count for k, v in totals.items()} | {"num_examples": count}


def _final_evaluation(p_eval, variables, config, mesh, writer, step) -> dict[str, Any]:
    results = {}
    for split in (config.data.eval_split, config.data.test_split):
        results[split] = _evaluate_split(p_eval, variables, config, split, mesh)
        writer.write(step, split, results[split])
    if jax.process_index() == 0:
        table = summary_table(results)
        print(f"\nAccuracy (%) after {step} steps, image-only prediction:\n{table}", flush=True)
    return results


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Evaluates the newest checkpoint in `workdir` on the validation and test splits."""
    workdir = epath.Path(workdir)
    trained = load_trained(workdir, config, facts=datasets.prepare(config.data))
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    p_eval = jit_eval_step(trained.model, trained.mesh, config.data)
    results = _final_evaluation(
        p_eval, trained.variables, config, trained.mesh, writer, trained.step
    )
    writer.close()
    if jax.process_index() == 0:
        (workdir / f"eval_step_{trained.step}.json").write_text(json.dumps(results, indent=2))
    return results


def read_config(workdir: str | epath.Path) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to `<workdir>/config.json` (tuples come back as lists; a
    model section of an earlier layout is upgraded)."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir.")
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    config.model = upgrade_model_config(config.model)
    return config


class Trained(NamedTuple):
    """A restored run, ready for image-only prediction (`model.apply(variables, images,
    rngs={'diffusion': key}, method=MARNet.predict)`)."""

    config: ml_collections.ConfigDict
    model: MARNet
    variables: dict[str, Any]  # {'params', 'batch_stats'?} placed on `mesh` (replicated or FSDP)
    step: int
    mesh: jax.sharding.Mesh
    facts: datasets.DatasetFacts


def checkpoint_facts(params: Any, data_cfg: ml_collections.ConfigDict) -> datasets.DatasetFacts:
    """The shapes a prediction needs, read from a checkpoint's parameters instead of the dataset:
    the class count (fused head) and, for the ingredient head only, the ingredient count. Class
    names are indices."""
    num_classes = int(params["fused_head"]["classifier"]["kernel"].shape[-1])
    aux = params.get("aux_head")
    num_ingredients = int(aux["classifier"]["kernel"].shape[-1]) if aux else None
    return datasets.DatasetFacts(
        name=data_cfg.name,
        builder_config=data_cfg.builder_config,
        num_classes=num_classes,
        num_ingredients=num_ingredients,
        class_names=tuple(str(i) for i in range(num_classes)),
        ingredient_names=(),
        split_sizes={},
        image_shape=None,
    )


def load_trained(
    workdir: str | epath.Path,
    config: ml_collections.ConfigDict | None = None,
    step: int | None = None,
    facts: datasets.DatasetFacts | None = None,
) -> Trained:
    """Restores the model variables of checkpoint `step` (default: the newest) of a training run.

    `config` defaults to the run's own config.json; pass one to read the data from elsewhere or to
    use another mesh (the model section must match the checkpoint). The variables are placed on
    config.mesh by its FSDP rules. `facts` defaults to `checkpoint_facts` (no dataset needed).
    """
    workdir = epath.Path(workdir)
    config = read_config(workdir) if config is None else config
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.exists():
        raise FileNotFoundError(f"No checkpoints in {ckpt_dir}: train first (marnet_jax.main).")
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {ckpt_dir}.")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"No checkpoint for step {step} in {ckpt_dir}; have {steps}.")
        mesh = sharding.make_mesh(config.mesh)
        state = checkpoint.restore_as_saved(manager, step, mesh, config.mesh)
    finally:
        manager.close()
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    facts = checkpoint_facts(variables["params"], config.data) if facts is None else facts
    model = build_model(config.model, facts.num_classes, facts.num_ingredients)
    return Trained(config, model, variables, int(step), mesh, facts)
