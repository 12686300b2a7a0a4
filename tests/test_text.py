"""Ingredient encoders: multihot_to_ids, padding invariance, shapes/dtypes, factory."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marnet_jax.models.text import (
    IngredientTransformer,
    build_text_encoder,
    ids_to_multihot,
    multihot_to_ids,
)

V = 20
TINY_TRANSFORMER = dict(features=16, width=32, depth=1, num_heads=2, mlp_dim=64, max_len=6)


def _multihot(rows: list[list[int]], v: int = V) -> jax.Array:
    m = np.zeros((len(rows), v), np.float32)
    for i, r in enumerate(rows):
        m[i, r] = 1.0
    return jnp.asarray(m)


def test_multihot_to_ids_sorted_and_padded():
    ids, mask = multihot_to_ids(_multihot([[7, 2, 11], [], [0, 19]]), max_len=4)
    np.testing.assert_array_equal(ids, [[2, 7, 11, 0], [0, 0, 0, 0], [0, 19, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    assert ids.dtype == jnp.int32 and mask.dtype == jnp.bool_


def test_multihot_to_ids_truncates_to_smallest_indices():
    ids, mask = jax.jit(multihot_to_ids, static_argnums=1)(_multihot([[1, 3, 5, 7, 9]]), 3)
    np.testing.assert_array_equal(ids, [[1, 3, 5]])
    assert mask.all()


def test_multihot_to_ids_longer_than_vocab():
    ids, mask = multihot_to_ids(_multihot([[0, 1, 2]], v=3), max_len=5)
    np.testing.assert_array_equal(ids, [[0, 1, 2, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0]])


def test_multihot_round_trip():
    rng = np.random.default_rng(0)
    multihot = jnp.asarray((rng.random((16, V)) < 0.2).astype(np.float32))
    ids, mask = multihot_to_ids(multihot, max_len=V)
    np.testing.assert_array_equal(ids_to_multihot(ids, mask, V), multihot)


def test_transformer_ignores_padded_ids_and_order():
    model = IngredientTransformer(**TINY_TRANSFORMER)
    x = _multihot([[1, 4, 9], [2], []])
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    ids, mask = multihot_to_ids(x, TINY_TRANSFORMER["max_len"])
    junk = jnp.where(mask, ids, jnp.arange(ids.size).reshape(ids.shape) % V)
    assert not np.array_equal(junk, ids)
    # A set: reordering the real positions of row 0 (1, 4, 9) must not change its output.
    perm = ids.at[0, :3].set(jnp.asarray([9, 1, 4]))

    @jax.jit
    def run(v, x):
        # One encode_ids call on [ids; junk; perm] (rows are independent).
        stacked = model.apply(
            v,
            jnp.concatenate([ids, junk, perm]),
            jnp.concatenate([mask] * 3),
            train=False,
            method=IngredientTransformer.encode_ids,
        )
        return model.apply(v, x, train=False), *jnp.split(stacked, 3)

    out, via_ids, out_junk, out_perm = run(variables, x)
    chex.assert_shape(out, (3, 16))
    chex.assert_tree_all_finite(out)
    np.testing.assert_allclose(out, via_ids, rtol=1e-5, atol=1e-6)
    # Different ids in the padded positions: same output.
    np.testing.assert_allclose(out_junk, out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_perm, out, rtol=1e-5, atol=1e-5)
    # Different sets give different features.
    assert not np.allclose(out[0], out[1])


@pytest.mark.parametrize("name", ["mlp", "transformer", "gru"])
def test_text_encoders_shapes_dtypes_dropout(name):
    kwargs = {
        "mlp": dict(features=16, hidden_dim=32),
        "transformer": TINY_TRANSFORMER,
        "gru": dict(features=16, width=8, hidden_dim=16, max_len=6),
    }[name]
    x = _multihot([[1, 2], [3, 4, 5], [3, 4, 5]])  # rows 1 and 2 equal
    # The transformer's and the GRU's float32 paths are covered by the other tests.
    dtypes = (jnp.float32, jnp.bfloat16) if name == "mlp" else (jnp.bfloat16,)
    for dtype in dtypes:
        model = build_text_encoder(name, dtype=dtype, dropout=0.5, **kwargs)
        assert model.feature_dim == 16

        @jax.jit
        def run(x, m=model):
            v = m.init(jax.random.key(0), x, train=False)
            drop = m.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
            return v, m.apply(v, x, train=False), drop

        variables, out, drop = run(x)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
        chex.assert_shape([out, drop], (3, 16))
        chex.assert_type([out, drop], jnp.float32)
        chex.assert_tree_all_finite([out, drop])
        np.testing.assert_array_equal(out[1], out[2])
        assert not np.allclose(drop[1], drop[2])  # independent dropout masks per example
        assert not np.allclose(out, drop)


def test_unknown_text_encoder():
    with pytest.raises(ValueError, match="mlp"):
        build_text_encoder("lstm")


class JitAgreementTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_mlp(self):
        model = build_text_encoder("mlp", features=16, hidden_dim=32)
        x = _multihot([[1, 4, 9], [2, 3]])
        variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
        fn = self.variant(lambda v, x: model.apply(v, x, train=False))
        expected = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
        chex.assert_trees_all_close(fn(variables, x), expected, rtol=1e-5, atol=1e-6)
