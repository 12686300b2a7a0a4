"""CDR diffusion: schedules vs closed forms, forward-process statistics, parameterisations,
samplers, the CDR module's gradient modes, and a toy conditional generation problem learned end to
end."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from marnet_jax.models import diffusion as D

T = 50


def _np(x):
    return np.asarray(x, np.float64)


# --- schedules


def test_linear_schedule_closed_form():
    s = D.make_schedule("linear", T, beta_start=1e-4, beta_end=0.02)
    betas = np.linspace(1e-4, 0.02, T) * 1000 / T
    np.testing.assert_allclose(_np(s.betas), betas, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(_np(s.alphas_cumprod), np.cumprod(1 - betas), atol=1e-6, rtol=1e-5)


def test_cosine_schedule_closed_form():
    s = D.make_schedule("cosine", T, cosine_s=0.008)
    f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
    t = np.arange(T - 1)  # the last beta is clipped at 0.999
    np.testing.assert_allclose(_np(s.alphas_cumprod)[:-1], f(t + 1) / f(0), atol=1e-6)
    assert abs(float(s.betas[-1]) - 0.999) < 1e-6
    assert np.all(np.diff(_np(s.alphas_cumprod)) < 0)


def test_diffrec_schedule_closed_form():
    s = D.make_schedule("diffrec", T, noise_scale=0.5, noise_min=1e-3, noise_max=0.9)
    variance = np.linspace(0.5e-3, 0.45, T)  # 1 - alpha_bar is linear in t
    np.testing.assert_allclose(1 - _np(s.alphas_cumprod), variance, atol=1e-6)


@pytest.mark.parametrize("name", D.SCHEDULES)
def test_derived_coefficients(name):
    s = D.make_schedule(name, T)
    b = D.make_betas(name, T)  # float64 reference
    a = 1 - b
    ab = np.cumprod(a)
    ab_prev = np.append(1.0, ab[:-1])
    close = functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=1e-5)
    close(_np(s.alphas_cumprod_prev), ab_prev)
    close(_np(s.sqrt_alphas_cumprod), np.sqrt(ab))
    close(_np(s.sqrt_one_minus_alphas_cumprod), np.sqrt(1 - ab))
    close(_np(s.sqrt_recip_alphas_cumprod), 1 / np.sqrt(ab))
    close(_np(s.sqrt_recipm1_alphas_cumprod), np.sqrt(1 / ab - 1))
    # Posterior q(x_{t-1} | x_t, x0) by Gaussian conditioning of the joint (x_{t-1}, x_t) given x0:
    # x_{t-1} = sqrt(ab_{t-1}) x0 + sqrt(1 - ab_{t-1}) e1, x_t = sqrt(a_t) x_{t-1} + sqrt(b_t) e2.
    cov = np.sqrt(a) * (1 - ab_prev)  # Cov(x_{t-1}, x_t)
    var_t = 1 - ab  # Var(x_t)
    slope = cov / var_t  # coefficient of x_t in the conditional mean
    # mean = sqrt(ab_prev) x0 + slope (x_t - sqrt(ab) x0)
    close(_np(s.posterior_mean_coef2), slope)
    close(_np(s.posterior_mean_coef1), np.sqrt(ab_prev) - slope * np.sqrt(ab))
    close(_np(s.posterior_variance), (1 - ab_prev) - cov**2 / var_t)
    close(_np(s.posterior_log_variance_clipped)[1:], np.log(_np(s.posterior_variance)[1:]))
    assert all(x.dtype == jnp.float32 and x.shape == (T,) for x in s)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError):
        D.make_schedule("quadratic", T)
    with pytest.raises(ValueError):
        D.make_schedule("diffrec", T, noise_scale=2.0)  # 1 - alpha_bar > 1
    with pytest.raises(ValueError):
        D.ddim_timesteps(T, T + 1)


def test_ddim_timesteps():
    ts = D.ddim_timesteps(100, 10)
    assert ts[0] == 99 and ts[-1] == 0 and len(np.unique(ts)) == 10 and np.all(np.diff(ts) < 0)
    np.testing.assert_array_equal(D.ddim_timesteps(5, 5), [4, 3, 2, 1, 0])
    np.testing.assert_array_equal(D.ddim_timesteps(5, 1), [4])


# --- forward process & targets


def test_q_sample_statistics():
    s = D.make_schedule("cosine", T)
    n, t_val = 20000, 20
    x0 = jnp.tile(jnp.array([[1.5, -2.0, 0.0, 0.5]]), (n, 1))
    t = jnp.full((n,), t_val, jnp.int32)
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    x_t = np.asarray(jax.jit(D.q_sample)(s, x0, t, noise))
    ab = float(s.alphas_cumprod[t_val])
    sd_of_mean = np.sqrt((1 - ab) / n)
    np.testing.assert_allclose(x_t.mean(0), np.sqrt(ab) * np.asarray(x0[0]), atol=5 * sd_of_mean)
    np.testing.assert_allclose(x_t.var(0), 1 - ab, rtol=0.05)


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
def test_parameterisations_invert(prediction):
    s = D.make_schedule("linear", 100)
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x0 = jax.random.normal(k1, (64, 8))
    eps = jax.random.normal(k2, (64, 8))
    t = jax.random.randint(k3, (64,), 0, 100)

    @jax.jit
    def roundtrip(x0, eps, t):
        x_t = D.q_sample(s, x0, t, eps)
        out = D.training_target(s, x0, t, eps, prediction)
        return D.predict_x0(s, x_t, t, out, prediction), D.predict_eps(s, x_t, t, out, prediction)

    x0_hat, eps_hat = roundtrip(x0, eps, t)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
    np.testing.assert_allclose(eps_hat, eps, atol=2e-4)


def test_one_step_estimate_with_oracle_denoiser():
    # A denoiser that knows x0 returns the exact target: then x0_hat == x0 for each prediction.
    s = D.make_schedule("linear", T)
    x0 = jax.random.normal(jax.random.key(2), (32, 6))

    @jax.jit
    def estimates(key):
        out = {}
        for p in D.PREDICTIONS:

            def oracle(x_t, t, p=p):
                return D.training_target(s, x0, t, D.eps_from_x0(s, x_t, t, x0), p)

            est = D.one_step_estimate(oracle, s, x0, key, prediction=p)
            out[p] = (est, D.mse_loss(est.model_out, est.target))
        return out

    for est, mse in estimates(jax.random.key(3)).values():
        assert est.t.dtype == jnp.int32 and int(est.t.min()) >= 0 and int(est.t.max()) < T
        assert len(np.unique(est.t)) > 5
        np.testing.assert_allclose(est.x0_hat, x0, atol=1e-3)
        np.testing.assert_allclose(mse, 0.0, atol=1e-5)


# --- samplers


def _linear_denoiser(dim=4):
    w = jax.random.normal(jax.random.key(7), (dim, dim)) * 0.3
    return lambda x, t: jnp.tanh(x @ w) * (1.0 + t[:, None].astype(jnp.float32) / T)


@pytest.mark.parametrize("sampler", D.SAMPLERS)
def test_samplers_recover_a_point_mass_with_an_oracle(sampler):
    # Data = a single point: the exact eps-denoiser sends every chain to that point.
    s = D.make_schedule("cosine", T)
    target = jnp.array([0.5, -1.0, 2.0])

    def oracle(x_t, t):
        return D.eps_from_x0(s, x_t, t, jnp.broadcast_to(target, x_t.shape))

    x_T = jax.random.normal(jax.random.key(0), (8, 3))
    run = jax.jit(
        lambda k: D.sample(
            oracle, s, x_T, k, sampler=sampler, prediction="eps", num_steps=7, eta=0.5
        )
    )
    np.testing.assert_allclose(run(jax.random.key(1)), jnp.broadcast_to(target, (8, 3)), atol=1e-3)


def test_ddim_eta0_is_deterministic_given_start_noise():
    s = D.make_schedule("cosine", T)
    fn = _linear_denoiser()
    x_T = jax.random.normal(jax.random.key(0), (5, 4))
    run = jax.jit(
        lambda k, eta: D.ddim_sample(fn, s, x_T, k, num_steps=10, prediction="v", eta=eta)
    )
    a, b = run(jax.random.key(1), 0.0), run(jax.random.key(2), 0.0)
    np.testing.assert_array_equal(a, b)
    c, d = run(jax.random.key(1), 1.0), run(jax.random.key(2), 1.0)
    assert float(jnp.max(jnp.abs(c - d))) > 1e-2
    np.testing.assert_array_equal(c, run(jax.random.key(1), 1.0))  # fixed key -> fixed result


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_eta1_all_steps_equals_ddpm(prediction):
    # DDIM with eta=1 over every step is ancestral sampling with variance beta_tilde (Song et al.);
    # with the same per-step keys the two samplers must agree.
    s = D.make_schedule("linear", T)
    fn = _linear_denoiser()
    x_T = jax.random.normal(jax.random.key(0), (6, 4))
    key = jax.random.key(5)
    ddpm = jax.jit(lambda k: D.ddpm_sample(fn, s, x_T, k, prediction=prediction))(key)
    ddim = jax.jit(
        lambda k: D.ddim_sample(fn, s, x_T, k, num_steps=T, prediction=prediction, eta=1.0)
    )(key)
    np.testing.assert_allclose(ddim, ddpm, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("sampler", D.SAMPLERS)
def test_reverse_loop_traced_once(sampler):
    s = D.make_schedule("cosine", T)
    fn = _linear_denoiser()

    @chex.assert_max_traces(n=1)
    def denoise(x, t):  # a Python loop over steps would trace this once per step
        return fn(x, t)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(x_T, key):
        return D.sample(
            denoise, s, x_T, key, sampler=sampler, prediction="v", num_steps=10, eta=1.0
        )

    x_T = jnp.ones((3, 4))
    run(x_T, jax.random.key(0))
    run(x_T + 1.0, jax.random.key(1))  # same shapes: no retrace
    chex.clear_trace_counter()


@pytest.mark.parametrize("mode", ["box", "sphere"])
def test_x0_clip(mode):
    clip = D.make_x0_clip(mode, 2.0)
    x = jnp.array([[3.0, -4.0], [0.1, 0.2]])
    y = clip(x)
    if mode == "box":
        np.testing.assert_allclose(y, [[2.0, -2.0], [0.1, 0.2]])
    else:
        np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), [2.0, 2.0], rtol=1e-6)
    assert D.make_x0_clip("none", 1.0) is None


# --- CDR module


def _cdr(**kw):
    base = dict(dim=8, num_steps=20, hidden_dim=16, num_blocks=1, time_embed_dim=8, sample_steps=5)
    return D.CDR(**{**base, **kw})


def _host_values(shapes, seed=0):
    """Random values for abstract variables, drawn on the host: no initialiser compile, and no
    zero-initialised layer that would block gradients."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


def test_cdr_module_paths():
    cdr = _cdr(num_samples=3, clip_mode="sphere")
    cond = jax.random.normal(jax.random.key(0), (4, 12))
    s0 = cdr.bind({}).semantic_target(jax.random.normal(jax.random.key(1), (4, 8)))
    np.testing.assert_allclose(jnp.linalg.norm(s0, axis=-1), np.sqrt(8.0), rtol=1e-5)
    rngs = {"params": jax.random.key(2), "diffusion": jax.random.key(3)}
    shapes = jax.eval_shape(lambda r: cdr.init(r, s0, cond, train=False), rngs)
    assert set(shapes["params"]) == {"denoiser"}
    # init through the sampling path alone creates the same parameters.
    shapes2 = jax.eval_shape(lambda r: cdr.init(r, cond, method=D.CDR.sample), rngs)
    assert jax.tree.map(jnp.shape, shapes2) == jax.tree.map(jnp.shape, shapes)
    variables = _host_values(shapes)
    sample = jax.jit(lambda v, k: cdr.apply(v, cond, rngs={"diffusion": k}, method=D.CDR.sample))
    a, b = sample(variables, jax.random.key(4)), sample(variables, jax.random.key(4))
    assert a.shape == (4, 8) and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    c = sample(variables, jax.random.key(5))
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3


def test_cdr_target_gradient_modes():
    # 'stop': nothing reaches s0; 'straight_through': only the s0_hat path does, with Jacobian I and
    # the same value; 'none': the regression loss reaches s0 as well.
    cdr = _cdr(prediction="x0")
    cond = jax.random.normal(jax.random.key(0), (4, 12))
    g = jax.random.normal(jax.random.key(1), (4, 8))
    rngs = {"params": jax.random.key(2), "diffusion": jax.random.key(3)}
    variables = _host_values(jax.eval_shape(lambda r: cdr.init(r, g, cond, train=False), rngs))

    def parts(s0, mode):
        est = cdr.apply(
            variables,
            s0,
            cond,
            train=False,
            target_grad=mode,
            rngs={"diffusion": rngs["diffusion"]},
        )
        return D.mse_loss(est.model_out, est.target), jnp.sum(est.x0_hat * g)

    @jax.jit
    def all_grads(g):
        grads = {
            m: [jax.grad(lambda s, i=i, m=m: parts(s, m)[i])(g) for i in (0, 1)]
            for m in D.TARGET_GRADS
        }
        return grads, parts(g, "stop")[1], parts(g, "straight_through")[1]

    grads, v_stop, v_st = all_grads(g)
    np.testing.assert_array_equal(grads["stop"][0], 0.0)
    np.testing.assert_array_equal(grads["stop"][1], 0.0)
    np.testing.assert_array_equal(grads["straight_through"][0], 0.0)
    # d(sum(s0_hat * g)) / d s0 = g: the straight-through Jacobian is the identity.
    np.testing.assert_allclose(grads["straight_through"][1], g, rtol=1e-6)
    assert float(jnp.abs(grads["none"][0]).max()) > 1e-4
    np.testing.assert_allclose(v_stop, v_st, rtol=1e-6)


@pytest.mark.parametrize("sampler", D.SAMPLERS)
def test_chain_gradient_modes(sampler):
    """CDR.sample(grad=...): the same x_CDR in every mode; 'none' passes no gradient; 'last_step'
    passes the last denoiser pass's (all of it when the chain has one pass), 'all' every pass's."""
    cond = jax.random.normal(jax.random.key(0), (4, 12))
    w = jax.random.normal(jax.random.key(1), (4, 8))

    def grads(steps):
        cdr = _cdr(sampler=sampler, sample_steps=steps, num_steps=20 if sampler == "ddim" else 4)
        shapes = jax.eval_shape(
            lambda r: cdr.init(r, cond, method=D.CDR.sample),
            {"params": jax.random.key(2), "diffusion": jax.random.key(3)},
        )
        variables = _host_values(shapes)

        def f(v, c, mode):
            x = cdr.apply(v, c, grad=mode, rngs={"diffusion": jax.random.key(4)}, method="sample")
            return jnp.sum(x * w)

        return {
            m: (f(variables, cond, m), jax.grad(f, argnums=(0, 1))(variables, cond, m))
            for m in D.CHAIN_GRADS
        }

    out = jax.jit(lambda: grads(5))()
    norm = lambda g: float(optax.global_norm(g))
    for m in ("last_step", "none"):
        np.testing.assert_allclose(out[m][0], out["all"][0], rtol=1e-6)
    assert norm(out["none"][1]) == 0.0
    assert norm(out["last_step"][1]) > 0.0 and norm(out["all"][1]) > 0.0
    diff = jax.tree.map(lambda a, b: a - b, out["last_step"][1], out["all"][1])
    assert norm(diff) > 1e-3 * norm(out["all"][1])
    if sampler == "ddim":  # one pass: the last step is the whole chain
        one = jax.jit(lambda: grads(1))()
        chex.assert_trees_all_close(one["last_step"][1], one["all"][1], rtol=1e-6)
    with pytest.raises(ValueError, match="chain grad"):
        _cdr().bind({}).sample(cond, grad="x")


# --- learning: a toy conditional 2-D mixture


def test_denoiser_learns_conditional_gaussian_mixture():
    """Trains Denoiser on p(x | k) = N(m_k, 0.1^2 I) with 4 components on a circle, conditioned on
    the one-hot k, then samples with DDIM and DDPM: samples must land on the component of their
    condition."""
    num_comp, dim, std, STEPS = 4, 2, 0.1, 250
    angles = 2 * np.pi * np.arange(num_comp) / num_comp
    means = jnp.asarray(2.0 * np.stack([np.cos(angles), np.sin(angles)], -1), jnp.float32)
    s = D.make_schedule("cosine", T)
    net = D.Denoiser(out_dim=dim, hidden_dim=64, num_blocks=1, time_embed_dim=32)
    batch = 256
    params = jax.jit(net.init)(
        jax.random.key(0), jnp.zeros((1, dim)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, num_comp))
    )
    opt = optax.adam(optax.cosine_decay_schedule(3e-3, STEPS, alpha=0.1))
    opt_state = opt.init(params)

    def loss_fn(params, key):
        k_c, k_x, k_d = jax.random.split(key, 3)
        comp = jax.random.randint(k_c, (batch,), 0, num_comp)
        x0 = means[comp] + std * jax.random.normal(k_x, (batch, dim))
        cond = jax.nn.one_hot(comp, num_comp)
        fn = lambda x, t: net.apply(params, x, t, cond)
        est = D.one_step_estimate(fn, s, x0, k_d, prediction="v")
        return D.mse_loss(est.model_out, est.target)

    @jax.jit
    def train(params, opt_state, key):
        def step(carry, k):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, k)
            updates, opt_state = opt.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(
            step, (params, opt_state), jax.random.split(key, STEPS)
        )
        return params, opt_state, losses

    params, _, losses = train(params, opt_state, jax.random.key(1))
    assert float(losses[-50:].mean()) < 0.6 * float(losses[:50].mean())

    n_per = 100
    comp = jnp.repeat(jnp.arange(num_comp), n_per)
    cond = jax.nn.one_hot(comp, num_comp)
    fn = lambda x, t: net.apply(params, x, t, cond)
    x_T = jax.random.normal(jax.random.key(2), (num_comp * n_per, dim))
    for sampler in D.SAMPLERS:
        x = jax.jit(
            lambda k, sampler=sampler: D.sample(
                fn, s, x_T, k, sampler=sampler, prediction="v", num_steps=10, eta=0.0
            )
        )(jax.random.key(3))
        x = np.asarray(x)
        nearest = np.argmin(((x[:, None, :] - np.asarray(means)[None]) ** 2).sum(-1), axis=1)
        acc = float(np.mean(nearest == np.asarray(comp)))
        assert acc > 0.95, (sampler, acc)
        for k in range(num_comp):
            xs = x[np.asarray(comp) == k]
            assert np.linalg.norm(xs.mean(0) - np.asarray(means[k])) < 0.2, (sampler, k)
            assert 0.02 < xs.std(0).mean() < 0.4, (sampler, k, xs.std(0))  # spread, not collapse
