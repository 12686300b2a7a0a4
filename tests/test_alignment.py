"""EMA: projection heads, temperature and the contrastive losses (hand-computed values in NumPy)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marnet_jax.models import alignment

# Jitted entry points: one compile per shape instead of one per primitive (much faster on the CPU).
info_nce = jax.jit(alignment.info_nce_loss, static_argnames="class_aware")
cosine = jax.jit(alignment.cosine_loss)


def _np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _np_info_nce(z_v, z_s, scale, labels=None):
    """Reference InfoNCE; with labels, a row averages -log p over its same-label columns."""
    logits = scale * _np_normalize(z_v) @ _np_normalize(z_s).T
    n = len(z_v)
    pos = np.eye(n) if labels is None else (labels[:, None] == labels[None, :]).astype(np.float64)
    out = 0.0
    for lg in (logits, logits.T):
        lp = _np_log_softmax(lg)
        out += 0.5 * np.mean([-(lp[i] * pos[i]).sum() / pos[i].sum() for i in range(n)])
    return out


def test_info_nce_hand_computed_three_items():
    rng = np.random.default_rng(0)
    z_v, z_s = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    got = info_nce(jnp.asarray(z_v), jnp.asarray(z_s), 1 / 0.1)
    np.testing.assert_allclose(got, _np_info_nce(z_v, z_s, 10.0), rtol=1e-5)


def test_info_nce_two_items_closed_form():
    # Orthogonal unit vectors, perfectly paired: each row's logits are [s, 0], loss log(1 + e^-s).
    z = jnp.eye(2)
    s = 3.0
    np.testing.assert_allclose(info_nce(z, z, s), math.log1p(math.exp(-s)), rtol=1e-6)
    # Swapped pairs: the positive has logit 0 and the negative s.
    np.testing.assert_allclose(info_nce(z, z[::-1], s), math.log1p(math.exp(s)), rtol=1e-6)


def test_class_aware_hand_computed():
    rng = np.random.default_rng(1)
    z_v, z_s = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    labels = np.array([0, 0, 1])
    got = info_nce(jnp.asarray(z_v), jnp.asarray(z_s), 5.0, jnp.asarray(labels), class_aware=True)
    np.testing.assert_allclose(got, _np_info_nce(z_v, z_s, 5.0, labels), rtol=1e-5)
    # With all labels distinct, class-aware is the plain loss.
    plain = info_nce(jnp.asarray(z_v), jnp.asarray(z_s), 5.0)
    distinct = info_nce(jnp.asarray(z_v), jnp.asarray(z_s), 5.0, jnp.arange(3), class_aware=True)
    np.testing.assert_allclose(plain, distinct, rtol=1e-6)


def test_aligned_pairs_score_lower_than_shuffled():
    rng = np.random.default_rng(2)
    z_s = jnp.asarray(rng.normal(size=(16, 32)))
    z_v = z_s + 0.3 * jnp.asarray(rng.normal(size=(16, 32)))
    perm = jnp.asarray(rng.permutation(16))
    aligned = info_nce(z_v, z_s, 10.0)
    shuffled = info_nce(z_v, z_s[perm], 10.0)
    assert aligned < 0.5 * shuffled
    assert cosine(z_v, z_s) < cosine(z_v, z_s[perm])


def test_class_aware_treats_same_class_cross_pair_as_positive():
    # Items 0 and 1 share a class. Moving image 0 towards text 1 must raise the plain loss (text 1
    # is a negative) and lower the class-aware loss (text 1 is a positive).
    e = np.eye(4)
    z_s = jnp.asarray(e[:3])
    far = jnp.asarray(np.stack([e[0], e[1], e[2]]))
    near = jnp.asarray(np.stack([_np_normalize(e[0] + e[1]), e[1], e[2]]))
    labels = jnp.array([0, 0, 1])
    plain = lambda z_v: info_nce(z_v, z_s, 5.0)
    aware = lambda z_v: info_nce(z_v, z_s, 5.0, labels, class_aware=True)
    assert plain(near) > plain(far)
    assert aware(near) < aware(far)


def test_mask_drops_rows_and_negatives():
    rng = np.random.default_rng(3)
    z_v, z_s = jnp.asarray(rng.normal(size=(5, 4))), jnp.asarray(rng.normal(size=(5, 4)))
    labels = jnp.array([0, 1, 0, 2, 1])
    mask = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0])
    for class_aware in (False, True):
        got = info_nce(z_v, z_s, 7.0, labels, class_aware=class_aware, mask=mask)
        ref = info_nce(z_v[:3], z_s[:3], 7.0, labels[:3], class_aware=class_aware)
        np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_allclose(cosine(z_v, z_s, mask), cosine(z_v[:3], z_s[:3]), rtol=1e-6)


def test_cosine_loss_hand_computed():
    z_v = jnp.array([[1.0, 0.0], [1.0, 1.0]])
    z_s = jnp.array([[0.0, 2.0], [1.0, 1.0]])
    np.testing.assert_allclose(cosine(z_v, z_s), 0.5, atol=1e-6)  # (1 - 0 + 1 - 1) / 2
    with pytest.raises(ValueError):
        alignment.ema_loss(z_v, z_s, 1.0, None, form="triplet")


def test_logit_scale_learnable_clipped_and_fixed():
    learn = alignment.LogitScale(temperature=0.07)
    params = learn.init(jax.random.key(0))
    np.testing.assert_allclose(learn.apply(params), 1 / 0.07, rtol=1e-5)
    clipped = alignment.LogitScale(temperature=1e-3, max_scale=100.0)
    np.testing.assert_allclose(clipped.apply(clipped.init(jax.random.key(0))), 100.0, rtol=1e-5)
    fixed = alignment.LogitScale(temperature=0.5, learnable=False)
    assert fixed.init(jax.random.key(0)) == {}
    np.testing.assert_allclose(fixed.apply({}), 2.0)
    # The learnable scale gets a gradient from the loss.
    z = jnp.eye(3)
    loss = lambda p: info_nce(z, z[::-1], learn.apply(p))
    assert abs(float(jax.grad(loss)(params)["params"]["log_scale"])) > 1e-3


def test_ema_heads_shapes_and_dtypes():
    heads = alignment.EMAHeads(embed_dim=8, hidden_dim=16, num_layers=2, dtype=jnp.bfloat16)
    x_v, x_s = jnp.ones((4, 12)), jnp.ones((4, 6))
    variables = jax.jit(heads.init)(jax.random.key(0), x_v, x_s)
    assert set(variables["params"]) == {"g_v", "g_s", "temperature"}
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    z_v, z_s, scale = jax.jit(heads.apply)(variables, x_v, x_s)
    assert z_v.shape == z_s.shape == (4, 8) and z_v.dtype == jnp.float32 and scale.shape == ()


def test_zero_vectors_give_finite_gradients():
    # An empty ingredient list can give an exactly zero embedding (zero-initialised biases): the
    # normalisation must not turn that into NaN gradients (jnp.linalg.norm's gradient at 0 is NaN).
    z = jnp.zeros((3, 4)).at[1].set(1.0)
    g = jax.jit(jax.grad(lambda z: info_nce(z, z[::-1] + 0.5, 10.0) + cosine(z, z + 1.0)))(z)
    assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_array_equal(alignment.l2_normalize(jnp.zeros((2, 3))), 0.0)
