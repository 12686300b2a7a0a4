"""The named set-up of a run: everything that exists before the first array (dataset facts, mesh,
model, optimizer, schedule, abstract state and its shardings) and the jitted steps built from it.

The trainer, `evaluate`, `load_trained`, predict, the preflight, the studies, the benchmarks and the
tests all start from `Experiment.build(config)`, so they share one mesh, one model and one sharding.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from marnet_jax.data import datasets
from marnet_jax.models import build_model, pretrained, word_vectors
from marnet_jax.models.marnet import MARNet
from marnet_jax.train import checkpoint, sharding
from marnet_jax.train.optim import make_optimizer
from marnet_jax.train.steps import (
    TrainState,
    eval_step,
    grad_diagnostics,
    init_state,
    train_step,
)

log = logging.getLogger("marnet_jax")


def _compile_once(jitted: Any, *args: Any) -> Any:
    """Compiles a function that runs once (initialisation) without LLVM optimisation on the CPU:
    XLA's CPU backend otherwise spends most of the compile optimising random-number code that then
    runs a single time."""
    lowered = jitted.lower(*args)
    if jax.default_backend() == "cpu":
        return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    return lowered.compile()


def jit_eval_step(
    model: MARNet, mesh: jax.sharding.Mesh, data_cfg: ml_collections.ConfigDict
) -> Callable[..., dict[str, jax.Array]]:
    """The eval step: (variables, batch, rng) -> per-head correct counts and the example count,
    replicated."""
    return jax.jit(
        functools.partial(eval_step, model=model, data_cfg=data_cfg),
        in_shardings=(None, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A run's set-up. `abstract` is the TrainState as ShapeDtypeStructs, `shardings` the same tree of
    NamedShardings over `mesh`; `init_fn(rng)` builds the real state."""

    config: ml_collections.ConfigDict
    facts: datasets.DatasetFacts
    mesh: jax.sharding.Mesh
    model: MARNet
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    init_fn: Callable[[jax.Array], TrainState]
    rng: jax.Array
    abstract: TrainState
    shardings: TrainState

    @classmethod
    def build(
        cls,
        config: ml_collections.ConfigDict,
        facts: datasets.DatasetFacts | None = None,
        devices: list[Any] | None = None,
    ) -> Experiment:
        """The set-up for `config`. `facts` given (predict, benchmarks, preflight: only the shapes
        matter) skips preparing the dataset; `devices` (default: jax.devices()) may be a TPU
        topology's abstract devices (preflight)."""
        teacher = config.get("teacher")
        if (
            config.model.get("use_text_head")
            and teacher
            and teacher.steps < 1
            and not teacher.init_from
        ):
            raise ValueError(
                "model.use_text_head needs a teacher: set config.teacher.steps >= 1 or "
                "config.teacher.init_from to a finished run's workdir."
            )
        facts = datasets.prepare(config.data) if facts is None else facts
        mesh = sharding.make_mesh(config.mesh, devices)
        model = build_model(config.model, facts.num_classes, facts.num_ingredients)
        frozen = ("text",) if config.model.get("freeze_text") else ()
        tx, schedule = make_optimizer(config.optim, config.train.num_steps, frozen)
        init_fn = functools.partial(
            init_state,
            model=model,
            tx=tx,
            image_shape=(config.data.image_size, config.data.image_size, 3),
            num_ingredients=facts.num_ingredients,
        )
        rng = jax.random.PRNGKey(config.seed)
        abstract = jax.eval_shape(init_fn, rng)
        shardings = sharding.tree_shardings(abstract, mesh, config.mesh)
        return cls(config, facts, mesh, model, tx, schedule, init_fn, rng, abstract, shardings)

    def restore_target(self) -> TrainState:
        """The abstract state carrying its shardings: orbax restores straight onto them."""
        return checkpoint.abstract_with_shardings(self.abstract, self.shardings)

    def initial_state(self) -> TrainState:
        """A fresh run's state on its shardings, with the pretrained parts the config names
        (backbone weights, ingredient word vectors) placed on the same shardings."""
        jitted = jax.jit(self.init_fn, out_shardings=self.shardings)
        state = _compile_once(jitted, self.rng)(self.rng)
        model_cfg = self.config.model
        if model_cfg.init_from and checkpoint.is_run_dir(model_cfg.init_from):
            state = self._backbone_from_run(state, model_cfg.init_from)
        elif model_cfg.init_from:
            state = pretrained.load_into_state(state, model_cfg)
        if model_cfg.get("word_vectors") and state.params.get("text_encoder"):
            state = word_vectors.load_into_state(state, model_cfg, self.facts.ingredient_names)
        return state

    def _backbone_from_run(self, state: TrainState, workdir: str) -> TrainState:
        """`state` with the backbone (parameters and BatchNorm statistics) of the newest checkpoint
        of another run (warm start, e.g. from a finished baseline); the rest stays fresh."""
        manager = checkpoint.make_manager(workdir, self.config.checkpoint)
        try:
            step = manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"model.init_from={workdir!r}: the run has no checkpoint.")
            saved = checkpoint.restore_as_saved(manager, step, self.mesh, self.config.mesh)
        finally:
            manager.close()
        params, stats = dict(state.params), dict(state.batch_stats or {})
        for tree, name, ours in (
            (saved["params"], "params", params),
            (saved.get("batch_stats") or {}, "batch_stats", stats),
        ):
            if "backbone" not in ours:
                continue
            theirs = tree.get("backbone")
            same = theirs is not None and jax.tree.structure(theirs) == jax.tree.structure(
                ours["backbone"]
            )
            if not same or any(
                a.shape != b.shape
                for a, b in zip(jax.tree.leaves(theirs), jax.tree.leaves(ours["backbone"]))
            ):
                raise ValueError(
                    f"model.init_from={workdir!r}: the backbone {name} of its checkpoint {step} "
                    "do not match this model's (another model.backbone or backbone_kwargs)."
                )
            ours["backbone"] = jax.tree.map(
                lambda x, t: jax.device_put(x, t.sharding), theirs, ours["backbone"]
            )
        log.info("Backbone warm-started from %s (step %d).", workdir, step)
        return state.replace(params=params, batch_stats=stats)

    def jit_train_step(self) -> Callable[[TrainState, dict[str, jax.Array]], Any]:
        """The train step as training runs it: sharded state and batch, state buffers donated."""
        return jax.jit(
            functools.partial(
                train_step,
                model=self.model,
                tx=self.tx,
                loss_cfg=self.config.loss,
                data_cfg=self.config.data,
                schedule=self.schedule,
                grad_accum_steps=self.config.optim.grad_accum_steps,
            ),
            in_shardings=(self.shardings, sharding.batch_sharding(self.mesh)),
            out_shardings=(self.shardings, sharding.replicated(self.mesh)),
            donate_argnums=(0,),
        )

    def jit_eval_step(self) -> Callable[..., dict[str, jax.Array]]:
        return jit_eval_step(self.model, self.mesh, self.config.data)

    def jit_grad_diagnostics(self) -> Callable[[TrainState, dict[str, jax.Array]], Any]:
        """steps.grad_diagnostics on the train step's shardings (the state is not donated)."""
        return jax.jit(
            functools.partial(
                grad_diagnostics,
                model=self.model,
                loss_cfg=self.config.loss,
                data_cfg=self.config.data,
            ),
            in_shardings=(self.shardings, sharding.batch_sharding(self.mesh)),
            out_shardings=sharding.replicated(self.mesh),
        )

    def log_layout(self) -> None:
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract.params))
        log.info(
            "Mesh %s over %d devices (%d processes); %.2fM parameters.",
            dict(self.mesh.shape),
            self.mesh.size,
            jax.process_count(),
            n_params / 1e6,
        )
        sharded = sharding.describe_shardings(self.shardings.params, self.abstract.params)
        if sharded:
            log.info(
                "Sharded parameters (%d):%s", len(sharded), "".join("\n  " + s for s in sharded)
            )
