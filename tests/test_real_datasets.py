"""vireo_food172 and ingredient101 builders on miniature copies of the real releases (fixtures)."""

from __future__ import annotations

import io
import pathlib
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from marnet_jax import build_dataset as build_cli
from marnet_jax.data import manual_release
from marnet_jax.data.ingredient101 import Ingredient101
from marnet_jax.data.vireo_food172 import VireoFood172
from marnet_jax.testing import fixtures

BUILDERS = {"vireo_food172": VireoFood172, "ingredient101": Ingredient101}
WRITERS = fixtures.WRITERS


def _prepare(name, manual_dir, data_dir, config=None, skip_bad_records=False):
    builder = BUILDERS[name](data_dir=data_dir, config=config, skip_bad_records=skip_bad_records)
    builder.download_and_prepare(  # ArrayRecord by default
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def _records(name, data_dir, split, config=None):
    """All records of a split, read back from disk with tfds.data_source, keyed by image_path."""
    full_name = f"{name}/{config}" if config else name
    source = tfds.data_source(
        full_name,
        split=split,
        data_dir=data_dir,
        download=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    records = [source[i] for i in range(len(source))]
    return {r["image_path"].decode(): r for r in records}


def _assert_matches_fixture(fx, name, data_dir, config):
    vocab_key = config or "default"
    for split in fixtures.SPLITS:
        got = _records(name, data_dir, split, config)
        want = {e.image_path: e for e in fx.splits[split]}
        assert sorted(got) == sorted(want), split
        for path, e in want.items():
            r = got[path]
            assert int(r["label"]) == e.label, path
            np.testing.assert_array_equal(r["ingredients"], e.ingredients[vocab_key], err_msg=path)
            assert r["ingredients"].dtype == np.uint8
            assert r["image"] == e.file.read_bytes(), f"{path}: stored bytes differ from the file"

    # A fresh builder restores names, vocabulary size and metadata from disk.
    reloaded = BUILDERS[name](data_dir=data_dir, config=config)
    info = reloaded.info
    assert info.features["label"].names == fx.class_names
    assert info.features["ingredients"].shape == (len(fx.ingredient_names[vocab_key]),)
    assert info.metadata["ingredient_names"] == fx.ingredient_names[vocab_key]
    assert info.metadata.get("class_names") == fx.class_names
    assert {s: info.splits[s].num_examples for s in fixtures.SPLITS} == {
        s: len(fx.splits[s]) for s in fixtures.SPLITS
    }
    # Default decoding gives an RGB array (the greyscale JPEG too).
    decoded = reloaded.as_data_source(split="train")
    for i in range(len(decoded)):
        image = decoded[i]["image"]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def _assert_nothing_loads(name, data_dir, config=None):
    version_dirs = [p for p in pathlib.Path(data_dir).glob(f"{name}/**/1.0.0") if p.is_dir()]
    assert not version_dirs, version_dirs
    assert not list(pathlib.Path(data_dir).glob("**/*.array_record*"))
    full_name = f"{name}/{config}" if config else name
    with pytest.raises(KeyError, match="not been generated"):
        tfds.data_source(full_name, split="train", data_dir=data_dir, download=False)


@pytest.mark.parametrize("extra_top_level", [None, "VireoFood172"])
def test_vireo_food172_builds_like_the_fixture(tmp_path, extra_top_level):
    fx = fixtures.write_vireo_food172(tmp_path / "manual", extra_top_level=extra_top_level)
    builder = _prepare("vireo_food172", fx.manual_dir, tmp_path / "data")
    assert builder.info.metadata["skipped_records"] == dict.fromkeys(fixtures.SPLITS, 0)
    assert builder.info.metadata["image_formats"] == {"JPEG/L": 1, "JPEG/RGB": 23}
    _assert_matches_fixture(fx, "vireo_food172", tmp_path / "data", None)
    # Names come from FoodList.txt without the stray ';'.
    assert fx.class_names[1] == "Mapo tofu"
    assert "; Mapo tofu" in (fx.root / "SplitAndIngreLabel" / "FoodList.txt").read_text()


@pytest.mark.parametrize(
    "config,annotations,extra_top_level",
    [
        ("full", "Annotations", None),
        ("simplified", "annotations", None),
        ("full", "annotations", "x"),
    ],
)
def test_ingredient101_builds_like_the_fixture(tmp_path, config, annotations, extra_top_level):
    fx = fixtures.write_ingredient101(
        tmp_path / "manual", annotations_dirname=annotations, extra_top_level=extra_top_level
    )
    builder = _prepare("ingredient101", fx.manual_dir, tmp_path / "data", config=config)
    assert builder.info.metadata["annotations_folder"] == annotations
    _assert_matches_fixture(fx, "ingredient101", tmp_path / "data", config)
    # Per-class vectors, vocabulary sorted, whitespace around the commas stripped.
    names = fx.ingredient_names[config]
    assert names == sorted(names) and all(n == n.strip() for n in names)
    assert ("romaine lettuce" in names) == (config == "full")


def test_vireo_layout_errors_name_the_expected_paths(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(manual_release.ReleaseLayoutError, match=re.escape(str(missing))):
        _prepare("vireo_food172", missing, tmp_path / "data")

    fx = fixtures.write_vireo_food172(tmp_path / "manual")
    labels = fx.root / "SplitAndIngreLabel"
    (labels / "IngreLabel.txt").unlink()
    with pytest.raises(
        manual_release.ReleaseLayoutError, match=re.escape(str(labels / "IngreLabel.txt"))
    ):
        _prepare("vireo_food172", fx.manual_dir, tmp_path / "data")

    labels.rename(tmp_path / "elsewhere")
    with pytest.raises(manual_release.ReleaseLayoutError, match=re.escape(str(labels))):
        _prepare("vireo_food172", fx.manual_dir, tmp_path / "data")
    _assert_nothing_loads("vireo_food172", tmp_path / "data")


def test_ingredient101_layout_errors_name_the_expected_paths(tmp_path):
    fx = fixtures.write_ingredient101(tmp_path / "manual", annotations_dirname="annotations")
    annotations = fx.root / "Ingredients101" / "annotations"
    (annotations / "ingredients_simplified.txt").unlink()
    _prepare("ingredient101", fx.manual_dir, tmp_path / "full", config="full")  # does not need it
    with pytest.raises(
        manual_release.ReleaseLayoutError,
        match=re.escape(str(annotations / "ingredients_simplified.txt")),
    ):
        _prepare("ingredient101", fx.manual_dir, tmp_path / "data", config="simplified")

    (fx.root / "food-101").rename(tmp_path / "moved")
    with pytest.raises(
        manual_release.ReleaseLayoutError, match=re.escape(str(fx.root / "food-101/images"))
    ):
        _prepare("ingredient101", fx.manual_dir, tmp_path / "data", config="full")
    _assert_nothing_loads("ingredient101", tmp_path / "data", "simplified")


@pytest.mark.parametrize(
    "name,fault",
    [("vireo_food172", f) for f in fixtures.VIREO_FAULTS]
    + [("ingredient101", f) for f in fixtures.INGREDIENT101_FAULTS],
)
def test_each_bad_record_is_reported_with_file_and_line(tmp_path, name, fault):
    fx = WRITERS[name](tmp_path / "manual", faults=[fault])
    (injected,) = fx.faults
    with pytest.raises(manual_release.BadRecordsError) as error:
        _prepare(name, fx.manual_dir, tmp_path / "data")
    message = str(error.value)
    assert f"{injected.file}:{injected.line}:" in message, message
    assert "skip_bad_records" in message
    if fault in ("missing_image", "corrupt_jpeg", "garbage_image"):
        assert str(fx.image_root / injected.image_path) in message
    _assert_nothing_loads(name, tmp_path / "data")


@pytest.mark.parametrize("name", ["vireo_food172", "ingredient101"])
def test_skip_bad_records_leaves_them_out_and_records_why(tmp_path, name):
    all_faults = fixtures.VIREO_FAULTS if name == "vireo_food172" else fixtures.INGREDIENT101_FAULTS
    fx = WRITERS[name](tmp_path / "manual", faults=all_faults)
    _prepare(name, fx.manual_dir, tmp_path / "data", skip_bad_records=True)
    config = None if name == "vireo_food172" else "full"
    _assert_matches_fixture(fx, name, tmp_path / "data", config)
    metadata = BUILDERS[name](data_dir=tmp_path / "data").info.metadata
    assert metadata["skip_bad_records"] is True
    assert metadata["skipped_records"] == fx.skipped()
    assert metadata["num_problems"] == len(fx.faults)
    for f in fx.faults:
        assert any(p.startswith(f"{f.file}:{f.line}:") for p in metadata["problems"]), f


def test_malformed_annotation_files_stop_the_build(tmp_path):
    fx = fixtures.write_vireo_food172(tmp_path / "v")
    food_list = fx.root / "SplitAndIngreLabel" / "FoodList.txt"
    lines = food_list.read_text().splitlines()
    food_list.write_text("\n".join([lines[0], "  ;", *lines[1:]]) + "\n")
    with pytest.raises(
        manual_release.ReleaseFormatError, match=re.escape(f"{food_list}:2: empty class")
    ):
        _prepare("vireo_food172", fx.manual_dir, tmp_path / "data", skip_bad_records=True)

    fx = fixtures.write_ingredient101(tmp_path / "i")
    annotations = fx.root / "Ingredients101" / "Annotations"
    with (annotations / "ingredients.txt").open("a") as f:
        f.write("one, line, too, many\n")
    with pytest.raises(
        manual_release.ReleaseFormatError, match=re.escape(str(annotations / "ingredients.txt"))
    ):
        _prepare("ingredient101", fx.manual_dir, tmp_path / "data", config="full")
    with (annotations / "val_labels.txt").open("a") as f:
        f.write("0\n")
    with pytest.raises(manual_release.ReleaseFormatError, match=r"val_labels\.txt has 5"):
        _prepare("ingredient101", fx.manual_dir, tmp_path / "data", config="simplified")


def test_a_build_that_fails_while_writing_leaves_nothing_that_loads(tmp_path, monkeypatch):
    fx = fixtures.write_vireo_food172(tmp_path / "manual")
    read_release = manual_release.ManualReleaseBuilder.read_release

    def read_then_lose_an_image(self, manual_dir):
        release = read_release(self, manual_dir)
        fx.splits["test"][-1].file.unlink()  # vanishes after validation, before tfds writes it
        return release

    monkeypatch.setattr(
        manual_release.ManualReleaseBuilder, "read_release", read_then_lose_an_image
    )
    with pytest.raises(FileNotFoundError):
        _prepare("vireo_food172", fx.manual_dir, tmp_path / "data")
    _assert_nothing_loads("vireo_food172", tmp_path / "data")


def test_build_command(tmp_path, capsys):
    fx = fixtures.write_ingredient101(tmp_path / "manual", faults=["corrupt_jpeg"])
    args = ["--dataset", "ingredient101", "--manual_dir", str(fx.manual_dir)]
    args += ["--data_dir", str(tmp_path / "data"), "--config", "simplified"]
    assert build_cli.main(args) == 1
    assert f"{fx.faults[0].file}:{fx.faults[0].line}:" in capsys.readouterr().err

    assert build_cli.main([*args, "--skip_bad_records"]) == 0
    out = capsys.readouterr().out
    sizes = {s: len(fx.splits[s]) for s in fixtures.SPLITS}
    assert "ingredient101/simplified/1.0.0" in out
    for split, n in sizes.items():
        assert f"{split:<10} {n:>8} examples" in out
    assert "skipped records {'train': 1, 'validation': 0, 'test': 0}" in out


def test_max_shorter_side_shrinks_large_images_and_guards_the_prepared_dataset(tmp_path, capsys):
    """Build-time shrinking: images whose shorter side exceeds N are stored with it at N (aspect
    kept, the same picture), smaller ones as shipped; the dataset is read only with that N."""
    from PIL import Image

    fx = fixtures.write_vireo_food172(tmp_path / "manual")
    data_dir, n = tmp_path / "data", 24
    args = ["--dataset", "vireo_food172", "--manual_dir", str(fx.manual_dir)]
    args += ["--data_dir", str(data_dir)]
    assert build_cli.main([*args, "--max_shorter_side", str(n)]) == 0
    assert f"images shrunk to a shorter side of at most {n} px" in capsys.readouterr().out
    builder = VireoFood172(data_dir=data_dir, max_shorter_side=n)
    assert builder.info.metadata["max_shorter_side"] == n
    shrunk = kept = 0
    for split in fixtures.SPLITS:
        source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        got = {source[i]["image_path"].decode(): source[i]["image"] for i in range(len(source))}
        for e in fx.splits[split]:
            stored = got[e.image_path]
            with Image.open(e.file) as original:
                original = original.convert("RGB")
            if min(original.size) <= n:
                assert stored == e.file.read_bytes(), e.image_path
                kept += 1
                continue
            shrunk += 1
            with Image.open(io.BytesIO(stored)) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                w, h = original.size
                assert min(image.size) == n and max(image.size) == round(max(w, h) * n / min(w, h))
                reference = original.resize(image.size, Image.Resampling.LANCZOS)
                diff = np.abs(np.asarray(image, np.float32) - np.asarray(reference, np.float32))
                # The fixture's pixels are noise, the hardest case for JPEG: re-encoding costs a
                # few levels, where another picture would differ by about 85.
                assert diff.mean() < 15.0, (e.image_path, diff.mean())
    assert shrunk and kept

    # Read or rebuilt with another N (or none): one clear error, not images of the wrong size.
    with pytest.raises(ValueError, match=f"built with max_shorter_side={n}, not None"):
        VireoFood172(data_dir=data_dir).as_data_source(split="train")
    assert build_cli.main([*args, "--max_shorter_side", "16"]) == 1
    assert f"built with max_shorter_side={n}, not 16" in capsys.readouterr().err
    assert build_cli.main([*args, "--overwrite"]) == 0  # rebuilt as shipped
    assert (
        _records("vireo_food172", data_dir, "train")[fx.splits["train"][0].image_path]["image"]
        == fx.splits["train"][0].file.read_bytes()
    )


def test_truncated_jpeg_is_caught_even_if_pil_is_told_to_accept_it(tmp_path, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    fx = fixtures.write_vireo_food172(tmp_path / "manual", faults=["corrupt_jpeg"])
    with pytest.raises(manual_release.BadRecordsError, match="truncated"):
        _prepare("vireo_food172", fx.manual_dir, tmp_path / "data")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored after the check


def test_build_command_finds_synthetic_food(tmp_path, capsys):
    pytest.importorskip("marnet_jax.data.synthetic_food")
    assert (
        build_cli.main(
            ["--dataset", "synthetic_food", "--config", "tiny", "--data_dir", str(tmp_path)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "synthetic_food/tiny/1.0.0" in out and "train" in out
