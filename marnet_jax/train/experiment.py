"""The named set-up of a run: everything that exists before the first array (dataset facts, mesh,
model, optimizer, schedule, abstract state and its shardings), the jitted steps and the input batches
built from it, and a finished run restored onto it.

A fresh run starts from `Experiment.build(config)`, a trained one from `Experiment.restore(workdir)`;
the trainer, `evaluate`, predict, the preflight, the studies, the benchmarks and the tests all do, so
they share one mesh, one model, one sharding and one eval step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax
from etils import epath

from marnet_jax.config import upgrade
from marnet_jax.data import datasets, decoders, pipeline
from marnet_jax.data.config import train_image_size
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


def _check_train_image_size(config: ml_collections.ConfigDict) -> None:
    """Training crops of another size than the evaluation's need a backbone that takes any input
    size; a ViT's learned position embeddings fix its grid at data.image_size."""
    size = train_image_size(config.data)
    kwargs = config.model.get("backbone_kwargs") or {}
    if (
        size != config.data.image_size
        and config.model.backbone.startswith("vit")
        and kwargs.get("posemb", "learn") == "learn"
    ):
        raise ValueError(
            f"config.data.train_image_size={size} differs from data.image_size="
            f"{config.data.image_size}, but {config.model.backbone}'s learned position "
            "embeddings fix its grid: train at data.image_size, or set "
            "model.backbone_kwargs.posemb='sincos2d'."
        )


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A run's set-up. `abstract` is the TrainState as ShapeDtypeStructs, `shardings` the same tree of
    NamedShardings over `mesh` (both computed when first asked for); `init_fn(rng)` builds the real
    state."""

    config: ml_collections.ConfigDict
    facts: datasets.DatasetFacts
    mesh: jax.sharding.Mesh
    model: MARNet
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    rng: jax.Array

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
        teacher = config.teacher
        if config.model.use_text_head and teacher.steps < 1 and not teacher.init_from:
            raise ValueError(
                "model.use_text_head needs a teacher: set config.teacher.steps >= 1 or "
                "config.teacher.init_from to a finished run's workdir."
            )
        _check_train_image_size(config)
        facts = datasets.prepare(config.data) if facts is None else facts
        mesh = sharding.make_mesh(config.mesh, devices)
        model = build_model(config.model, facts.num_classes, facts.num_ingredients)
        frozen = ("text",) if config.model.freeze_text else ()
        tx, schedule = make_optimizer(config.optim, config.train.num_steps, frozen)
        return cls(config, facts, mesh, model, tx, schedule, jax.random.PRNGKey(config.seed))

    @classmethod
    def restore(
        cls,
        workdir: str | epath.Path,
        config: ml_collections.ConfigDict | None = None,
        step: int | None = None,
        facts: datasets.DatasetFacts | None = None,
    ) -> Trained:
        """A training run's set-up and the model variables of its checkpoint `step` (default: the
        newest), placed on the mesh by its FSDP rules.

        `config` defaults to the run's own config.json; pass one to read the data from elsewhere or
        to use another mesh (the model section must match the checkpoint). `facts` defaults to
        `checkpoint_facts` (no dataset needed; such a set-up serves prediction, since its training
        state (`abstract`) needs the ingredient count that only the dataset gives).
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
                raise FileNotFoundError(
                    f"No checkpoint for step {step} in {ckpt_dir}; have {steps}."
                )
            if facts is None:
                facts = checkpoint_facts(
                    checkpoint.saved_tree(manager, step)["params"], config.data
                )
            exp = cls.build(config, facts)
            state = checkpoint.restore_as_saved(manager, step, exp.mesh, config.mesh)
        finally:
            manager.close()
        variables = {"params": state["params"]}
        if state.get("batch_stats"):
            variables["batch_stats"] = state["batch_stats"]
        return Trained(exp, variables, int(step))

    @property
    def decoder(self) -> decoders.Decoder:
        """Where training crops are decoded (data.decoder): the host transform, the keys of a
        training batch and the decoding done on the devices."""
        return decoders.for_config(self.config.data)

    @property
    def init_fn(self) -> Callable[[jax.Array], TrainState]:
        return functools.partial(
            init_state,
            model=self.model,
            tx=self.tx,
            image_shape=(self.config.data.image_size, self.config.data.image_size, 3),
            num_ingredients=self.facts.num_ingredients,
        )

    @functools.cached_property
    def abstract(self) -> TrainState:
        return jax.eval_shape(self.init_fn, self.rng)

    @functools.cached_property
    def shardings(self) -> TrainState:
        return sharding.tree_shardings(self.abstract, self.mesh, self.config.mesh)

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
        if model_cfg.word_vectors and state.params.get("text_encoder"):
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
        """The eval step: (variables, batch, rng) -> per-head correct counts and the example count,
        replicated."""
        return jax.jit(
            functools.partial(eval_step, model=self.model, data_cfg=self.config.data),
            in_shardings=(None, sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)),
            out_shardings=sharding.replicated(self.mesh),
        )

    def train_batches(self) -> Iterator[dict[str, Any]]:
        """This process's share of the training batches, endless and checkpointable (the
        iterator's position is saved with the state); decoded on the devices with data.decoder
        'dali'."""
        config = self.config
        batches = pipeline.train_iterator(
            config.data,
            config.data.train_split,
            batch_size=sharding.per_process_batch(
                config.train.batch_size, self.mesh, "config.train.batch_size"
            ),
            seed=config.seed,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )
        return self.decoder.on_devices(batches, sharding.batch_sharding(self.mesh), config.data)

    def eval_batches(self, split: str) -> Iterator[dict[str, jax.Array]]:
        """Every example of `split` once, as global batches on the mesh (image, label, ingredients,
        and the mask of the padding in the last batch)."""
        batch_size = sharding.per_process_batch(
            self.config.train.eval_batch_size, self.mesh, "config.train.eval_batch_size"
        )
        for local in pipeline.eval_batches(
            self.config.data,
            split,
            batch_size=batch_size,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        ):
            local = {k: local[k] for k in ("image", "label", "ingredients", "mask")}
            yield sharding.global_batch(local, self.mesh)

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


class Trained(NamedTuple):
    """A restored run, ready for image-only prediction (`model.apply(variables, images,
    rngs={'diffusion': key}, method=MARNet.predict)`)."""

    exp: Experiment
    variables: dict[str, Any]  # {'params', 'batch_stats'?} placed on the mesh (replicated or FSDP)
    step: int

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.exp.config

    @property
    def model(self) -> MARNet:
        return self.exp.model

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.exp.mesh

    @property
    def facts(self) -> datasets.DatasetFacts:
        return self.exp.facts


def read_config(workdir: str | epath.Path) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to `<workdir>/config.json`, in this layout (config.upgrade;
    tuples come back as lists)."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir.")
    return upgrade(json.loads(path.read_text()))


def checkpoint_facts(params: Any, data_cfg: ml_collections.ConfigDict) -> datasets.DatasetFacts:
    """The shapes a prediction needs, read from a checkpoint's parameters (arrays or their
    metadata) instead of the dataset: the class count (fused head) and, for the ingredient head
    only, the ingredient count. Class names are indices."""
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
