"""Train state, the train step and the eval step: pure functions that the trainer jits over a mesh."""

from __future__ import annotations

from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import optax

from marnet_jax.data import decoders, photometric
from marnet_jax.models.losses import marnet_loss, rampup, weighted_terms
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


def _step_rngs(state: TrainState) -> dict[str, jax.Array]:
    """The step's dropout and diffusion keys: fold_in(rng, step), so a resumed run draws the same."""
    dropout_rng, diffusion_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    return {"dropout": dropout_rng, "diffusion": diffusion_rng}


def _train_forward(
    model: nn.Module, params: Any, state: TrainState, images: jax.Array, batch: dict[str, jax.Array]
) -> tuple[dict[str, jax.Array], Any]:
    """MARNet's training call: (outputs, new batch_stats)."""
    variables = {"params": params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    outputs, new_vars = model.apply(
        variables,
        images,
        batch["ingredients"],
        train=True,
        rngs=_step_rngs(state),
        mutable=["batch_stats"],
    )
    return outputs, new_vars.get("batch_stats", {})


def model_input(batch: dict[str, jax.Array], data_cfg: ml_collections.ConfigDict) -> jax.Array:
    """A training batch's model input: its crops as data.decoder finishes them on the devices,
    through the photometric augmentation and the normalisation (photometric.train_images)."""
    crops = decoders.for_config(data_cfg).crops(batch, data_cfg)
    return photometric.train_images(crops, batch, data_cfg)


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
    The batch is the input pipeline's: uint8 crops (finished by the decoder: model_input),
    flipped, jittered and normalised here."""
    chex.assert_rank(batch["image"], 4)
    images = model_input(batch, data_cfg)
    chex.assert_type(batch["label"], jnp.int32)
    aux_scale = rampup(state.step, loss_cfg.aux_rampup_steps)

    def loss_fn(params):
        outputs, batch_stats = _train_forward(model, params, state, images, batch)
        total, parts = marnet_loss(outputs, batch["label"], loss_cfg, aux_scale=aux_scale)
        return total, (parts, outputs["logits"], batch_stats)

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


def backbone_terms(model: MARNet) -> tuple[str, ...]:
    """The loss terms whose gradients reach the backbone: the fused CE and the model's auxiliary
    terms (the probe reads stop-gradient features and the text head reads the text only)."""
    terms = ["ce"]
    if model.use_ema:
        terms.append("ema")
    if model.use_cdr:
        terms += ["mse", "ce_cdr"]
    if model.use_aux:
        terms.append("aux")
    if model.use_distill:
        terms.append("distill")
    return tuple(terms)


def grad_diagnostics(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: MARNet,
    loss_cfg: ml_collections.ConfigDict,
    data_cfg: ml_collections.ConfigDict,
) -> dict[str, jax.Array]:
    """Whether the loss terms pull the backbone the same way: for each term of `backbone_terms`,
    weighted as it enters the total (ramp included), the norm of its gradient on the backbone's
    parameters ('grad/<term>_norm') and its cosine with the fused CE's gradient
    ('grad/<term>_cos_ce'), at this state and on this batch with the train step's own keys. One
    forward pass and one backward pass per term."""
    images = model_input(batch, data_cfg)
    aux_scale = rampup(state.step, loss_cfg.aux_rampup_steps)
    terms = backbone_terms(model)

    def terms_fn(backbone):
        outputs, _ = _train_forward(
            model, {**state.params, "backbone": backbone}, state, images, batch
        )
        _, parts = marnet_loss(outputs, batch["label"], loss_cfg, aux_scale=aux_scale)
        weighted = weighted_terms(parts, loss_cfg, aux_scale)
        return jnp.stack([weighted[t] for t in terms])

    _, vjp = jax.vjp(terms_fn, state.params["backbone"])
    flat = [
        jax.flatten_util.ravel_pytree(vjp(row)[0])[0]
        for row in jnp.eye(len(terms), dtype=jnp.float32)
    ]
    ce = flat[0]
    ce_norm = jnp.linalg.norm(ce)
    out = {"grad/total_norm": jnp.linalg.norm(sum(flat))}
    for term, g in zip(terms, flat, strict=True):
        norm = jnp.linalg.norm(g)
        out[f"grad/{term}_norm"] = norm
        if term != "ce":
            out[f"grad/{term}_cos_ce"] = jnp.dot(g, ce) / jnp.maximum(norm * ce_norm, 1e-30)
    return out


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
