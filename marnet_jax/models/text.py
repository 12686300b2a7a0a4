"""Ingredient encoders f_s: multi-hot ingredient vectors [B, V] -> float32 features [B, D].

Every encoder is called as `encoder(ingredients_multihot, train=...)` with a float multi-hot [B, V]
(an entry > 0.5 means the ingredient is present), so MARNet can swap them by name:

  IngredientMLP ('mlp'): (Dense -> LayerNorm -> GELU -> dropout) x num_layers -> Dense(features).
  IngredientTransformer ('transformer'): the present ingredients become an index sequence
    (multihot_to_ids), each index an embedding; pre-LN transformer blocks with masked self-attention;
    masked mean over the real positions -> LayerNorm -> Dense(features). No position embedding: an
    ingredient list is a set, so the encoder is permutation invariant; padded positions never reach
    the output. `IngredientTransformer.encode_ids(ids, mask, train)` takes index sequences directly.
  IngredientGRU ('gru'): the index sequence (ingredients in vocabulary order), each index an
    embedding, through a GRU; its last state at each row's length -> LayerNorm -> Dense(features), as
    the lab's ATNet encodes ingredient lists.

Word vectors (word_dim > 0): each ingredient starts from a pretrained vector (word_vectors.py: the
mean of its name's GloVe vectors), held in a [V, word_dim] table `ingredient_words/embedding` that
the trainer fills when a run starts. The MLP then reads the mean of the present ingredients' vectors
(the multi-hot's weighted sum, divided by the count), the sequence encoders each ingredient's vector
(projected to `width` by `embed_proj` in the transformer). freeze_words: the table gets no gradient.

Parameter naming ('params'):
  IngredientMLP: [ingredient_words/embedding], Dense_{i}, LayerNorm_{i} (i < num_layers), out
  IngredientTransformer: embed/embedding [V, width] (or ingredient_words/embedding and embed_proj),
    Transformer/encoderblock_{i}/... (as in vit.py), Transformer/encoder_norm, pool_norm, out
  IngredientGRU: embed/embedding [V, width] (or ingredient_words/embedding), gru/..., pool_norm, out
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from marnet_jax.models import layers
from marnet_jax.models.vit import Encoder

Array = jax.Array
Dtype = Any

TEXT_ENCODERS = ("mlp", "transformer", "gru")


def multihot_to_ids(multihot: Array, max_len: int) -> tuple[Array, Array]:
    """Multi-hot [B, V] -> (ids int32 [B, max_len], mask bool [B, max_len]).

    Present ingredients (value > 0.5) are listed by increasing index, then padding (id 0, mask False).
    A row with more than max_len ingredients keeps its max_len smallest indices (the rest are dropped).
    Pure and jittable; deterministic.
    """
    chex.assert_rank(multihot, 2)
    b, v = multihot.shape
    present = multihot > 0.5
    idx = jnp.arange(v, dtype=jnp.int32)
    # Present entries sort by index; absent ones after all present ones.
    key = jnp.where(present, idx[None, :], v + idx[None, :])
    order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
    if max_len <= v:
        order = order[:, :max_len]
    else:
        order = jnp.pad(order, ((0, 0), (0, max_len - v)))
    mask = jnp.take_along_axis(key, order, axis=-1) < v
    if max_len > v:
        mask = mask & (jnp.arange(max_len) < v)[None, :]
    ids = jnp.where(mask, order, 0).astype(jnp.int32)
    chex.assert_shape([ids, mask], (b, max_len))
    return ids, mask


def ids_to_multihot(ids: Array, mask: Array, vocab_size: int) -> Array:
    """Inverse of multihot_to_ids (for rows that were not truncated): float32 [B, vocab_size]."""
    chex.assert_equal_shape([ids, mask])
    onehot = jax.nn.one_hot(ids, vocab_size, dtype=jnp.float32) * mask[..., None]
    return jnp.clip(jnp.sum(onehot, axis=1), 0.0, 1.0)


class IngredientWords(nn.Module):
    """The [V, word_dim] table of pretrained ingredient vectors (filled by word_vectors.py after
    init); `frozen`: no gradient flows into it."""

    vocab_size: int
    word_dim: int
    frozen: bool = False
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> Array:
        table = self.param(
            "embedding",
            nn.initializers.normal(0.4),
            (self.vocab_size, self.word_dim),
            self.param_dtype,
        )
        return jax.lax.stop_gradient(table) if self.frozen else table


def _word_table(module: nn.Module, vocab_size: int) -> Array:
    """The encoder's [V, word_dim] word-vector table (frozen if module.freeze_words)."""
    return IngredientWords(
        vocab_size,
        module.word_dim,
        module.freeze_words,
        module.param_dtype,
        name="ingredient_words",
    )()


def _sequence_embedding(module: nn.Module, ids: Array, vocab_size: int, width: int) -> Array:
    """[B, L] ids -> [B, L, width or word_dim]: a learned table `embed`, or the word-vector table."""
    if module.word_dim:
        table = _word_table(module, vocab_size)
        return jnp.take(table, ids, axis=0).astype(module.dtype)
    return nn.Embed(
        vocab_size,
        width,
        embedding_init=nn.initializers.normal(stddev=0.02),
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name="embed",
    )(ids)


class IngredientMLP(nn.Module):
    """Multi-hot [B, V] -> [B, features] MLP."""

    features: int = 512
    hidden_dim: int = 512
    num_layers: int = 2
    dropout: float = 0.1
    word_dim: int = 0  # > 0: start from a [V, word_dim] table of word vectors (see the docstring)
    freeze_words: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def feature_dim(self) -> int:
        return self.features

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        chex.assert_rank(x, 2)
        b = x.shape[0]
        if self.word_dim:
            table = _word_table(self, x.shape[-1])
            weights = (x > 0.5).astype(jnp.float32)
            x = weights @ table.astype(jnp.float32)
            x = x / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1.0)
        x = jnp.asarray(x, self.dtype)
        for i in range(self.num_layers):
            x = nn.Dense(
                self.hidden_dim, dtype=self.dtype, param_dtype=self.param_dtype, name=f"Dense_{i}"
            )(x)
            x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=f"LayerNorm_{i}")(
                x
            )
            x = nn.gelu(x, approximate=False)
            x = layers.Dropout(rate=self.dropout)(x, deterministic=not train)
        x = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="out")(x)
        out = x.astype(jnp.float32)
        chex.assert_shape(out, (b, self.features))
        return out


class IngredientTransformer(nn.Module):
    """Multi-hot [B, V] -> ingredient index set -> masked transformer -> masked mean -> [B, features].

    The vocabulary size V is taken from the input at init. Rows with more than max_len ingredients are
    truncated to their max_len smallest indices (multihot_to_ids). A row with no ingredient pools to
    zeros, so its output is pool_norm/out's biases.
    """

    features: int = 512
    width: int = 256
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 1024
    max_len: int = 32
    dropout: float = 0.1
    word_dim: int = 0  # > 0: start from a [V, word_dim] table of word vectors (see the docstring)
    freeze_words: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def feature_dim(self) -> int:
        return self.features

    def __call__(self, x: Array, train: bool) -> Array:
        chex.assert_rank(x, 2)
        ids, mask = multihot_to_ids(x, self.max_len)
        return self.encode_ids(ids, mask, train=train, vocab_size=x.shape[-1])

    @nn.compact
    def encode_ids(
        self, ids: Array, mask: Array, train: bool, vocab_size: int | None = None
    ) -> Array:
        """ids int [B, L], mask bool [B, L] (True = real ingredient) -> [B, features] float32.

        vocab_size is needed only at init when called directly (the table is [vocab_size, width]).
        """
        chex.assert_rank([ids, mask], 2)
        chex.assert_equal_shape([ids, mask])
        chex.assert_type(mask, bool)
        b = ids.shape[0]
        if vocab_size is None:
            if self.is_initializing():
                raise ValueError("encode_ids needs vocab_size at init")
            table = "ingredient_words" if self.word_dim else "embed"
            vocab_size = self.variables["params"][table]["embedding"].shape[0]
        x = _sequence_embedding(self, ids, vocab_size, self.width)
        if self.word_dim:
            x = nn.Dense(
                self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="embed_proj"
            )(x)
        x = layers.Dropout(rate=self.dropout)(x, deterministic=not train)
        x = Encoder(
            depth=self.depth,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout=self.dropout,
            deterministic=not train,
            approximate_gelu=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="Transformer",
        )(x, mask)
        m = mask[..., None].astype(jnp.float32)
        # where (not multiply) so nothing from padded positions, not even a NaN, reaches the sum.
        summed = jnp.sum(jnp.where(mask[..., None], x.astype(jnp.float32), 0.0), axis=1)
        pooled = summed / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        pooled = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="pool_norm")(
            pooled.astype(self.dtype)
        )
        out = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="out")(
            pooled
        )
        out = out.astype(jnp.float32)
        chex.assert_shape(out, (b, self.features))
        return out


class IngredientGRU(nn.Module):
    """Multi-hot [B, V] -> ingredient index sequence -> GRU -> last state -> [B, features].

    Ingredients enter in vocabulary order (multihot_to_ids), at most max_len of them; a row with no
    ingredient keeps the GRU's zero initial state, so its output is pool_norm/out's biases.
    """

    features: int = 512
    width: int = 256  # learned embedding size (word_dim = 0)
    hidden_dim: int = 256
    max_len: int = 32
    dropout: float = 0.1
    word_dim: int = 0  # > 0: start from a [V, word_dim] table of word vectors (see the docstring)
    freeze_words: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def feature_dim(self) -> int:
        return self.features

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        chex.assert_rank(x, 2)
        b = x.shape[0]
        ids, mask = multihot_to_ids(x, self.max_len)
        h = _sequence_embedding(self, ids, x.shape[-1], self.width)
        h = layers.Dropout(rate=self.dropout)(h, deterministic=not train)
        cell = nn.GRUCell(self.hidden_dim, dtype=self.dtype, param_dtype=self.param_dtype)
        last, _ = nn.RNN(cell, return_carry=True, name="gru")(
            h, seq_lengths=jnp.sum(mask, axis=-1).astype(jnp.int32)
        )
        last = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="pool_norm")(last)
        out = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="out")(
            last
        )
        out = out.astype(jnp.float32)
        chex.assert_shape(out, (b, self.features))
        return out


_ENCODERS = {"mlp": IngredientMLP, "transformer": IngredientTransformer, "gru": IngredientGRU}


def build_text_encoder(name: str, dtype: Any = jnp.float32, **kwargs: Any) -> nn.Module:
    """'mlp' -> IngredientMLP, 'transformer' -> IngredientTransformer, 'gru' -> IngredientGRU;
    kwargs override fields."""
    if name not in _ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; known: {', '.join(TEXT_ENCODERS)}")
    return _ENCODERS[name](dtype=dtype, **kwargs)
