"""Train and evaluate MARNet: `train_and_evaluate`, plus `evaluate` for a finished run.

The same code runs on one CPU, on many fake CPU devices, on a GPU and across the hosts of a TPU pod: the
state is initialised directly into its shardings (eval_shape, then jit with out_shardings), every batch is
a global array sharded over the mesh, and the steps are jitted with donated state buffers.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from tqdm import tqdm

from marnet_jax.data import datasets
from marnet_jax.train import checkpoint, teacher
from marnet_jax.train.experiment import Experiment
from marnet_jax.train.loop import DevicePrefetcher, NonFiniteLossError, PendingMetrics, StopFlag
from marnet_jax.train.metrics import MetricWriter, summary_table

__all__ = ["NonFiniteLossError", "evaluate", "train_and_evaluate"]

log = logging.getLogger("marnet_jax")


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

    train_iter = exp.train_batches()
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
            exp, p_eval, results.pop("variables"), writer, results.pop("step")
        )
    writer.close()
    manager.close()
    return results


def _train(config, exp, p_eval, state, start, train_iter, manager, writer, stop) -> dict[str, Any]:
    """The joint stage's loop from `start` to config.train.num_steps: {'variables', 'step'} at the
    end, or {'preempted_at_step'} after SIGTERM (a checkpoint saved at that step)."""
    is_main = jax.process_index() == 0
    p_train = exp.jit_train_step()
    p_diag = exp.jit_grad_diagnostics() if config.train.grad_diag_every else None
    num_steps, last_saved = config.train.num_steps, (start or None)
    pending = PendingMetrics()
    batches = DevicePrefetcher(train_iter, exp.mesh, exp.decoder.train_keys())
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
            val = _evaluate_split(exp, p_eval, state.variables(), split)
            writer.write(step, split, val)
            window_start, window_steps = time.perf_counter(), 0
    bar.close()
    manager.wait_until_finished()
    return {"variables": state.variables(), "step": step}


def _evaluate_split(exp: Experiment, p_eval, variables, split: str) -> dict[str, float]:
    """Accuracy of every head over one split (image-only, every example counted once)."""
    rng = jax.random.PRNGKey(exp.config.seed)
    totals = None
    for i, batch in enumerate(exp.eval_batches(split)):
        sums = p_eval(variables, batch, jax.random.fold_in(rng, i))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals.pop("count")), 1.0)
    return {k: float(v) / count for k, v in totals.items()} | {"num_examples": count}


def _final_evaluation(exp: Experiment, p_eval, variables, writer, step) -> dict[str, Any]:
    results = {}
    for split in (exp.config.data.eval_split, exp.config.data.test_split):
        results[split] = _evaluate_split(exp, p_eval, variables, split)
        writer.write(step, split, results[split])
    if jax.process_index() == 0:
        table = summary_table(results)
        print(f"\nAccuracy (%) after {step} steps, image-only prediction:\n{table}", flush=True)
    return results


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Evaluates the newest checkpoint in `workdir` on the validation and test splits."""
    workdir = epath.Path(workdir)
    trained = Experiment.restore(workdir, config, facts=datasets.prepare(config.data))
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    exp = trained.exp
    results = _final_evaluation(exp, exp.jit_eval_step(), trained.variables, writer, trained.step)
    writer.close()
    if jax.process_index() == 0:
        (workdir / f"eval_step_{trained.step}.json").write_text(json.dumps(results, indent=2))
    return results
