"""Train and evaluate MARNet: the one function `train_and_evaluate`, plus `evaluate` for a finished run.

The same code runs on one CPU, on many fake CPU devices, on a GPU and across the hosts of a TPU pod: the
state is initialised directly into its shardings (eval_shape, then jit with out_shardings), every batch is
a global array sharded over the mesh, and the steps are jitted with donated state buffers.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from marnet_jax.data import datasets, pipeline
from marnet_jax.models import build_model, pretrained, word_vectors
from marnet_jax.train import checkpoint, sharding
from marnet_jax.train.metrics import MetricWriter, summary_table
from marnet_jax.train.optim import make_optimizer
from marnet_jax.train.steps import eval_step, init_state, train_step

log = logging.getLogger("marnet_jax")


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/Inf; the last good checkpoint is left as it was."""


def _per_process(global_size: int, mesh: jax.sharding.Mesh, what: str) -> int:
    if global_size % mesh.size:
        raise ValueError(f"{what}={global_size} must be divisible by the {mesh.size} devices.")
    return global_size // jax.process_count()


class _StopFlag:
    """Set by SIGTERM (preemption); checked by the train loop, agreed on across processes."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step: int, every: int) -> bool:
        if jax.process_count() == 1:
            return self._event.is_set()
        if step % every:
            return False
        flags = multihost_utils.process_allgather(np.int32(self._event.is_set()))
        return bool(np.any(flags))


def _setup(
    config: ml_collections.ConfigDict,
    facts: datasets.DatasetFacts | None = None,
    devices: list[Any] | None = None,
):
    """Dataset facts, mesh, model, optimizer and the abstract state with its shardings.

    `facts` given (benchmarks, preflight: only the shapes matter) skips preparing the dataset;
    `devices` (default: jax.devices()) may be a TPU topology's abstract devices (preflight).
    """
    facts = datasets.prepare(config.data) if facts is None else facts
    mesh = sharding.make_mesh(config.mesh, devices)
    model = build_model(config.model, facts.num_classes, facts.num_ingredients)
    tx, schedule = make_optimizer(config.optim, config.train.num_steps)
    image_shape = (config.data.image_size, config.data.image_size, 3)
    init_fn = functools.partial(
        init_state,
        model=model,
        tx=tx,
        image_shape=image_shape,
        num_ingredients=facts.num_ingredients,
    )
    rng = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(init_fn, rng)
    shardings = sharding.tree_shardings(abstract, mesh, config.mesh)
    return facts, mesh, model, tx, schedule, init_fn, rng, abstract, shardings


def _compile_once(jitted, *args):
    """Compiles a function that runs once (initialisation) without LLVM optimisation on the CPU.

    XLA's CPU backend spends most of an init's compile time optimising random-number code that then runs
    a single time: unoptimised, the tiny config's init compiles about 8x faster.
    """
    lowered = jitted.lower(*args)
    if jax.default_backend() == "cpu":
        return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    return lowered.compile()


def _initial_state(config, facts, init_fn, rng, shardings):
    """A fresh run's state on its shardings, with the pretrained parts the config names (backbone
    weights, ingredient word vectors) placed on the same shardings."""
    state = _compile_once(jax.jit(init_fn, out_shardings=shardings), rng)(rng)
    if config.model.init_from:
        state = pretrained.load_into_state(state, config.model)
    if config.model.get("word_vectors") and state.params.get("text_encoder"):
        state = word_vectors.load_into_state(state, config.model, facts.ingredient_names)
    return state


def _log_layout(mesh, abstract, shardings) -> None:
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    log.info(
        "Mesh %s over %d devices (%d processes); %.2fM parameters.",
        dict(mesh.shape),
        mesh.size,
        jax.process_count(),
        n_params / 1e6,
    )
    sharded = sharding.describe_shardings(shardings.params, abstract.params)
    log.info("Sharded parameters (%d):%s", len(sharded), "".join("\n  " + s for s in sharded))


def _evaluate_split(p_eval, variables, config, split: str, mesh, seed: int) -> dict[str, float]:
    """Accuracy of every head over one split (image-only, every example counted once)."""
    batch_size = _per_process(config.train.eval_batch_size, mesh, "config.train.eval_batch_size")
    rng = jax.random.PRNGKey(seed)
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


def _jit_eval(model, mesh):
    return jax.jit(
        functools.partial(eval_step, model=model),
        in_shardings=(None, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


def _jit_train(config, model, tx, schedule, mesh, shardings):
    """The train step as training runs it: sharded state and batch, state buffers donated."""
    return jax.jit(
        functools.partial(
            train_step,
            model=model,
            tx=tx,
            loss_cfg=config.loss,
            schedule=schedule,
            grad_accum_steps=config.optim.grad_accum_steps,
        ),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


class _IteratorPosition:
    """An input-iterator state as grain's checkpoint handler writes it (JSON bytes)."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


def _serialized_state(iterator: Any) -> bytes:
    """The iterator's state now, as bytes (a copy: later batches cannot change it)."""
    state = iterator.get_state()
    return state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()


class DevicePrefetcher:
    """Global device batches, `size` of them transferred ahead of the step that reads them.

    The host copy of batch N+1 (and N+2) overlaps with step N on the device. `position()` is the
    source iterator's state after the batches returned so far, not after the ones in flight: a
    checkpoint written with it resumes with the first batch not yet given to a step.
    """

    def __init__(
        self,
        batches: Iterator[dict[str, np.ndarray]],
        mesh: jax.sharding.Mesh,
        keys: tuple[str, ...],
        size: int = 2,
    ):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}.")
        self._batches, self._mesh, self._keys = batches, mesh, keys
        self._queue: collections.deque = collections.deque()
        for _ in range(size):
            self._enqueue()

    def _enqueue(self) -> None:
        state = _serialized_state(self._batches) if hasattr(self._batches, "get_state") else None
        local = next(self._batches)
        batch = sharding.global_batch({k: local[k] for k in self._keys}, self._mesh)
        self._queue.append((state, batch))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        _, batch = self._queue.popleft()
        self._enqueue()
        return batch

    def position(self) -> _IteratorPosition:
        """The state to restore so that the next batch is the first one not yet returned."""
        state = self._queue[0][0]
        if state is None:
            raise TypeError("the source iterator has no get_state(); its position is unknown.")
        return _IteratorPosition(state)


class _PendingMetrics:
    """Train metrics still on the device, checked for NaN/Inf without stalling the loop.

    Each step's metrics start copying to the host at once (`add`); they are checked once they
    have arrived, or at the latest when more than `max_in_flight` steps are pending (which also
    keeps the host from running ahead of the device), and all of them before a log line or a
    checkpoint (`drain`): a non-finite step stops the run before its state can be saved.
    """

    def __init__(self, max_in_flight: int = 2):
        self._queue: collections.deque = collections.deque()
        self._max = max_in_flight

    def add(self, step: int, metrics: dict[str, jax.Array], last_saved: int | None) -> None:
        for x in jax.tree.leaves(metrics):
            x.copy_to_host_async()
        self._queue.append((step, metrics))
        while self._queue and (
            len(self._queue) > self._max
            or all(x.is_ready() for x in jax.tree.leaves(self._queue[0][1]))
        ):
            self._check_oldest(last_saved)

    def drain(self, last_saved: int | None) -> None:
        while self._queue:
            self._check_oldest(last_saved)

    def _check_oldest(self, last_saved: int | None) -> None:
        step, metrics = self._queue.popleft()
        _check_finite(step, jax.device_get(metrics), last_saved)


def _check_finite(step: int, metrics: dict[str, float], last_saved: int | None) -> None:
    if not all(np.isfinite(metrics[k]) for k in ("loss", "grad_norm", "update_norm")):
        where = f"step {last_saved}" if last_saved is not None else "none saved yet"
        raise NonFiniteLossError(
            f"Non-finite loss, gradient or update at step {step} (loss={metrics['loss']}, "
            f"grad_norm={metrics['grad_norm']}, update_norm={metrics['update_norm']}); stopping. "
            f"Last good checkpoint: {where}."
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from the newest checkpoint in `workdir`), then evaluates on the test split.

    Returns {'validation': {...}, 'test': {...}} accuracies (fractions) of the fused, visual and CDR heads.
    """
    workdir = epath.Path(workdir)
    is_main = jax.process_index() == 0
    facts, mesh, model, tx, schedule, init_fn, rng, abstract, shardings = _setup(config)
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    _log_layout(mesh, abstract, shardings)

    num_steps = config.train.num_steps
    train_iter = pipeline.train_iterator(
        config.data,
        config.data.train_split,
        batch_size=_per_process(config.train.batch_size, mesh, "config.train.batch_size"),
        seed=config.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    start = checkpoint.resume_step(manager, workdir, config.checkpoint.resume_step)
    if start is None:
        state = _initial_state(config, facts, init_fn, rng, shardings)
        start = 0
    else:
        target = checkpoint.abstract_with_shardings(abstract, shardings)
        state = checkpoint.restore(manager, start, target, train_iter)
        log.info("Resumed from step %d in %s.", start, workdir)

    p_train = _jit_train(config, model, tx, schedule, mesh, shardings)
    p_eval = _jit_eval(model, mesh)
    writer = MetricWriter(workdir, enabled=is_main)
    last_saved = start if start else None
    pending = _PendingMetrics()
    batches = DevicePrefetcher(train_iter, mesh, ("image", "label", "ingredients"))
    window_start, window_steps = time.perf_counter(), 0
    bar = tqdm(total=num_steps, initial=start, disable=not is_main, mininterval=2.0, unit="step")

    with _StopFlag() as stop:
        step = start
        while step < num_steps:
            state, metrics = p_train(state, next(batches))
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
                writer.close()
                return {"preempted_at_step": step}

            if config.train.eval_every and step % config.train.eval_every == 0 and step < num_steps:
                val = _evaluate_split(
                    p_eval, state.variables(), config, config.data.eval_split, mesh, config.seed
                )
                writer.write(step, config.data.eval_split, val)
                window_start, window_steps = time.perf_counter(), 0
    bar.close()
    manager.wait_until_finished()

    results = _final_evaluation(p_eval, state, config, mesh, writer, step)
    writer.close()
    manager.close()
    return results


def _final_evaluation(p_eval, state, config, mesh, writer, step) -> dict[str, Any]:
    results = {}
    for split in (config.data.eval_split, config.data.test_split):
        results[split] = _evaluate_split(
            p_eval, state.variables(), config, split, mesh, config.seed
        )
        writer.write(step, split, results[split])
    if jax.process_index() == 0:
        table = summary_table(results)
        print(f"\nAccuracy (%) after {step} steps, image-only prediction:\n{table}", flush=True)
    return results


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Evaluates the newest checkpoint in `workdir` on the validation and test splits."""
    workdir = epath.Path(workdir)
    _, mesh, model, _, _, _, _, abstract, shardings = _setup(config)
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {workdir / 'checkpoints'} to evaluate.")
    target = checkpoint.abstract_with_shardings(abstract, shardings)
    state = checkpoint.restore(manager, step, target, None)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    results = _final_evaluation(_jit_eval(model, mesh), state, config, mesh, writer, step)
    writer.close()
    manager.close()
    if jax.process_index() == 0:
        (workdir / f"eval_step_{step}.json").write_text(json.dumps(results, indent=2))
    return results


def read_config(workdir: str | epath.Path) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to `<workdir>/config.json` (tuples come back as lists)."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir.")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


class Trained(NamedTuple):
    """A restored run, ready for image-only prediction (`model.apply(variables, images,
    rngs={'diffusion': key}, method=MARNet.predict)`)."""

    config: ml_collections.ConfigDict
    model: Any  # MARNet
    variables: dict[str, Any]  # {'params', 'batch_stats'?} placed on `mesh` (replicated or FSDP)
    step: int
    mesh: jax.sharding.Mesh
    facts: datasets.DatasetFacts


def load_trained(
    workdir: str | epath.Path,
    config: ml_collections.ConfigDict | None = None,
    step: int | None = None,
) -> Trained:
    """Restores checkpoint `step` (default: the newest) of a training workdir.

    `config` defaults to the run's own config.json; pass one to read the data from elsewhere or to use
    another mesh (the model section must match the checkpoint).
    """
    workdir = epath.Path(workdir)
    config = read_config(workdir) if config is None else config
    if not (workdir / "checkpoints").exists():
        raise FileNotFoundError(f"No checkpoint in {workdir / 'checkpoints'} to load.")
    facts, mesh, model, _, _, _, _, abstract, shardings = _setup(config)
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    step = manager.latest_step() if step is None else step
    if step is None:
        manager.close()
        raise FileNotFoundError(f"No checkpoint in {workdir / 'checkpoints'} to load.")
    target = checkpoint.abstract_with_shardings(abstract, shardings)
    state = checkpoint.restore(manager, step, target, None)
    manager.close()
    return Trained(config, model, state.variables(), int(step), mesh, facts)
