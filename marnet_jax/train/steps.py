"""Train state, the train step and the eval step: pure functions that the trainer jits over a mesh."""

from __future__ import annotations

from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from marnet_jax.data import photometric
from marnet_jax.models.losses import marnet_loss
from marnet_jax.models.marnet import MARNet

# Heads whose accuracy is reported: the fused classifier, the visual probe and the CDR head.
EVAL_HEADS = {"fused": "logits", "visual": "visual_logits", "cdr": "cdr_logits"}


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data iterator: all of it checkpointed."""

    step: jax.Array  # int32 scalar: train steps (micro-batches) taken
    params: Any
    batch_stats: Any  # BatchNorm running statistics ({} for backbones without BN)
    opt_state: Any
    rng: (
        jax.Array
    )  # base PRNG key; step keys are fold_in(rng, step), so resuming needs no rng update

    def variables(self) -> dict[str, Any]:
        variables = {"params": self.params}
        if self.batch_stats:
            variables["batch_stats"] = self.batch_stats
        return variables


def init_state(
    rng: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    image_shape: tuple[int, int, int],
    num_ingredients: int,
) -> TrainState:
    """Initialises parameters, BN statistics and optimizer state (run under eval_shape, then jit)."""
    init_rng, state_rng = jax.random.split(rng)
    params_rng, dropout_rng, diffusion_rng = jax.random.split(init_rng, 3)
    images = jnp.zeros((2, *image_shape), jnp.float32)
    ingredients = jnp.zeros((2, num_ingredients), jnp.float32)
    variables = model.init(
        {"params": params_rng, "dropout": dropout_rng, "diffusion": diffusion_rng},
        images,
        ingredients,
        train=False,
    )
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=state_rng,
    )


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    loss_cfg: ml_collections.ConfigDict,
    data_cfg: ml_collections.ConfigDict,
    schedule: optax.Schedule,
    grad_accum_steps: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer (micro-)step on a global batch; returns the new state and scalar metrics.
    The batch is the input pipeline's: uint8 crops, flipped, jittered and normalised here
    (photometric.train_images)."""
    chex.assert_rank(batch["image"], 4)
    images = photometric.train_images(batch, data_cfg)
    chex.assert_type(batch["label"], jnp.int32)
    step_rng = jax.random.fold_in(state.rng, state.step)
    dropout_rng, diffusion_rng = jax.random.split(step_rng)

    def loss_fn(params):
        variables = {"params": params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        outputs, new_vars = model.apply(
            variables,
            images,
            batch["ingredients"],
            train=True,
            rngs={"dropout": dropout_rng, "diffusion": diffusion_rng},
            mutable=["batch_stats"],
        )
        total, parts = marnet_loss(outputs, batch["label"], loss_cfg)
        return total, (parts, outputs["logits"], new_vars.get("batch_stats", {}))

    (loss, (parts, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    metrics = {f"loss/{k}": v for k, v in parts.items()}
    metrics.update(
        loss=loss,
        accuracy=jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        grad_norm=optax.global_norm(grads),
        update_norm=optax.global_norm(updates),
        lr=schedule(state.step // grad_accum_steps),
    )
    return new_state, metrics


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k highest logits (k clipped to the class count)."""
    k = min(k, logits.shape[-1])
    _, top = jax.lax.top_k(logits, k)
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def eval_step(
    variables: dict[str, Any],
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: nn.Module,
    data_cfg: ml_collections.ConfigDict,
) -> dict[str, jax.Array]:
    """Image-only prediction on a padded global batch of uint8 crops (normalised here:
    photometric.eval_images); returns masked sums of correct predictions."""
    images = photometric.eval_images(batch["image"], data_cfg)
    outputs = model.apply(
        variables, images, train=False, rngs={"diffusion": rng}, method=MARNet.predict
    )
    mask = batch["mask"]
    sums = {"count": jnp.sum(mask)}
    for head, key in EVAL_HEADS.items():
        if key not in outputs:
            continue
        logits = outputs[key]
        sums[f"{head}_top1"] = jnp.sum(topk_correct(logits, batch["label"], 1) * mask)
        sums[f"{head}_top5"] = jnp.sum(topk_correct(logits, batch["label"], 5) * mask)
    return sums
