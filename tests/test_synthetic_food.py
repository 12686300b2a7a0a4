"""Tests for the synthetic_food generator and its tfds builder (config 'tiny')."""

import itertools
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from marnet_jax.data import synthetic_food as sf

TINY = sf.TINY_CONFIG


def _build(data_dir, config=TINY) -> tfds.core.DatasetBuilder:
    builder = sf.SyntheticFood(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(file_format="array_record")
    return builder


def _records(data_dir, split: str, config_name: str = "tiny") -> list[dict]:
    """All records of a split, sorted by image_path (tfds returns them in hashed-key order)."""
    source = tfds.data_source(f"synthetic_food/{config_name}", split=split, data_dir=str(data_dir))
    return sorted((source[i] for i in range(len(source))), key=lambda r: r["image_path"])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("sf_tiny")
    return data_dir, _build(data_dir)


@pytest.fixture(scope="module")
def tiny_arrays():
    return {split: sf.generate(TINY, split, with_visible=True) for split in sf.SPLITS}


def test_generator_shapes_and_labels(tiny_arrays):
    recipes = sf.make_recipes(TINY)
    s, v = TINY.image_size, TINY.num_ingredients
    for split in sf.SPLITS:
        d = tiny_arrays[split]
        n = TINY.split_size(split)
        assert d["image"].shape == (n, s, s, 3) and d["image"].dtype == np.uint8
        assert d["label"].shape == (n,) and d["label"].dtype == np.int32
        assert d["ingredients"].shape == (n, v) and d["ingredients"].dtype == np.uint8
        assert d["label"].min() >= 0 and d["label"].max() < TINY.num_dishes
        # Per-image ingredients: a subset of the dish's recipe, at least min_present of them.
        assert not np.any(d["ingredients"].astype(bool) & ~recipes[d["label"]])
        assert d["ingredients"].sum(1).min() >= TINY.min_present
        # Every ingredient visible in an image is in its multi-hot, and most labelled ones show.
        shown = np.zeros((n, v), bool)
        for i in range(n):
            ids = np.unique(d["visible"][i])
            shown[i, ids[ids >= 0]] = True
        assert not np.any(shown & ~d["ingredients"].astype(bool))
        assert shown.sum() >= 0.9 * d["ingredients"].sum()
        # Not every recipe ingredient is drawn every time (per-image subsets).
        assert d["ingredients"].sum() < recipes[d["label"]].sum()
    # Images are not blank and differ between examples.
    img = tiny_arrays["train"]["image"].astype(np.float32)
    assert img.std() > 20.0
    assert np.abs(img[0] - img[1]).mean() > 5.0


def test_generator_is_deterministic_and_seeded(tiny_arrays):
    again = sf.generate(TINY, "validation")
    for key in ("image", "label", "ingredients"):
        np.testing.assert_array_equal(again[key], tiny_arrays["validation"][key])
    other = sf.generate(sf.make_config("tiny", seed=1), "validation")
    assert not np.array_equal(other["image"], again["image"])
    # The splits are different streams.
    assert not np.array_equal(tiny_arrays["validation"]["image"], tiny_arrays["test"]["image"])


@pytest.mark.parametrize("config", [sf.TINY_CONFIG, sf.DEFAULT_CONFIG], ids=lambda c: c.name)
def test_recipes_overlap(config):
    recipes = sf.make_recipes(config)
    lo, hi = config.recipe_size
    assert recipes.shape == (config.num_dishes, config.num_ingredients)
    sizes = recipes.sum(1)
    assert sizes.min() >= lo and sizes.max() <= hi
    assert len({r.tobytes() for r in recipes}) == config.num_dishes  # all dishes distinct
    dist = [int((a ^ b).sum()) for a, b in itertools.combinations(recipes, 2)]
    assert min(dist) <= 2  # some dishes differ by one or two ingredients only
    assert sum(d <= 2 for d in dist) >= config.num_dishes // 4
    shared = [int((a & b).sum()) for a, b in itertools.combinations(recipes, 2)]
    assert np.mean(np.asarray(shared) > 0) > 0.2  # ingredients are shared across dishes
    # Some ingredients have a look-alike (same family: same shape, near colour).
    vocab = sf.make_vocabulary(config)
    assert np.bincount(vocab.family).max() >= 2
    assert len(set(vocab.names)) == config.num_ingredients


def test_ingredients_look_different(tiny_arrays):
    """The pixels carry ingredient identity: nearest-centroid on mean region colour beats chance."""

    def region_colours(d):
        feats, ids = [], []
        img = d["image"].astype(np.float32)
        for i in range(len(img)):
            # Normalise away the per-image colour cast with the image's mean colour.
            ref = img[i].reshape(-1, 3).mean(0)
            for v in np.unique(d["visible"][i]):
                mask = d["visible"][i] == v
                if v < 0 or mask.sum() < 4:
                    continue
                feats.append(img[i][mask].mean(0) / (ref + 1.0))
                ids.append(v)
        return np.asarray(feats), np.asarray(ids)

    x_tr, y_tr = region_colours(tiny_arrays["train"])
    x_te, y_te = region_colours(tiny_arrays["validation"])
    classes = np.unique(y_tr)
    centroids = np.stack([x_tr[y_tr == c].mean(0) for c in classes])
    pred = classes[np.argmin(((x_te[:, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    acc = float((pred == y_te).mean())
    chance = 1.0 / len(classes)
    assert acc > 4 * chance, (acc, chance)
    # ... but colour alone is not enough (look-alikes and nuisance keep the image ambiguous).
    assert acc < 0.95


def test_tfds_build_and_read_back(built, tiny_arrays):
    data_dir, builder = built
    info = builder.info
    assert info.features["label"].names == sf.dish_names(TINY)
    assert info.features["image"].shape == (32, 32, 3)
    for split in sf.SPLITS:
        assert info.splits[split].num_examples == TINY.split_size(split)
        records = _records(data_dir, split)
        assert len(records) == TINY.split_size(split)
        paths = [r["image_path"].decode() for r in records]
        assert paths == [f"{split}/{i:06d}.png" for i in range(TINY.split_size(split))]
        image = np.stack([r["image"] for r in records])
        label = np.asarray([r["label"] for r in records])
        ingredients = np.stack([r["ingredients"] for r in records])
        assert image.dtype == np.uint8 and image.shape[1:] == (32, 32, 3)
        assert ingredients.dtype == np.uint8 and ingredients.shape[1] == TINY.num_ingredients
        assert label.min() >= 0 and label.max() < TINY.num_dishes
        # Exactly what the pure generator produces (PNG is lossless).
        np.testing.assert_array_equal(image, tiny_arrays[split]["image"])
        np.testing.assert_array_equal(label, tiny_arrays[split]["label"])
        np.testing.assert_array_equal(ingredients, tiny_arrays[split]["ingredients"])
    # as_data_source gives the same records.
    source = builder.as_data_source(split="test")
    assert len(source) == TINY.num_test
    assert {source[i]["image_path"] for i in range(len(source))} == {
        f"test/{i:06d}.png".encode() for i in range(TINY.num_test)
    }


def test_metadata_survives_reload(built):
    data_dir, builder = built
    expected = sf.metadata(TINY)
    vocab = sf.make_vocabulary(TINY)
    recipes = sf.make_recipes(TINY, vocab)
    # A fresh builder instance reading the prepared data, and a builder made from the files alone.
    fresh = sf.SyntheticFood(config="tiny", data_dir=str(data_dir))
    from_files = tfds.builder_from_directory(builder.data_dir)
    for b in (fresh, from_files):
        meta = b.info.metadata
        assert meta["ingredient_names"] == list(vocab.names)
        assert meta["recipe_indices"] == [np.flatnonzero(r).tolist() for r in recipes]
        assert meta["recipes"] == expected["recipes"]
        assert meta["generator"]["seed"] == TINY.seed
        assert b.info.features["label"].names == sf.dish_names(TINY)


def test_tfds_build_is_deterministic(built, tmp_path):
    data_dir, _ = built
    _build(tmp_path / "same")
    _build(tmp_path / "other", sf.make_config("tiny", seed=1))
    a = _records(data_dir, "validation")
    b = _records(tmp_path / "same", "validation")
    c = _records(tmp_path / "other", "validation", "tiny_seed1")
    for ra, rb in zip(a, b, strict=True):
        assert ra["image_path"] == rb["image_path"]
        np.testing.assert_array_equal(ra["image"], rb["image"])
        np.testing.assert_array_equal(ra["ingredients"], rb["ingredients"])
        assert ra["label"] == rb["label"]
    assert not np.array_equal(np.stack([r["image"] for r in a]), np.stack([r["image"] for r in c]))
    # Nothing is written outside the data_dir.
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["downloads", "synthetic_food"]


def test_two_processes_preparing_one_dataset_at_once_build_it_once(tmp_path):
    """Two runs started together on a fresh machine: the second waits for the first's build (the
    lock in datasets._build) instead of failing to rename its own copy over it; neither warns."""
    script = (
        "import sys; from marnet_jax.data import config, datasets\n"
        "c = config.get_data_config('synthetic_food/tiny'); c.data_dir = sys.argv[1]\n"
        "f = datasets.prepare(c); print('SPLITS', sorted(f.split_sizes.items()))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        # tfds's is_prepared warns about a dataset not built yet; a first run does not show it.
        assert "dataset_info.json" not in err, err[-2000:]
    splits = [
        next(line for line in out.splitlines() if line.startswith("SPLITS")) for out, _ in outs
    ]
    assert splits[0] == splits[1] and "train" in splits[0]
    versions = list((tmp_path / "synthetic_food" / "tiny").iterdir())
    assert not [v for v in versions if v.name.startswith("incomplete")], versions
