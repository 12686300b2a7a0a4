"""MARNet: variants, fusion options, outputs, gradient routing, image-only prediction, the loss, and
the configured model with the project's backbones."""

import functools
import time
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from marnet_jax.models import build_model
from marnet_jax.models.alignment import EMAHeads
from marnet_jax.models.config import get_loss_config, get_model_config, upgrade_model_config
from marnet_jax.models.diffusion import CDR
from marnet_jax.models.losses import PART_KEYS, marnet_loss
from marnet_jax.models.marnet import MARNet

B, H, V, C, E = 4, 16, 7, 5, 8
VARIANTS = [(False, False), (True, False), (False, True), (True, True)]  # (use_ema, use_cdr)


class TinyBackbone(nn.Module):
    """Conv -> BatchNorm -> ReLU -> mean pool -> Dense: a backbone with batch statistics."""

    features: int = 12
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(4, (3, 3), strides=(2, 2), dtype=self.dtype)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x))
        return nn.Dense(self.features, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))


class TinyText(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.relu(nn.Dense(10)(x))
        return nn.Dropout(0.1)(x, deterministic=not train)


def make_model(use_ema=True, use_cdr=True, fusion="concat", dtype=jnp.float32, cdr_kw=None, **kw):
    cdr = None
    if use_cdr:
        base = dict(num_steps=20, hidden_dim=16, num_blocks=1, time_embed_dim=8, sample_steps=4)
        cdr = CDR(dim=E, dtype=dtype, **{**base, **(cdr_kw or {})})
    return MARNet(
        backbone=TinyBackbone(dtype=dtype),
        text_encoder=TinyText(),
        ema=EMAHeads(embed_dim=E, hidden_dim=16, num_layers=2, dtype=dtype),
        cdr=cdr,
        num_classes=C,
        num_ingredients=V,
        use_ema=use_ema,
        use_cdr=use_cdr,
        fusion=fusion,
        **kw,
    )


def batch(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    images = jax.random.normal(k1, (B, H, H, 3))
    ingredients = (jax.random.uniform(k2, (B, V)) < 0.4).astype(jnp.float32)
    labels = jax.random.randint(k3, (B,), 0, C)
    return images, ingredients, labels


def rngs(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {"params": k[0], "dropout": k[1], "diffusion": k[2]}


def init(model, images, ingredients, seed=0):
    return jax.jit(lambda r: model.init(r, images, ingredients, train=False))(rngs(seed))


def host_init(model, *args, seed=0):
    """Variables of model.init's shapes drawn on the host, with no init compile (parameter
    initialisers are slow to compile on the CPU): He-scaled normal kernels, LayerNorm/BatchNorm
    scales 1, biases and means 0, variances 1."""
    shapes = jax.eval_shape(lambda r: model.init(r, *args, train=False), rngs())
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = path[-1].key
        if name in ("scale", "var") or not s.shape:
            return jnp.ones(s.shape, s.dtype)
        if name in ("bias", "mean"):
            return jnp.zeros(s.shape, s.dtype)
        std = np.sqrt(2.0 / np.prod(s.shape[:-1]))
        return jnp.asarray(std * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def train_apply(model, variables, images, ingredients, seed=1):
    r = rngs(seed)
    return model.apply(
        variables,
        images,
        ingredients,
        train=True,
        rngs={"dropout": r["dropout"], "diffusion": r["diffusion"]},
        mutable=["batch_stats"],
    )


def predict(model, variables, images, key):
    return model.apply(
        variables, images, train=False, rngs={"diffusion": key}, method=MARNet.predict
    )


# The default test model and its compiled entry points, shared by the tests below (each compile
# costs seconds on a shared 2-core CPU).
FULL = make_model(fusion="gated")
IMAGES, INGREDIENTS, LABELS = batch()


def _full_train(variables):
    return train_apply(FULL, variables, IMAGES, INGREDIENTS)


def _full_predict(variables, key):
    return predict(FULL, variables, IMAGES, key)


# jax.jit of the same function shares one compile cache, so chex's with_jit variant below reuses these.
full_train, full_predict = jax.jit(_full_train), jax.jit(_full_predict)


@functools.cache
def _full_vars():
    return init(FULL, IMAGES, INGREDIENTS)


@pytest.fixture
def full_vars():
    return _full_vars()


# --- shapes, names and keys of every variant and fusion (abstract evaluation: nothing compiles)


@pytest.mark.parametrize("fusion", ["concat", "sum", "gated"])
@pytest.mark.parametrize("use_ema,use_cdr", VARIANTS)
def test_variant_shapes_keys_and_collections(use_ema, use_cdr, fusion):
    model = make_model(use_ema, use_cdr, fusion)
    images, ingredients, labels = batch()
    variables = jax.eval_shape(lambda r: model.init(r, images, ingredients, train=False), rngs())
    expected = {"backbone", "fused_head", "visual_head"}
    if use_ema or use_cdr:
        expected |= {"text_encoder", "ema"}
    if use_cdr:
        expected |= {"cdr", "cdr_head"}
    assert set(variables["params"]) == expected
    assert set(variables["batch_stats"]) == {"backbone"}
    if use_cdr and not use_ema:  # only g_s defines the semantic target; no g_v, no temperature
        assert set(variables["params"]["ema"]) == {"g_s"}
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))

    out, state = jax.eval_shape(lambda v: train_apply(model, v, images, ingredients), variables)
    keys = {"logits", "visual_logits", "x_v"}
    if use_ema:
        keys |= {"x_ema", "ema_z_v", "ema_z_s", "ema_logit_scale"}
    if use_cdr:
        keys |= {"cdr_logits", "s0", "s0_hat", "cdr_pred", "cdr_target", "cdr_t", "x_cdr"}
    assert set(out) == keys
    assert set(state) == {"batch_stats"}
    for k in ("logits", "visual_logits", "cdr_logits"):
        if k in out:
            assert out[k].shape == (B, C) and out[k].dtype == jnp.float32
    for k in ("x_ema", "ema_z_v", "ema_z_s", "s0", "s0_hat", "cdr_pred", "cdr_target"):
        if k in out:
            assert out[k].shape == (B, E) and out[k].dtype == jnp.float32, k
    total, parts = jax.eval_shape(lambda o: marnet_loss(o, labels, get_loss_config()), out)
    assert total.shape == () and set(parts) == set(PART_KEYS)
    if not (use_ema and use_cdr):  # the parts of a module that is off are exactly 0
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), out)
        _, parts = marnet_loss(zeros, labels, get_loss_config())
        off = ([] if use_ema else ["ema"]) + ([] if use_cdr else ["mse", "ce_cdr"])
        assert all(float(parts[k]) == 0.0 for k in off)

    pred = jax.eval_shape(lambda v: predict(model, v, images, jax.random.key(0)), variables)
    pkeys = {"logits", "visual_logits", "x_v"} | ({"x_ema"} if use_ema else set())
    pkeys |= {"cdr_logits", "x_cdr"} if use_cdr else set()
    assert set(pred) == pkeys
    assert pred["logits"].shape == (B, C) and pred["logits"].dtype == jnp.float32


def test_one_step_training_estimate_feeds_s0_hat_to_the_fused_head():
    # Neither head reads the chain: training runs no reverse chain at all.
    model = make_model(cdr_train_estimate="one_step", cdr_head_input="one_step")
    images, ingredients, _ = batch()
    variables = jax.eval_shape(lambda r: model.init(r, images, ingredients), rngs())
    out, _ = jax.eval_shape(lambda v: train_apply(model, v, images, ingredients), variables)
    assert "x_cdr" not in out and "s0_hat" in out


def _cdr_head_inputs(model, variables, train: bool):
    """What the CDR head reads, with the outputs of CDR.sample and CDR.estimate in the same call."""
    seen = {"head": [], "sample": [], "estimate": []}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        m = context.module
        if m.name == "cdr_head" and context.method_name == "__call__":
            seen["head"].append(args[0][0])
        elif isinstance(m, CDR) and context.method_name == "sample":
            seen["sample"].append(out)
        elif isinstance(m, CDR) and context.method_name == "estimate":
            seen["estimate"].append(out.x0_hat)
        return out

    with nn.intercept_methods(record):
        if train:
            train_apply(model, variables, IMAGES, INGREDIENTS)
        else:
            predict(model, variables, IMAGES, jax.random.key(3))
    return seen


@pytest.mark.parametrize("head_input", ["chain", "one_step"])
def test_cdr_head_reads_in_training_what_it_reads_at_test(head_input):
    """head_input='chain' (default): in training the CDR head reads the image-only reverse chain's
    output, the same function of the image it reads at test. 'one_step' (the paper's literal form)
    trains it on s0_hat instead."""
    model = make_model(cdr_head_input=head_input)
    variables = init(model, IMAGES, INGREDIENTS)
    test = _cdr_head_inputs(model, variables, train=False)
    assert len(test["head"]) == 1 and len(test["sample"]) == 1
    np.testing.assert_array_equal(test["head"][0], test["sample"][0])
    train = _cdr_head_inputs(model, variables, train=True)
    assert len(train["head"]) == 1
    source = train["sample"] if head_input == "chain" else train["estimate"]
    assert len(source) == 1
    np.testing.assert_array_equal(train["head"][0], source[0])
    if head_input == "chain":  # and not the one-step estimate
        assert not np.allclose(train["head"][0], train["estimate"][0])


def test_aux_variant_predicts_ingredients_in_training_only():
    model = make_model(use_ema=False, use_cdr=False, use_aux=True)
    variables = init(model, IMAGES, INGREDIENTS)
    assert "aux_head" in variables["params"] and "text_encoder" not in variables["params"]
    out, _ = train_apply(model, variables, IMAGES, INGREDIENTS)
    assert out["aux_logits"].shape == (B, V)
    np.testing.assert_array_equal(out["aux_targets"], INGREDIENTS)
    _, parts = marnet_loss(out, LABELS, get_loss_config())
    expected = optax.sigmoid_binary_cross_entropy(out["aux_logits"], INGREDIENTS).mean()
    np.testing.assert_allclose(parts["aux"], expected, rtol=1e-6)

    # The ingredient head's gradient reaches the backbone (that is its whole point).
    def aux_loss(params):
        o, _ = train_apply(model, {**variables, "params": params}, IMAGES, INGREDIENTS)
        return marnet_loss(o, LABELS, get_loss_config())[1]["aux"]

    grads = jax.grad(aux_loss)(variables["params"])
    assert float(optax.global_norm(grads["backbone"])) > 0.0
    pred = predict(model, variables, IMAGES, jax.random.key(0))
    assert not any(k.startswith("aux") for k in pred)
    with pytest.raises(ValueError, match="ingredients"):
        jax.eval_shape(lambda r: model.init(r, IMAGES), rngs())


def test_invalid_combinations_raise():
    images, ingredients, _ = batch()
    bad = [
        make_model(use_ema=False, cdr_condition_on="x_ema"),
        make_model(use_ema=False, cdr_chain_start="visual"),
        make_model(fusion="product"),
        make_model(cdr_kw={"prediction": "score"}),
        make_model(cdr_target_grad="detach"),
        make_model(cdr_train_estimate="two_step"),
        make_model(cdr_head_input="s0"),
        make_model(classifier_input="x_s"),
        make_model(align_moves="text"),
        make_model(align_fraction=0.0),
        make_model(use_ema=False, use_cdr=False, use_distill=True),  # distillation needs a teacher
    ]
    for model in bad:
        with pytest.raises(ValueError):
            jax.eval_shape(lambda r, m=model: m.init(r, images, ingredients), rngs())
    with pytest.raises(ValueError, match="ingredients"):
        jax.eval_shape(lambda r: make_model().init(r, images), rngs())
    # The baseline never reads the text.
    jax.eval_shape(lambda r: make_model(False, False).init(r, images), rngs())


# --- the text teacher, distillation and the joint-stage options


@functools.cache
def _part_grads_fn(model):
    """Jitted: variables -> {loss part: its gradient with respect to every parameter} (one
    Jacobian of the unweighted parts)."""

    def parts(params, variables):
        out, _ = train_apply(model, {**variables, "params": params}, IMAGES, INGREDIENTS)
        _, p = marnet_loss(out, LABELS, get_loss_config())
        return jnp.stack([p[k] for k in PART_KEYS])

    @jax.jit
    def grads(variables):
        jac = jax.jacrev(parts)(variables["params"], variables)
        return {k: jax.tree.map(lambda j, i=i: j[i], jac) for i, k in enumerate(PART_KEYS)}

    return grads


def _grads_of(model, variables, part):
    """Gradient of one unweighted loss part with respect to every parameter."""
    return _part_grads_fn(model)(variables)[part]


def test_text_head_is_a_text_only_classifier_and_a_frozen_text_side_gets_no_gradient():
    norm = lambda tree: float(optax.global_norm(tree))
    model = make_model(use_cdr=False, use_text_head=True)
    variables = host_init(model, IMAGES, INGREDIENTS)
    logits = model.apply(variables, INGREDIENTS, method=MARNet.text_logits)
    assert logits.shape == (B, C)
    out, _ = train_apply(model, variables, IMAGES, INGREDIENTS)
    # trained on, the text side runs with dropout (TinyText's) in training
    assert float(jnp.max(jnp.abs(out["text_logits"] - logits))) > 1e-3
    grads = _grads_of(model, variables, "text")
    assert norm(grads["text_encoder"]) > 0 and norm(grads["text_head"]) > 0
    assert norm(grads["backbone"]) == 0.0  # the teacher reads the text only
    # A trained-on text side moves under EMA; a frozen one gets no gradient from any term, and
    # runs without dropout (its logits are the inference-mode ones).
    assert norm(_grads_of(model, variables, "ema")["text_encoder"]) > 0
    frozen = make_model(use_cdr=False, use_text_head=True, freeze_text=True)
    out, _ = train_apply(frozen, variables, IMAGES, INGREDIENTS)
    np.testing.assert_allclose(out["text_logits"], logits, atol=1e-6)
    for part in ("ema", "text", "ce"):
        g = _grads_of(frozen, variables, part)
        assert norm(g["text_encoder"]) == norm(g["text_head"]) == norm(g["ema"]["g_s"]) == 0.0


def test_alignment_moves_the_image_side_only_and_aligns_a_fraction():
    norm = lambda tree: float(optax.global_norm(tree))
    model = make_model(align_moves="image", align_fraction=0.375)
    variables = host_init(model, IMAGES, INGREDIENTS)
    out, _ = train_apply(model, variables, IMAGES, INGREDIENTS)
    k = round(0.375 * E)
    assert out["ema_z_v"].shape == out["ema_z_s"].shape == (B, k)
    np.testing.assert_allclose(jnp.linalg.norm(out["ema_z_v"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        out["ema_z_v"],
        out["x_ema"][:, :k] / jnp.linalg.norm(out["x_ema"][:, :k], axis=-1, keepdims=True),
        rtol=1e-5,
    )
    for part in ("ema", "mse", "ce_cdr"):
        g = _grads_of(model, variables, part)
        assert norm(g["text_encoder"]) == 0.0 and norm(g["ema"]["g_s"]) == 0.0, part
    g = _grads_of(model, variables, "ema")
    assert norm(g["backbone"]) > 0 and norm(g["ema"]["g_v"]) > 0
    # Only the aligned dimensions of g_v's output receive EMA's gradient.
    kernel = g["ema"]["g_v"]["out"]["kernel"]
    assert float(jnp.abs(kernel[:, :k]).max()) > 0 and float(jnp.abs(kernel[:, k:]).max()) == 0.0


def test_classifier_reading_x_v_leaves_g_v_a_projection_head():
    norm = lambda tree: float(optax.global_norm(tree))
    model = make_model(use_cdr=False, classifier_input="x_v")
    variables = host_init(model, IMAGES, INGREDIENTS)
    out, _ = train_apply(model, variables, IMAGES, INGREDIENTS)
    # the fused classifier and the probe normalise x_v (TinyBackbone: 12 features), not x_EMA (E)
    assert variables["params"]["fused_head"]["norm_0"]["scale"].shape == (12,)
    assert variables["params"]["visual_head"]["norm_0"]["scale"].shape == (12,)
    assert norm(_grads_of(model, variables, "ce")["ema"]["g_v"]) == 0.0
    assert norm(_grads_of(model, variables, "ema")["ema"]["g_v"]) > 0
    assert (
        out["logits"].shape == predict(model, variables, IMAGES, jax.random.key(0))["logits"].shape
    )


def test_distillation_loss_by_hand_and_the_student_alone_learns():
    from marnet_jax.models.losses import distillation_loss

    s = jnp.array([[1.0, 0.0, -1.0]])
    t = jnp.array([[0.0, 2.0, 0.0]])
    pt, ps = jax.nn.softmax(t / 2.0), jax.nn.softmax(s / 2.0)
    expected = 4.0 * float(jnp.sum(pt * (jnp.log(pt) - jnp.log(ps))))
    np.testing.assert_allclose(distillation_loss(s, t, 2.0), expected, rtol=1e-6)
    np.testing.assert_allclose(distillation_loss(t, t, 4.0), 0.0, atol=1e-6)

    norm = lambda tree: float(optax.global_norm(tree))
    model = make_model(False, False, use_text_head=True, use_distill=True, freeze_text=True)
    variables = host_init(model, IMAGES, INGREDIENTS)
    out, _ = train_apply(model, variables, IMAGES, INGREDIENTS)
    np.testing.assert_array_equal(out["teacher_logits"], out["text_logits"])
    _, parts = marnet_loss(out, LABELS, get_loss_config())
    want = distillation_loss(
        out["logits"], out["teacher_logits"], get_loss_config().distill_temperature
    )
    np.testing.assert_allclose(parts["distill"], want, rtol=1e-6)
    g = _grads_of(model, variables, "distill")
    assert norm(g["backbone"]) > 0 and norm(g["fused_head"]) > 0
    assert norm(g["text_encoder"]) == norm(g["text_head"]) == 0.0
    assert "teacher_logits" not in predict(model, variables, IMAGES, jax.random.key(0))


def test_auxiliary_terms_ramp_up():
    from marnet_jax.models.losses import rampup

    cfg = get_loss_config()
    out = {
        "logits": jnp.zeros((2, 3)),
        "visual_logits": jnp.zeros((2, 3)),
        "aux_logits": jnp.zeros((2, 4)),
        "aux_targets": jnp.ones((2, 4)),
    }
    labels = jnp.array([0, 1])
    full, parts = marnet_loss(out, labels, cfg)
    half, _ = marnet_loss(out, labels, cfg, aux_scale=rampup(50, 100))
    base = parts["ce"] + parts["ce_visual"]
    np.testing.assert_allclose(half - base, 0.5 * (full - base), rtol=1e-6)
    assert float(rampup(0, 100)) == 0.0 and float(rampup(500, 100)) == 1.0
    assert float(rampup(0, 0)) == 1.0


def test_gradient_diagnostics_match_a_direct_computation():
    from configs import tiny
    from marnet_jax.models.losses import weighted_terms
    from marnet_jax.train import steps

    model = make_model()
    data_cfg = tiny.get_config().data
    cfg = get_loss_config()
    cfg.aux_rampup_steps = 10
    # away from the initialisation, where the denoiser's zero output layer passes no gradient
    variables = host_init(model, IMAGES, INGREDIENTS)
    state = steps.TrainState(
        step=jnp.asarray(4, jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state={},
        rng=jax.random.key(2),
    )
    pixels = np.random.default_rng(0).integers(0, 256, (B, H, H, 3))
    batch = {"image": jnp.asarray(pixels, jnp.uint8), "label": LABELS, "ingredients": INGREDIENTS}
    kw = dict(model=model, loss_cfg=cfg, data_cfg=data_cfg)
    diag = jax.jit(functools.partial(steps.grad_diagnostics, **kw))(state, batch)
    terms = steps.backbone_terms(model)
    assert terms == ("ce", "ema", "mse", "ce_cdr")
    images = steps.model_input(batch, data_cfg)

    def weighted(backbone):
        outputs, _ = steps._train_forward(
            model, {**state.params, "backbone": backbone}, state, images, batch
        )
        _, parts = marnet_loss(outputs, batch["label"], cfg, aux_scale=0.4)
        w = weighted_terms(parts, cfg, 0.4)
        return jnp.stack([w[t] for t in terms])

    # the Jacobian of the weighted terms, taken directly (one backward pass per term)
    jac = jax.jit(jax.jacrev(weighted))(state.params["backbone"])
    grads = {
        t: jax.flatten_util.ravel_pytree(jax.tree.map(lambda j, i=i: j[i], jac))[0]
        for i, t in enumerate(terms)
    }
    for t in terms:
        assert np.isfinite(float(diag[f"grad/{t}_norm"])) and float(diag[f"grad/{t}_norm"]) > 0
        np.testing.assert_allclose(diag[f"grad/{t}_norm"], jnp.linalg.norm(grads[t]), rtol=1e-4)
    for t in terms[1:]:
        cos = jnp.dot(grads[t], grads["ce"]) / (
            jnp.linalg.norm(grads[t]) * jnp.linalg.norm(grads["ce"])
        )
        np.testing.assert_allclose(diag[f"grad/{t}_cos_ce"], cos, atol=1e-4)
    total = jnp.linalg.norm(sum(grads.values()))
    np.testing.assert_allclose(diag["grad/total_norm"], total, rtol=1e-4)


# --- jit / no-jit agreement


class JitAgreementTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_train_and_predict_agree_with_and_without_jit(self):
        variables = _full_vars()
        key = jax.random.key(3)
        out, state = self.variant(_full_train)(variables)
        pred = self.variant(_full_predict)(variables, key)
        chex.assert_trees_all_close((out, state), full_train(variables), atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(pred, full_predict(variables, key), atol=1e-5, rtol=1e-5)


# --- image-only prediction


def test_predict_needs_no_ingredients_and_is_deterministic(full_vars):
    a, b = full_predict(full_vars, jax.random.key(0)), full_predict(full_vars, jax.random.key(0))
    chex.assert_trees_all_equal(a, b)
    c = full_predict(full_vars, jax.random.key(1))
    assert float(jnp.max(jnp.abs(a["x_cdr"] - c["x_cdr"]))) > 1e-4  # the start noise differs
    np.testing.assert_array_equal(a["visual_logits"], c["visual_logits"])


def test_predict_options_ddpm_multi_sample_visual_start():
    cdr_kw = dict(sampler="ddpm", num_samples=3, clip_mode="sphere")
    model = make_model(cdr_kw=cdr_kw, cdr_chain_start="visual", cdr_condition_on="x_ema")
    images, ingredients, _ = batch()
    variables = host_init(model, images, ingredients)
    out = jax.jit(lambda v: predict(model, v, images, jax.random.key(0)))(variables)
    assert out["x_cdr"].shape == (B, E) and bool(jnp.all(jnp.isfinite(out["logits"])))
    # Averaging three chains of points on the sqrt(E) sphere lands inside that sphere.
    norms = jnp.linalg.norm(out["x_cdr"], axis=-1)
    assert bool(jnp.all(norms <= np.sqrt(E) + 1e-4))


def test_full_loss_decreases_and_gradients_go_where_the_design_says(full_vars):
    """25 Adam steps on one batch. Each step takes the gradient of every loss part separately (one
    vmapped backward pass) and combines them with the loss weights, so the same compiled loop checks
    that the loss falls and which parameters each part trains."""
    cfg = get_loss_config()
    weights = jnp.array(
        [1.0, cfg.w_ema, cfg.w_mse, cfg.w_cdr, cfg.w_visual, cfg.w_aux, cfg.w_distill, cfg.w_text]
    )
    assert PART_KEYS == ("ce", "ema", "mse", "ce_cdr", "ce_visual", "aux", "distill", "text")
    opt = optax.adam(1e-2)

    @jax.jit
    def train(variables, opt_state):
        def step(carry, _):
            params, stats, opt_state = carry

            def parts_fn(p):
                v = {"params": p, "batch_stats": stats}
                out, new = train_apply(FULL, v, IMAGES, INGREDIENTS)
                total, parts = marnet_loss(out, LABELS, cfg)
                vec = jnp.stack([parts[k] for k in PART_KEYS])
                return vec, (vec, total, new["batch_stats"])

            jac, (parts, total, stats) = jax.jacrev(parts_fn, has_aux=True)(params)
            grads = jax.tree.map(lambda j: jnp.tensordot(weights, j, axes=1), jac)
            updates, opt_state = opt.update(grads, opt_state)
            carry = (optax.apply_updates(params, updates), stats, opt_state)
            return carry, (total, parts, jac)

        carry = (variables["params"], variables["batch_stats"], opt_state)
        (_, stats, _), (totals, parts, jacs) = jax.lax.scan(step, carry, length=25)
        return totals, parts, stats, jax.tree.map(lambda j: j[-1], jacs)

    totals, parts, stats, jac = train(full_vars, opt.init(full_vars["params"]))
    parts = {k: parts[:, i] for i, k in enumerate(PART_KEYS)}
    np.testing.assert_allclose(totals, sum(w * parts[k] for w, k in zip(weights, PART_KEYS)), 1e-5)
    assert bool(jnp.all(jnp.isfinite(totals)))
    assert float(totals[-1]) < 0.7 * float(totals[0]), totals
    for k in PART_KEYS:
        if k in ("aux", "distill", "text"):  # full MARNet has no ingredient or text head
            np.testing.assert_array_equal(parts[k], 0.0)
            continue
        assert float(parts[k][-1]) < float(parts[k][0]), (k, parts[k])
    chex.assert_trees_all_equal_shapes(stats, full_vars["batch_stats"])
    changed = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), stats, full_vars["batch_stats"]
    )
    assert max(jax.tree.leaves(changed)) > 0.0  # running statistics were updated

    # Gradient routing, read off the per-part gradients of the last step.
    grads = {k: jax.tree.map(lambda j, i=i: j[i], jac) for i, k in enumerate(PART_KEYS)}
    norm = lambda tree: float(optax.global_norm(tree))
    # The probe only trains itself.
    assert norm(grads["ce_visual"]["backbone"]) == 0.0 and norm(grads["ce_visual"]["ema"]) == 0.0
    assert norm(grads["ce_visual"]["visual_head"]) > 0.0
    # The diffusion MSE trains the denoiser and the image side, never the semantic target.
    assert norm(grads["mse"]["text_encoder"]) == 0.0 and norm(grads["mse"]["ema"]["g_s"]) == 0.0
    assert norm(grads["mse"]["backbone"]) > 0.0 and norm(grads["mse"]["cdr"]) > 0.0
    # The CDR head reads the image-only chain (head_input='chain'): its CE trains the chain and the
    # image side, never the text side (with 'one_step' it reads the straight-through s0_hat instead).
    assert norm(grads["ce_cdr"]["cdr"]) > 0.0 and norm(grads["ce_cdr"]["backbone"]) > 0.0
    assert norm(grads["ce_cdr"]["text_encoder"]) == 0.0
    # L_EMA trains both projection heads and the temperature.
    assert norm(grads["ema"]["ema"]["g_v"]) > 0.0 and norm(grads["ema"]["ema"]["g_s"]) > 0.0
    assert norm(grads["ema"]["ema"]["temperature"]) > 0.0
    # The fused CE reads [x_EMA, x_CDR from the chain]: image-only inputs, as at test. It trains the
    # image side and, through the chain, the denoiser; never the text side.
    assert all(norm(grads["ce"][k]) > 0.0 for k in ("backbone", "cdr", "fused_head"))
    assert norm(grads["ce"]["ema"]["g_v"]) > 0.0
    assert norm(grads["ce"]["text_encoder"]) == 0.0 and norm(grads["ce"]["ema"]["g_s"]) == 0.0


def test_loss_parts_by_hand():
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    labels = jnp.array([0, 0])
    out = {"logits": logits, "visual_logits": jnp.zeros((2, 2))}
    cfg = get_loss_config()
    total, parts = marnet_loss(out, labels, cfg)
    ce = -np.mean([2 - np.log(np.exp(2) + 1), -np.log(1 + np.e)])
    np.testing.assert_allclose(parts["ce"], ce, rtol=1e-6)
    np.testing.assert_allclose(parts["ce_visual"], np.log(2), rtol=1e-6)
    np.testing.assert_allclose(total, ce + np.log(2), rtol=1e-6)
    assert float(parts["ema"]) == float(parts["mse"]) == float(parts["ce_cdr"]) == 0.0
    cfg.label_smoothing = 0.2  # targets (0.9, 0.1)
    _, smooth = marnet_loss(out, labels, cfg)
    lp = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(smooth["ce"], -np.mean(lp @ np.array([0.9, 0.1])), rtol=1e-6)


# --- mixed precision


def test_bfloat16_compute_float32_logits_and_params():
    model = make_model(dtype=jnp.bfloat16)
    images, ingredients, labels = batch()

    shapes = jax.eval_shape(lambda r: model.init(r, images, ingredients), rngs())
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))

    @jax.jit
    def run(variables):  # one compile: train call and loss
        out, _ = train_apply(model, variables, images, ingredients)
        return out, marnet_loss(out, labels, get_loss_config())[0]

    variables = host_init(model, images, ingredients)
    out, total = run(variables)
    pred = jax.eval_shape(lambda v: predict(model, v, images, jax.random.key(0)), variables)
    x_v = jax.eval_shape(lambda: model.backbone.init_with_output(rngs(), images, False))[0]
    assert x_v.dtype == jnp.bfloat16  # the backbone really computes in bfloat16
    for o in (out, pred):
        assert o["logits"].dtype == jnp.float32 and o["cdr_logits"].dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out["logits"])))
    assert total.dtype == jnp.float32 and bool(jnp.isfinite(total))


# --- the configured model with the project's backbones and ingredient encoders


def _configured(overrides=None, **backbone_kwargs):
    cfg = get_model_config()
    cfg.backbone_kwargs.update(backbone_kwargs)
    cfg.text_kwargs.update(dict(features=64, hidden_dim=64))
    for k, v in (overrides or {}).items():
        cfg[k] = v
    return build_model(cfg, num_classes=C, num_ingredients=V)


def test_build_model_default_config_small_stem_64px():
    model = _configured(width=0.125)
    assert model.use_ema and model.use_cdr and model.cdr.sampler == "ddim"
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    ingredients = jnp.zeros((2, V)).at[:, :3].set(1.0)
    variables = host_init(model, images, ingredients)
    assert set(variables["params"]) == {
        "backbone", "text_encoder", "ema", "cdr", "fused_head", "visual_head", "cdr_head"
    }  # fmt: skip
    assert set(variables["batch_stats"]) == {"backbone"}

    @jax.jit
    def run(v):  # the train call; prediction runs the same modules (tested on the tiny model)
        out, state = train_apply(model, v, images, ingredients)
        return out, state, marnet_loss(out, jnp.array([0, 1]), get_loss_config())[0]

    out, state, total = run(variables)
    assert out["x_v"].shape == (2, 64) and out["s0_hat"].shape == (2, 128)
    assert set(state) == {"batch_stats"} and bool(jnp.isfinite(total))
    pred = jax.eval_shape(lambda v: predict(model, v, images, jax.random.key(0)), variables)
    assert pred["logits"].shape == (2, C) and pred["x_cdr"].shape == (2, 128)
    baseline = _configured({"use_ema": False, "use_cdr": False}, width=0.125)
    assert baseline.text_encoder is None and baseline.cdr is None
    v0 = jax.eval_shape(lambda r: baseline.init(r, images, train=False), rngs())
    assert set(v0["params"]) == {"backbone", "fused_head", "visual_head"}


def test_config_sections_are_the_modules_defaults():
    """One source of each default: config.model's ema / cdr sections and MARNet fields are the
    modules' attributes, and build_model passes them back unchanged."""
    cfg = get_model_config()
    model = build_model(cfg, C, V)
    for section, module in (("ema", model.ema), ("cdr", model.cdr)):
        for key, value in cfg[section].items():
            assert getattr(module, key) == value, (section, key)
    assert model.ema.num_layers == EMAHeads.num_layers == 1
    for key, value in cfg.cdr_wiring.items():
        assert getattr(model, f"cdr_{key}") == value, key
    assert model.cdr_chain_start == cfg.cdr_wiring.chain_start == "noise"


def test_a_run_config_of_the_earlier_layout_still_builds():
    """config.json of runs written before the model section was reshaped: the moved fields keep
    their values, the fields added since take their defaults."""
    old = get_model_config().to_dict()
    for key in ("word_vectors", "freeze_word_vectors"):
        del old[key]
    old["ema"]["proj_layers"] = old["ema"].pop("num_layers")
    old["ema"]["proj_hidden_dim"] = 64
    del old["ema"]["hidden_dim"]
    wiring = old.pop("cdr_wiring")  # the first layout: the wiring inside the cdr section
    old["cdr"].update(wiring, init_from=wiring["chain_start"], head_input="one_step")
    del old["cdr"]["chain_start"]
    old["cdr"]["chain_grad"] = False
    old["cdr"]["target_norm"], old["visual_probe_on"] = "sqrt_dim", "auto"
    new = upgrade_model_config(ml_collections.ConfigDict(old))
    expected = get_model_config()
    expected.ema.hidden_dim = 64
    expected.cdr_wiring.head_input, expected.cdr_wiring.chain_grad = "one_step", "none"
    assert new.to_dict() == expected.to_dict()
    assert build_model(new, C, V).cdr_chain_grad == "none"
    # The second layout: the wiring as config.model's cdr_* fields.
    flat = get_model_config().to_dict()
    flat.update(
        {f"cdr_{k}": v for k, v in flat.pop("cdr_wiring").items()}, cdr_chain_grad="last_step"
    )
    moved = upgrade_model_config(ml_collections.ConfigDict(flat))
    assert moved.cdr_wiring.chain_grad == "last_step" and "cdr_chain_grad" not in moved
    old["cdr"]["target_norm"] = "unit"
    with pytest.raises(ValueError, match="target_norm='unit'"):
        upgrade_model_config(ml_collections.ConfigDict(old))


@pytest.mark.slow
def test_resnet50_forward_224px():
    model = _configured({"backbone": "resnet50"}, stem="imagenet")
    images = jax.random.normal(jax.random.key(0), (2, 224, 224, 3))
    ingredients = jnp.zeros((2, V)).at[:, :3].set(1.0)
    t0 = time.perf_counter()
    variables = host_init(model, images, ingredients)
    out, _ = jax.jit(lambda v: train_apply(model, v, images, ingredients))(variables)
    pred = jax.jit(lambda v: predict(model, v, images, jax.random.key(0)))(variables)
    assert out["x_v"].shape == (2, 2048) and pred["logits"].shape == (2, C)
    assert bool(jnp.all(jnp.isfinite(pred["logits"])))
    print(f"resnet50 224px train call + predict: {time.perf_counter() - t0:.1f} s")


@pytest.mark.slow
def test_training_estimate_decides_test_accuracy_of_the_fused_head():
    """Vector 'images' (Gaussian classes) with class-level ingredient recipes. Trained on one-step
    s0_hat, the fused head leans on a branch that is much weaker at test and falls below the visual
    probe; trained on the chain it matches the probe (measured 0.58 vs 0.76 on 2,000 test items)."""
    n_cls, d_img, n_ing, emb = 8, 16, 20, 16
    rng = np.random.default_rng(0)
    means = jnp.asarray(rng.normal(size=(n_cls, d_img)), jnp.float32)
    recipes = jnp.asarray(rng.uniform(size=(n_cls, n_ing)) < 0.3, jnp.float32)

    def data(key, n):
        k1, k2, k3 = jax.random.split(key, 3)
        y = jax.random.randint(k1, (n,), 0, n_cls)
        x = means[y] + 1.6 * jax.random.normal(k2, (n, d_img))
        ing = recipes[y] * (jax.random.uniform(k3, (n, n_ing)) < 0.8)
        return x.reshape(n, 1, 1, d_img), ing, y

    class VectorBackbone(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return nn.Dense(64)(nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1))))

    class Text(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return nn.Dense(32)(nn.relu(nn.Dense(32)(x)))

    def accuracy(train_estimate):
        cdr = CDR(dim=emb, num_steps=50, hidden_dim=64, num_blocks=2, time_embed_dim=32)
        ema = EMAHeads(embed_dim=emb, hidden_dim=64, num_layers=2)
        model = MARNet(VectorBackbone(), Text(), ema, cdr, n_cls, cdr_train_estimate=train_estimate)
        split = lambda k: dict(zip(("params", "dropout", "diffusion"), jax.random.split(k, 3)))
        x, ing, _ = data(jax.random.key(100), 8)
        params = jax.jit(lambda k: model.init(split(k), x, ing))(jax.random.key(0))["params"]
        opt, cfg = optax.adam(3e-3), get_loss_config()

        @jax.jit
        def train(params):
            def step(carry, k):
                params, state = carry
                kd, kr = jax.random.split(k)
                x, ing, y = data(kd, 128)
                loss = lambda p: marnet_loss(
                    model.apply({"params": p}, x, ing, train=True, rngs=split(kr)), y, cfg
                )[0]
                updates, state = opt.update(jax.grad(loss)(params), state)
                return (optax.apply_updates(params, updates), state), None

            keys = jax.random.split(jax.random.key(1), 600)
            return jax.lax.scan(step, (params, opt.init(params)), keys)[0][0]

        params = train(params)
        xt, _, yt = data(jax.random.key(999), 2000)
        pred = jax.jit(
            lambda p: model.apply(
                {"params": p}, xt, rngs={"diffusion": jax.random.key(5)}, method=MARNet.predict
            )
        )(params)
        return {
            k: float(jnp.mean(jnp.argmax(pred[k], -1) == yt)) for k in ("logits", "visual_logits")
        }

    chain, one_step = accuracy("chain"), accuracy("one_step")
    assert chain["logits"] > chain["visual_logits"] - 0.02, chain
    assert one_step["logits"] < chain["logits"] - 0.1, (one_step, chain)
