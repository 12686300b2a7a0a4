"""CDR (Cross-Modal Diffusion Reconstruction): a denoising diffusion model in feature space.

The clean sample is the semantic embedding s0 (from the ingredient text); the denoiser is
conditioned on the visual feature. Training noises s0 at a random step t and regresses the
denoiser's target ('eps', 'x0' or 'v'); the one-step estimate s0_hat (the x0 implied by that
prediction) is what the classifier reads in training. Inference has no text: start from N(0, I) and
run the reverse chain conditioned on the image.

Everything numeric is a pure function of a `DiffusionSchedule` (float32 arrays computed once in
float64 NumPy). The reverse samplers take `denoise_fn(x_t, t) -> model output` and are one
`lax.scan` each, so a sampler is one compiled program whose size does not grow with the number of
steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from marnet_jax.models.alignment import l2_normalize

Array = jax.Array
DenoiseFn = Callable[
    [Array, Array], Array
]  # (x_t float32 [N, D], t int32 [N]) -> model output [N, D]
ClipFn = Callable[[Array], Array]

SCHEDULES = ("linear", "cosine", "diffrec")
SAMPLERS = ("ddpm", "ddim")


# --------------------------------------------------------------------------------------------------
# Schedules


class DiffusionSchedule(NamedTuple):
    """Per-step float32 coefficients of shape [T]; t = 0..T-1 (t = 0 is the least noisy step)."""

    betas: Array
    alphas: Array
    alphas_cumprod: Array
    alphas_cumprod_prev: Array
    sqrt_alphas_cumprod: Array
    sqrt_one_minus_alphas_cumprod: Array
    sqrt_recip_alphas_cumprod: Array
    sqrt_recipm1_alphas_cumprod: Array
    posterior_variance: Array
    posterior_log_variance_clipped: Array
    posterior_mean_coef1: Array
    posterior_mean_coef2: Array

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]


def make_betas(
    name: str,
    num_steps: int,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
    noise_scale: float = 1.0,
    noise_min: float = 1e-3,
    noise_max: float = 0.999,
    max_beta: float = 0.999,
) -> np.ndarray:
    """float64 betas [T] of a named schedule.

    linear: DDPM's linspace(beta_start, beta_end) scaled by 1000 / T (as in improved-diffusion)
      so that the end-point noise level does not depend on T.
    cosine: Nichol & Dhariwal, alpha_bar(t) = cos^2((t / T + s) / (1 + s) * pi / 2), betas
      clipped at max_beta.
    diffrec: DiffRec's 'linear-var': 1 - alpha_bar grows linearly from noise_scale * noise_min to
      noise_scale * noise_max. (DiffRec itself uses a small noise_scale because it starts inference
      from the noised data; starting from N(0, I) needs noise_scale * noise_max close to 1.)
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = num_steps
    if name == "linear":
        scale = 1000.0 / t
        betas = np.linspace(scale * beta_start, scale * beta_end, t, dtype=np.float64)
    elif name == "cosine":
        f = lambda i: np.cos((i / t + cosine_s) / (1.0 + cosine_s) * np.pi / 2.0) ** 2
        i = np.arange(t, dtype=np.float64)
        betas = np.minimum(1.0 - f(i + 1) / f(i), max_beta)
    elif name == "diffrec":
        variance = np.linspace(
            noise_scale * noise_min, noise_scale * noise_max, t, dtype=np.float64
        )
        alpha_bar = 1.0 - variance
        betas = np.empty(t, np.float64)
        betas[0] = variance[0]
        betas[1:] = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)
    else:
        raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")
    if not (np.all(betas > 0) and np.all(betas < 1)):
        raise ValueError(
            f"schedule {name!r} gives betas outside (0, 1): {betas.min()}..{betas.max()}"
        )
    return betas


def schedule_from_betas(betas: np.ndarray) -> DiffusionSchedule:
    """All coefficients from betas, computed in float64 and cast to float32."""
    betas = np.asarray(betas, np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value (as in DDPM).
    post_log_var = np.log(np.append(post_var[1], post_var[1:]) if len(betas) > 1 else betas)
    arrays = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    )
    return DiffusionSchedule(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()})


def make_schedule(name: str, num_steps: int, **kwargs: float) -> DiffusionSchedule:
    """The named schedule (see make_betas for names and kwargs) as float32 arrays."""
    return schedule_from_betas(make_betas(name, num_steps, **kwargs))


def _extract(coef: Array, t: Array, x: Array) -> Array:
    """coef[t] broadcast against x [N, ...]; t int [N]."""
    out = jnp.take(coef, t.astype(jnp.int32), axis=0)
    return out.reshape(out.shape + (1,) * (x.ndim - 1)).astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# Forward process, targets and parameterisation conversions


def q_sample(schedule: DiffusionSchedule, x0: Array, t: Array, noise: Array) -> Array:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
    chex.assert_equal_shape([x0, noise])
    return (
        _extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
        + _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    )


def q_posterior(
    schedule: DiffusionSchedule, x0: Array, x_t: Array, t: Array
) -> tuple[Array, Array, Array]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
    mean = (
        _extract(schedule.posterior_mean_coef1, t, x_t) * x0
        + _extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    )
    var = _extract(schedule.posterior_variance, t, x_t)
    log_var = _extract(schedule.posterior_log_variance_clipped, t, x_t)
    return mean, var, log_var


class _Coefficients(NamedTuple):
    """Schedule values at steps t, broadcast against the data: a = sqrt(alpha_bar_t),
    s = sqrt(1 - alpha_bar_t), ra = 1 / a, rm = s / a (so x_t = a x0 + s eps)."""

    a: Array
    s: Array
    ra: Array
    rm: Array


# Each parameterisation in one row: its regression target from (noise, x0), and the x0 and eps it
# implies from (x_t, model output). v = a eps - s x0 (Salimans & Ho).
_PARAMETERISATIONS: dict[str, dict[str, Callable[[_Coefficients, Array, Array], Array]]] = {
    "eps": {
        "target": lambda c, noise, x0: noise,
        "x0": lambda c, x_t, out: c.ra * x_t - c.rm * out,
        "eps": lambda c, x_t, out: out,
    },
    "x0": {
        "target": lambda c, noise, x0: x0,
        "x0": lambda c, x_t, out: out,
        "eps": lambda c, x_t, out: (c.ra * x_t - out) / c.rm,
    },
    "v": {
        "target": lambda c, noise, x0: c.a * noise - c.s * x0,
        "x0": lambda c, x_t, out: c.a * x_t - c.s * out,
        "eps": lambda c, x_t, out: c.s * x_t + c.a * out,
    },
}
PREDICTIONS = tuple(_PARAMETERISATIONS)


def _apply(
    schedule: DiffusionSchedule, t: Array, prediction: str, what: str, first: Array, second: Array
) -> Array:
    """Row `prediction`, column `what` of the table at steps t."""
    if prediction not in _PARAMETERISATIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
    c = _Coefficients(
        *(
            _extract(arr, t, first)
            for arr in (
                schedule.sqrt_alphas_cumprod,
                schedule.sqrt_one_minus_alphas_cumprod,
                schedule.sqrt_recip_alphas_cumprod,
                schedule.sqrt_recipm1_alphas_cumprod,
            )
        )
    )
    return _PARAMETERISATIONS[prediction][what](c, first, second)


def training_target(
    schedule: DiffusionSchedule, x0: Array, t: Array, noise: Array, prediction: str
) -> Array:
    """Regression target: eps, x0, or v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho)."""
    return _apply(schedule, t, prediction, "target", noise, x0)


def predict_x0(
    schedule: DiffusionSchedule, x_t: Array, t: Array, out: Array, prediction: str
) -> Array:
    """x0 implied by the model output `out` under the given parameterisation."""
    return _apply(schedule, t, prediction, "x0", x_t, out)


def predict_eps(
    schedule: DiffusionSchedule, x_t: Array, t: Array, out: Array, prediction: str
) -> Array:
    """Noise implied by the model output `out` under the given parameterisation."""
    return _apply(schedule, t, prediction, "eps", x_t, out)


def eps_from_x0(schedule: DiffusionSchedule, x_t: Array, t: Array, x0: Array) -> Array:
    """eps = (x_t / sqrt(ab) - x0) / sqrt(1 / ab - 1)."""
    return (_extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _extract(
        schedule.sqrt_recipm1_alphas_cumprod, t, x_t
    )


def mse_loss(out: Array, target: Array, mask: Array | None = None) -> Array:
    """Mean squared error over features and (masked) batch, float32 scalar."""
    chex.assert_equal_shape([out, target])
    err = jnp.mean(jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
    if mask is None:
        return jnp.mean(err)
    mask = mask.astype(jnp.float32)
    return jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_x0_clip(mode: str, value: float) -> ClipFn | None:
    """x0 clipping during sampling: 'none'; 'box' clips each coordinate to [-value, value]; 'sphere'
    rescales to norm `value` (the semantic target lies on that sphere, see CDR.semantic_target)."""
    if mode == "none":
        return None
    if mode == "box":
        return lambda x: jnp.clip(x, -value, value)
    if mode == "sphere":
        return lambda x: value * l2_normalize(x)
    raise ValueError(f"unknown x0 clip mode {mode!r}; expected 'none', 'box' or 'sphere'")


def model_x0_eps(
    schedule: DiffusionSchedule,
    x_t: Array,
    t: Array,
    out: Array,
    prediction: str,
    clip: ClipFn | None = None,
) -> tuple[Array, Array]:
    """(x0, eps) implied by the model output; with clipping, eps follows from the clipped x0."""
    x0 = predict_x0(schedule, x_t, t, out, prediction)
    if clip is None:
        return x0, predict_eps(schedule, x_t, t, out, prediction)
    x0 = clip(x0)
    return x0, eps_from_x0(schedule, x_t, t, x0)


# --------------------------------------------------------------------------------------------------
# One-step estimate (training) and reverse samplers (inference)


class OneStepEstimate(NamedTuple):
    t: Array  # int32 [B]
    noise: Array  # [B, D]
    x_t: Array  # [B, D]
    model_out: Array  # [B, D] denoiser output
    target: Array  # [B, D] what model_out regresses
    x0_hat: Array  # [B, D] the x0 implied by model_out (s0_hat)


def one_step_estimate(
    denoise_fn: DenoiseFn, schedule: DiffusionSchedule, x0: Array, key: Array, *, prediction: str
) -> OneStepEstimate:
    """Noises x0 at t ~ U{0..T-1}, runs the denoiser once and converts its output to x0_hat."""
    chex.assert_rank(x0, 2)
    x0 = x0.astype(jnp.float32)
    k_t, k_n = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, schedule.num_steps, dtype=jnp.int32)
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    x_t = q_sample(schedule, x0, t, noise)
    out = denoise_fn(x_t, t).astype(jnp.float32)
    chex.assert_equal_shape([out, x0])
    target = training_target(schedule, x0, t, noise, prediction)
    return OneStepEstimate(
        t, noise, x_t, out, target, predict_x0(schedule, x_t, t, out, prediction)
    )


def _run_chain(
    make_step: Callable[[DenoiseFn], Callable],
    denoise_fn: DenoiseFn,
    last_denoise_fn: DenoiseFn | None,
    x: Array,
    inputs: tuple[Array, ...],
) -> Array:
    """Runs the per-step inputs through one lax.scan; with `last_denoise_fn`, the scan takes all
    steps but the last and that last step calls `last_denoise_fn` (training: only it carries
    gradients, see CDR.sample)."""
    if last_denoise_fn is None:
        return jax.lax.scan(make_step(denoise_fn), x, inputs)[0]
    x, _ = jax.lax.scan(make_step(denoise_fn), x, jax.tree.map(lambda a: a[:-1], inputs))
    return make_step(last_denoise_fn)(x, jax.tree.map(lambda a: a[-1], inputs))[0]


def ddpm_sample(
    denoise_fn: DenoiseFn,
    schedule: DiffusionSchedule,
    x_T: Array,
    key: Array,
    *,
    prediction: str,
    clip: ClipFn | None = None,
    last_denoise_fn: DenoiseFn | None = None,
) -> Array:
    """Ancestral DDPM over all T steps (fixed small variance beta_tilde) as one lax.scan."""
    x_T = x_T.astype(jnp.float32)
    n = x_T.shape[0]
    num = schedule.num_steps
    ts = jnp.arange(num - 1, -1, -1, dtype=jnp.int32)
    keys = jax.random.split(key, num)

    def make_step(fn: DenoiseFn) -> Callable:
        def step(x: Array, inputs: tuple[Array, Array]) -> tuple[Array, None]:
            t, k = inputs
            tb = jnp.full((n,), t, jnp.int32)
            out = fn(x, tb).astype(jnp.float32)
            x0, _ = model_x0_eps(schedule, x, tb, out, prediction, clip)
            mean, _, log_var = q_posterior(schedule, x0, x, tb)
            z = jax.random.normal(k, x.shape, jnp.float32)
            x = mean + (t > 0).astype(jnp.float32) * jnp.exp(0.5 * log_var) * z
            return x, None

        return step

    return _run_chain(make_step, denoise_fn, last_denoise_fn, x_T, (ts, keys))


def ddim_timesteps(num_train_steps: int, num_steps: int) -> np.ndarray:
    """`num_steps` evenly spaced steps of 0..T-1, descending from T-1 to 0."""
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"DDIM steps must be in [1, {num_train_steps}], got {num_steps}")
    if num_steps == 1:
        return np.array([num_train_steps - 1], np.int32)
    ts = np.round(np.linspace(0, num_train_steps - 1, num_steps)).astype(np.int32)
    return ts[::-1].copy()


def ddim_sample(
    denoise_fn: DenoiseFn,
    schedule: DiffusionSchedule,
    x_T: Array,
    key: Array,
    *,
    num_steps: int,
    prediction: str,
    eta: float = 0.0,
    clip: ClipFn | None = None,
    last_denoise_fn: DenoiseFn | None = None,
) -> Array:
    """DDIM (Song et al.) over `num_steps` evenly spaced steps; eta = 0 is deterministic given x_T,
    eta = 1 with all steps is ancestral DDPM. `num_steps` is static: one compile per (shape,
    num_steps)."""
    x_T = x_T.astype(jnp.float32)
    n = x_T.shape[0]
    ts = ddim_timesteps(schedule.num_steps, num_steps)
    prev = np.append(ts[1:], -1)
    ac = schedule.alphas_cumprod
    a_t = ac[ts]
    a_prev = jnp.where(jnp.asarray(prev) >= 0, ac[np.maximum(prev, 0)], 1.0)
    keys = jax.random.split(key, len(ts))

    def make_step(fn: DenoiseFn) -> Callable:
        def step(x: Array, inputs: tuple[Array, Array, Array, Array]) -> tuple[Array, None]:
            t, at, ap, k = inputs
            tb = jnp.full((n,), t, jnp.int32)
            out = fn(x, tb).astype(jnp.float32)
            x0, eps = model_x0_eps(schedule, x, tb, out, prediction, clip)
            sigma = eta * jnp.sqrt((1.0 - ap) / (1.0 - at) * (1.0 - at / ap))
            direction = jnp.sqrt(jnp.maximum(1.0 - ap - sigma**2, 0.0)) * eps
            z = jax.random.normal(k, x.shape, jnp.float32)
            return jnp.sqrt(ap) * x0 + direction + sigma * z, None

        return step

    inputs = (jnp.asarray(ts), a_t, a_prev, keys)
    return _run_chain(make_step, denoise_fn, last_denoise_fn, x_T, inputs)


def sample(
    denoise_fn: DenoiseFn,
    schedule: DiffusionSchedule,
    x_T: Array,
    key: Array,
    *,
    sampler: str,
    prediction: str,
    num_steps: int | None = None,
    eta: float = 0.0,
    clip: ClipFn | None = None,
    last_denoise_fn: DenoiseFn | None = None,
) -> Array:
    """Dispatches to ddpm_sample (all T steps) or ddim_sample (num_steps, eta)."""
    if sampler == "ddpm":
        return ddpm_sample(
            denoise_fn,
            schedule,
            x_T,
            key,
            prediction=prediction,
            clip=clip,
            last_denoise_fn=last_denoise_fn,
        )
    if sampler == "ddim":
        steps = schedule.num_steps if num_steps is None else num_steps
        return ddim_sample(
            denoise_fn,
            schedule,
            x_T,
            key,
            num_steps=steps,
            prediction=prediction,
            eta=eta,
            clip=clip,
            last_denoise_fn=last_denoise_fn,
        )
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")


# --------------------------------------------------------------------------------------------------
# Denoiser


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
    """Sinusoidal embedding [N, dim] of integer steps t [N] (as in DDPM / the Transformer)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class DenoiserBlock(nn.Module):
    """Pre-LN residual MLP block; the embedding enters by FiLM (scale, shift) or by addition."""

    hidden_dim: int
    mlp_ratio: int = 2
    film: bool = True
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h: Array, emb: Array, train: bool) -> Array:
        y = nn.LayerNorm(dtype=self.dtype, name="norm")(h)
        e = nn.silu(emb)
        if self.film:
            ss = nn.Dense(
                2 * self.hidden_dim,
                dtype=self.dtype,
                kernel_init=nn.initializers.zeros,
                name="film",
            )(e)
            scale, shift = jnp.split(ss, 2, axis=-1)
            y = y * (1.0 + scale) + shift
        else:
            y = y + nn.Dense(self.hidden_dim, dtype=self.dtype, name="emb")(e)
        y = nn.Dense(self.hidden_dim * self.mlp_ratio, dtype=self.dtype, name="fc1")(y)
        y = nn.silu(y)
        y = nn.Dropout(self.dropout)(y, deterministic=not train)
        y = nn.Dense(
            self.hidden_dim, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="fc2"
        )(y)
        return h + y


class Denoiser(nn.Module):
    """MLP denoiser eps/x0/v(x_t, t, cond) in feature space.

    conditioning='film': the condition embedding is added to the timestep embedding and modulates
    every block (FiLM). conditioning='concat': the condition embedding is concatenated with x_t at
    the input and the timestep embedding is added in every block. Output layers start at zero (each
    block is the identity and the first prediction is 0), which keeps early training stable.
    """

    out_dim: int
    hidden_dim: int = 256
    num_blocks: int = 3
    time_embed_dim: int = 128
    mlp_ratio: int = 2
    conditioning: str = "film"
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_t: Array, t: Array, cond: Array, train: bool = False) -> Array:
        chex.assert_rank([x_t, t, cond], [2, 1, 2])
        chex.assert_equal_shape_prefix([x_t, t, cond], 1)
        if self.conditioning not in ("film", "concat"):
            raise ValueError(
                f"unknown conditioning {self.conditioning!r}; expected 'film' or 'concat'"
            )
        dense = lambda f, name: nn.Dense(f, dtype=self.dtype, name=name)
        h_dim = self.hidden_dim
        temb = timestep_embedding(t, self.time_embed_dim).astype(self.dtype)
        temb = dense(h_dim, "time_fc2")(nn.silu(dense(h_dim, "time_fc1")(temb)))
        c = nn.LayerNorm(dtype=self.dtype, name="cond_norm")(cond.astype(self.dtype))
        c = dense(h_dim, "cond_fc2")(nn.silu(dense(h_dim, "cond_fc1")(c)))
        x = x_t.astype(self.dtype)
        if self.conditioning == "film":
            h, emb = dense(h_dim, "in_proj")(x), temb + c
        else:
            h, emb = dense(h_dim, "in_proj")(jnp.concatenate([x, c], axis=-1)), temb
        for i in range(self.num_blocks):
            h = DenoiserBlock(
                h_dim,
                self.mlp_ratio,
                film=self.conditioning == "film",
                dropout=self.dropout,
                dtype=self.dtype,
                name=f"block{i}",
            )(h, emb, train)
        h = nn.LayerNorm(dtype=self.dtype, name="out_norm")(h)
        out = nn.Dense(
            self.out_dim, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="out_proj"
        )(h)
        return out.astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# The CDR module


TARGET_GRADS = ("stop", "straight_through", "none")
CHAIN_GRADS = ("all", "last_step", "none")


class CDR(nn.Module):
    """Cross-modal diffusion reconstruction: the 'cdr' parameter collection (the denoiser).

    `semantic_target` turns g_s(x_s) into the clean sample s0; `estimate` is the training path (one
    noised step, returns the regression pair and s0_hat); `sample` is the image-only path (reverse
    chain from noise, or from the noised x_init when given), averaged over `num_samples` chains.
    """

    dim: int  # E, the shared embedding size (MARNet's embed_dim)
    schedule: str = "cosine"  # 'linear' | 'cosine' | 'diffrec'; cosine: even noise levels
    num_steps: int = 100  # T: 128-d vectors need far fewer steps than pixels
    beta_start: float = 1e-4  # 'linear': DDPM's beta_1 for T=1000 (scaled by 1000 / T)
    beta_end: float = 0.02  # 'linear': DDPM's beta_T for T=1000 (scaled by 1000 / T)
    cosine_s: float = 0.008  # 'cosine': offset s of Nichol & Dhariwal
    noise_scale: float = 1.0  # 'diffrec': scale of the linear-in-variance schedule
    noise_min: float = 1e-3  # 'diffrec': 1 - alpha_bar at t=0 (before scaling)
    noise_max: float = 0.999  # 'diffrec': 1 - alpha_bar at t=T-1; ~1 as sampling starts at N(0,I)
    prediction: str = "v"  # 'eps' | 'x0' | 'v'; v keeps s0_hat bounded at all t (eps: not)
    sampler: str = "ddim"  # 'ddim' (sample_steps, eta) | 'ddpm' (ancestral over all T steps)
    sample_steps: int = 10  # DDIM steps at test
    eta: float = 0.0  # DDIM eta: 0 = deterministic given the start noise, 1 = ancestral
    num_samples: int = 1  # chains averaged per image at test (>1 lowers variance, costs K x)
    clip_mode: str = "none"  # x0 clipping while sampling: 'none' | 'box' | 'sphere'
    clip_value: float = 3.0  # 'box' bound (targets have unit variance per coordinate)
    hidden_dim: int = 256  # denoiser MLP width
    num_blocks: int = 3  # residual blocks of the denoiser
    time_embed_dim: int = 128  # sinusoidal timestep embedding size
    mlp_ratio: int = 2  # expansion inside each residual block
    conditioning: str = "film"  # how the condition enters the denoiser: 'film' | 'concat'
    dropout: float = 0.0  # dropout inside the denoiser blocks
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        for name, value, allowed in (
            ("prediction", self.prediction, PREDICTIONS),
            ("sampler", self.sampler, SAMPLERS),
        ):
            if value not in allowed:
                raise ValueError(f"CDR.{name}={value!r}; expected one of {allowed}")
        self.denoiser = Denoiser(
            self.dim,
            self.hidden_dim,
            self.num_blocks,
            self.time_embed_dim,
            self.mlp_ratio,
            self.conditioning,
            self.dropout,
            self.dtype,
        )

    def diffusion_schedule(self) -> DiffusionSchedule:
        return make_schedule(
            self.schedule,
            self.num_steps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            cosine_s=self.cosine_s,
            noise_scale=self.noise_scale,
            noise_min=self.noise_min,
            noise_max=self.noise_max,
        )

    @property
    def target_radius(self) -> float:
        return math.sqrt(self.dim)

    def semantic_target(self, g_s: Array) -> Array:
        """s0 from g_s(x_s): on the sphere of radius sqrt(dim), i.e. unit variance per coordinate,
        the scale the N(0, I) prior assumes. A fixed norm also means the target cannot shrink
        towards 0 to make the regression easy."""
        return self.target_radius * l2_normalize(g_s.astype(jnp.float32))

    def _clip(self) -> ClipFn | None:
        value = self.target_radius if self.clip_mode == "sphere" else self.clip_value
        return make_x0_clip(self.clip_mode, value)

    def estimate(
        self, s0: Array, cond: Array, *, train: bool, target_grad: str = "straight_through"
    ) -> OneStepEstimate:
        """Training path. target_grad decides what gradients reach s0 (and so the text side):
        'stop': none (the text side is trained by EMA only); 'straight_through': the MSE never
        reaches s0, the CE on s0_hat does, with d s0_hat / d s0 = I (same value, one denoiser pass);
        'none': full gradients, including the MSE's (lets s0 drift towards whatever is easiest to
        denoise: collapse)."""
        if target_grad not in TARGET_GRADS:
            raise ValueError(f"target_grad={target_grad!r}; expected one of {TARGET_GRADS}")
        chex.assert_rank([s0, cond], 2)
        chex.assert_axis_dimension(s0, 1, self.dim)
        fn = lambda x, t: self.denoiser(x, t, cond, train=train)
        x0 = s0 if target_grad == "none" else jax.lax.stop_gradient(s0)
        est = one_step_estimate(
            fn,
            self.diffusion_schedule(),
            x0,
            self.make_rng("diffusion"),
            prediction=self.prediction,
        )
        if target_grad == "straight_through":
            est = est._replace(x0_hat=est.x0_hat + (s0 - jax.lax.stop_gradient(s0)))
        return est

    def __call__(
        self, s0: Array, cond: Array, *, train: bool, target_grad: str = "straight_through"
    ) -> OneStepEstimate:
        return self.estimate(s0, cond, train=train, target_grad=target_grad)

    def sample(self, cond: Array, x_init: Array | None = None, grad: str = "all") -> Array:
        """Image-only path: x_CDR [B, dim] float32 from the configured sampler (one lax.scan).

        x_init=None starts from N(0, I); otherwise from q(x_{T-1} | x_init). The key comes from the
        'diffusion' rng stream, so a fixed key gives a fixed result. `grad` (training) says which
        denoiser passes carry gradients: 'all', 'last_step' (the chain runs as a constant up to its
        last pass: a loss on x_CDR still trains the denoiser and the image side, for one pass's
        backward instead of the whole chain's) or 'none'. The value is the same for all three.
        """
        if grad not in CHAIN_GRADS:
            raise ValueError(f"chain grad={grad!r}; expected one of {CHAIN_GRADS}")
        chex.assert_rank(cond, 2)
        b, k = cond.shape[0], self.num_samples
        if self.is_initializing():  # create the denoiser's parameters before reading them
            self.denoiser(jnp.zeros((b, self.dim)), jnp.zeros((b,), jnp.int32), cond)
        schedule = self.diffusion_schedule()
        key_init, key_chain = jax.random.split(self.make_rng("diffusion"))
        cond_k = jnp.tile(cond, (k, 1))
        x_T = jax.random.normal(key_init, (k * b, self.dim), jnp.float32)
        if x_init is not None:
            chex.assert_shape(x_init, (b, self.dim))
            t_last = jnp.full((k * b,), schedule.num_steps - 1, jnp.int32)
            x_T = q_sample(schedule, jnp.tile(x_init.astype(jnp.float32), (k, 1)), t_last, x_T)
        # The chain is a lax.scan: call the denoiser as a pure function of its bound parameters.
        variables = self.denoiser.variables
        denoiser = self.denoiser.clone(parent=None)
        fn = lambda v, c: lambda x, t: denoiser.apply(v, x, t, c, train=False)
        last_fn = None
        if grad != "all":
            sg = jax.lax.stop_gradient
            if grad == "last_step":
                last_fn = fn(variables, cond_k)
                x_T = sg(x_T)
            variables, cond_k = sg(variables), sg(cond_k)
        x0 = sample(
            fn(variables, cond_k),
            schedule,
            x_T,
            key_chain,
            sampler=self.sampler,
            prediction=self.prediction,
            num_steps=self.sample_steps,
            eta=self.eta,
            clip=self._clip(),
            last_denoise_fn=last_fn,
        )
        x0 = jnp.mean(x0.reshape(k, b, self.dim), axis=0)
        return jax.lax.stop_gradient(x0) if grad == "none" else x0
