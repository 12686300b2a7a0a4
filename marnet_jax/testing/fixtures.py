"""Miniature copies of the VIREO Food-172 and Ingredient-101 releases, in their exact layouts.

For tests, and to try the builders without the real data:

    python -m marnet_jax.testing.fixtures --dataset vireo_food172 --out /tmp/vireo_manual
    python -m marnet_jax.build_dataset --dataset vireo_food172 --manual_dir /tmp/vireo_manual \\
        --data_dir /tmp/tfds

The copies keep the releases' quirks: VIREO split lines with a leading slash, IngreLabel.txt values
-1/1 with a double space after '.jpg', stray ';' in FoodList.txt; Ingredient-101 image lists
without extension, 0-based label files, comma-separated per-class ingredient lists with spaces,
'Annotations' or 'annotations'. Optionally the release sits under one extra top-level folder.
Images are small real JPEGs (one greyscale). Faults can be injected (a missing image, a corrupt
JPEG, a short ingredient row, ...); each writer returns a `Fixture` saying what a build must
contain and which faults it must report where.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
from collections.abc import Sequence

import numpy as np
from absl import flags
from PIL import Image

from marnet_jax import cli

SPLITS = ("train", "validation", "test")

VIREO_FAULTS = (
    "missing_image",  # a split line whose JPEG is absent
    "corrupt_jpeg",  # a truncated JPEG
    "garbage_image",  # a .jpg that holds no image
    "short_ingredient_row",  # an IngreLabel.txt row with one value too few
    "bad_ingredient_value",  # an IngreLabel.txt row with a value other than -1/1
    "missing_ingredient_row",  # a split line with no IngreLabel.txt row
    "unknown_ingredient_key",  # an IngreLabel.txt row for an image in no split
    "bad_class_id",  # a split line whose class folder is not 1..num_classes
)
INGREDIENT101_FAULTS = (
    "missing_image",
    "corrupt_jpeg",
    "garbage_image",
    "class_mismatch",  # a label line that disagrees with the class folder of the image path
    "bad_label",  # a label line that is no class index
)

# (as written to FoodList.txt, with stray ';' and spaces on purpose; cleaned name)
_VIREO_CLASSES = [
    ("Braised pork;", "Braised pork"),
    ("; Mapo tofu", "Mapo tofu"),
    ("Kung pao chicken ;", "Kung pao chicken"),
    ("Scrambled egg with tomato", "Scrambled egg with tomato"),
    ("Steamed fish;;", "Steamed fish"),
]
_VIREO_INGREDIENTS = [
    "pork", "tofu", "chili", "peanut", "egg", "tomato", "scallion", "garlic", "ginger",
    "soy sauce", "chicken", "fish",
]  # fmt: skip
_I101_CLASSES = ["apple_pie", "beef_tartare", "caesar_salad", "dumplings", "edamame"]
_I101_FULL = [  # ingredients.txt line per class (spaces after commas, one trailing comma)
    "apples, sugar, butter, flour, cinnamon",
    "beef, egg yolk, capers, onion, mustard",
    "romaine lettuce, parmesan cheese, croutons, egg yolk, garlic,",
    "flour, pork, cabbage, ginger, soy sauce",
    "soybeans, salt",
]
_I101_SIMPLIFIED = [  # ingredients_simplified.txt
    "apple, sugar, butter, flour",
    "beef, egg, onion, mustard",
    "lettuce, cheese, bread, egg, garlic",
    "flour, pork, cabbage, ginger, soy sauce",
    "soybean, salt",
]


@dataclasses.dataclass
class FixtureExample:
    """A record a build must contain."""

    image_path: str  # relative to the image root, as the 'image_path' feature holds it
    file: pathlib.Path  # the JPEG on disk
    label: int
    ingredients: dict[str, np.ndarray]  # config name -> uint8 [V] multi-hot


@dataclasses.dataclass
class InjectedFault:
    """A fault written on purpose: the file (and 1-based line) a builder must name."""

    kind: str
    split: str | None  # split whose record it spoils (None: no record lost)
    file: pathlib.Path
    line: int | None
    image_path: str | None


@dataclasses.dataclass
class Fixture:
    """What a writer wrote: the manual_dir, names, and the expected records of every split."""

    dataset: str
    manual_dir: pathlib.Path
    root: pathlib.Path  # folder holding the release's top-level folders
    image_root: pathlib.Path
    class_names: list[str]
    ingredient_names: dict[str, list[str]]  # config name -> vocabulary
    splits: dict[
        str, list[FixtureExample]
    ]  # records a build keeps (those spoilt by faults left out)
    faults: list[InjectedFault]

    def skipped(self) -> dict[str, int]:
        """Records per split that the faults remove."""
        counts = dict.fromkeys(SPLITS, 0)
        for fault in self.faults:
            if fault.split is not None:
                counts[fault.split] += 1
        return counts


def _jpeg(rng: np.random.Generator, grey: bool = False) -> bytes:
    h, w = (int(v) for v in rng.integers(16, 33, size=2))
    pixels = rng.integers(0, 256, size=(h, w) if grey else (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _split_counts(per_class: Sequence[int]) -> list[str]:
    train, val, test = per_class
    return ["train"] * train + ["validation"] * val + ["test"] * test


def _check_faults(faults: Sequence[str], known: Sequence[str]) -> None:
    unknown = set(faults) - set(known)
    if unknown:
        raise ValueError(f"unknown fault(s) {sorted(unknown)}; choose from {list(known)}")


def _spoil_image(kind: str, path: pathlib.Path) -> None:
    if kind == "missing_image":
        path.unlink()
    elif kind == "corrupt_jpeg":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage_image":
        path.write_bytes(b"this is not a JPEG file\n")


def write_vireo_food172(
    manual_dir: str | pathlib.Path,
    *,
    num_classes: int = 4,
    per_class: Sequence[int] = (3, 1, 2),
    extra_top_level: str | None = None,
    faults: Sequence[str] = (),
    seed: int = 0,
) -> Fixture:
    """Writes a miniature VIREO Food-172 release (ready_chinese_food/ + SplitAndIngreLabel/).

    Args:
      manual_dir: folder to write into (created).
      num_classes: 1..5 classes.
      per_class: images of every class in TR, VAL, TE.
      extra_top_level: put the release under this extra folder (e.g. 'VireoFood172').
      faults: kinds from VIREO_FAULTS to inject, each into a different record.
      seed: randomness of images and ingredient labels.
    """
    _check_faults(faults, VIREO_FAULTS)
    if not 1 <= num_classes <= len(_VIREO_CLASSES):
        raise ValueError(f"num_classes must be in 1..{len(_VIREO_CLASSES)}")
    rng = np.random.default_rng(seed)
    manual_dir = pathlib.Path(manual_dir)
    root = manual_dir / extra_top_level if extra_top_level else manual_dir
    image_root, label_dir = root / "ready_chinese_food", root / "SplitAndIngreLabel"
    label_dir.mkdir(parents=True, exist_ok=True)
    num_ingredients = len(_VIREO_INGREDIENTS)

    (label_dir / "FoodList.txt").write_text(
        "".join(raw + "\n" for raw, _ in _VIREO_CLASSES[:num_classes])
    )
    (label_dir / "IngredientList.txt").write_text("\n".join(_VIREO_INGREDIENTS) + "\n")

    examples: dict[str, list[FixtureExample]] = {s: [] for s in SPLITS}
    for c in range(num_classes):
        (image_root / str(c + 1)).mkdir(parents=True, exist_ok=True)
        for k, split in enumerate(_split_counts(per_class)):
            rel = f"{c + 1}/{c + 3}_{10 * k + 7}.jpg"
            path = image_root / rel
            path.write_bytes(_jpeg(rng, grey=(c == 0 and k == 0)))
            multi_hot = np.zeros(num_ingredients, np.uint8)
            multi_hot[rng.choice(num_ingredients, size=int(rng.integers(1, 5)), replace=False)] = 1
            examples[split].append(FixtureExample(rel, path, c, {"default": multi_hot}))

    # Split lists: leading slash. IngreLabel.txt: '<key>  v1 v2 ...' (double space), -1/1, shuffled.
    list_names = {"train": "TR.txt", "validation": "VAL.txt", "test": "TE.txt"}
    lines = {s: [f"/{e.image_path}" for e in examples[s]] for s in SPLITS}
    all_examples = [e for s in SPLITS for e in examples[s]]
    rows = {  # key -> values, in file order
        f"/{all_examples[i].image_path}": [
            "1" if v else "-1" for v in all_examples[i].ingredients["default"]
        ]
        for i in rng.permutation(len(all_examples))
    }

    injected: list[InjectedFault] = []
    row_faults: list[tuple[InjectedFault, str]] = []  # faults reported at an IngreLabel.txt row
    victims = iter(
        [(s, i) for i in range(10) for s in SPLITS]
    )  # one record per fault, rotating splits
    for kind in faults:
        if kind == "unknown_ingredient_key":
            rows["/1/999_1.jpg"] = ["-1"] * num_ingredients
            fault = InjectedFault(kind, None, label_dir / "IngreLabel.txt", None, None)
            row_faults.append((fault, "/1/999_1.jpg"))
        elif kind == "bad_class_id":
            lines["test"].append(f"/{num_classes + 7}/1_1.jpg")
            fault = InjectedFault(kind, "test", label_dir / "TE.txt", len(lines["test"]), None)
        else:
            split, i = next(victims)
            while i >= len(examples[split]):
                split, i = next(victims)
            e, key = examples[split][i], f"/{examples[split][i].image_path}"
            fault = InjectedFault(kind, split, label_dir / list_names[split], i + 1, e.image_path)
            if kind in ("missing_image", "corrupt_jpeg", "garbage_image"):
                _spoil_image(kind, e.file)
            elif kind == "missing_ingredient_row":
                del rows[key]
            else:  # a bad IngreLabel.txt row: reported at its own line
                rows[key] = (
                    rows[key][:-1] if kind == "short_ingredient_row" else [*rows[key][:-1], "2"]
                )
                fault.file = label_dir / "IngreLabel.txt"
                row_faults.append((fault, key))
        injected.append(fault)
    row_line = {key: n for n, key in enumerate(rows, start=1)}
    for fault, key in row_faults:
        fault.line = row_line[key]

    for split in SPLITS:
        (label_dir / list_names[split]).write_text("".join(line + "\n" for line in lines[split]))
    (label_dir / "IngreLabel.txt").write_text(
        "".join(f"{key}  {' '.join(values)}\n" for key, values in rows.items())
    )
    spoilt = {f.image_path for f in injected}

    return Fixture(
        dataset="vireo_food172",
        manual_dir=manual_dir,
        root=root,
        image_root=image_root,
        class_names=[clean for _, clean in _VIREO_CLASSES[:num_classes]],
        ingredient_names={"default": list(_VIREO_INGREDIENTS)},
        splits={s: [e for e in examples[s] if e.image_path not in spoilt] for s in SPLITS},
        faults=injected,
    )


def write_ingredient101(
    manual_dir: str | pathlib.Path,
    *,
    num_classes: int = 4,
    per_class: Sequence[int] = (3, 1, 2),
    annotations_dirname: str = "Annotations",
    extra_top_level: str | None = None,
    faults: Sequence[str] = (),
    seed: int = 0,
) -> Fixture:
    """Writes a miniature Ingredient-101 release (food-101/images/ + Ingredients101/<annotations>/).

    Args:
      manual_dir: folder to write into (created).
      num_classes: 1..5 classes.
      per_class: images of every class in train, val, test.
      annotations_dirname: 'Annotations' or 'annotations'.
      extra_top_level: put both releases under this extra folder.
      faults: kinds from INGREDIENT101_FAULTS to inject, each into a different record.
      seed: randomness of images and image ids.
    """
    _check_faults(faults, INGREDIENT101_FAULTS)
    if not 1 <= num_classes <= len(_I101_CLASSES):
        raise ValueError(f"num_classes must be in 1..{len(_I101_CLASSES)}")
    rng = np.random.default_rng(seed)
    manual_dir = pathlib.Path(manual_dir)
    root = manual_dir / extra_top_level if extra_top_level else manual_dir
    image_root = root / "food-101" / "images"
    annotations = root / "Ingredients101" / annotations_dirname
    annotations.mkdir(parents=True, exist_ok=True)
    classes = _I101_CLASSES[:num_classes]
    (annotations / "classes.txt").write_text("".join(c + "\n" for c in classes))

    vocab, class_vectors = {}, {}
    for config, file_name, table in (
        ("full", "ingredients.txt", _I101_FULL),
        ("simplified", "ingredients_simplified.txt", _I101_SIMPLIFIED),
    ):
        (annotations / file_name).write_text("".join(line + "\n" for line in table[:num_classes]))
        per_class_items = [
            [item.strip() for item in line.split(",") if item.strip()]
            for line in table[:num_classes]
        ]
        vocab[config] = sorted({item for items in per_class_items for item in items})
        vectors = np.zeros((num_classes, len(vocab[config])), np.uint8)
        for c, items in enumerate(per_class_items):
            for item in items:
                vectors[c, vocab[config].index(item)] = 1
        class_vectors[config] = vectors

    examples: dict[str, list[FixtureExample]] = {s: [] for s in SPLITS}
    ids = iter(
        rng.choice(np.arange(100000, 4000000), size=num_classes * sum(per_class), replace=False)
    )
    for c, name in enumerate(classes):
        (image_root / name).mkdir(parents=True, exist_ok=True)
        for k, split in enumerate(_split_counts(per_class)):
            rel = f"{name}/{next(ids)}.jpg"
            path = image_root / rel
            path.write_bytes(_jpeg(rng, grey=(c == 1 and k == 0)))
            vectors = {config: class_vectors[config][c] for config in class_vectors}
            examples[split].append(FixtureExample(rel, path, c, vectors))
    for split in SPLITS:  # list order is not class order in the fixture
        examples[split] = [examples[split][i] for i in rng.permutation(len(examples[split]))]

    image_lines = {s: [e.image_path.removesuffix(".jpg") for e in examples[s]] for s in SPLITS}
    label_lines = {s: [str(e.label) for e in examples[s]] for s in SPLITS}
    prefixes = {"train": "train", "validation": "val", "test": "test"}
    injected: list[InjectedFault] = []
    victims = iter([(s, i) for i in range(10) for s in SPLITS])
    for kind in faults:
        split, i = next(victims)
        while i >= len(examples[split]):
            split, i = next(victims)
        e = examples[split][i]
        images_file = annotations / f"{prefixes[split]}_images.txt"
        if kind in ("missing_image", "corrupt_jpeg", "garbage_image"):
            _spoil_image(kind, e.file)
        elif kind == "class_mismatch":
            label_lines[split][i] = str((e.label + 1) % num_classes)
        elif kind == "bad_label":
            label_lines[split][i] = str(num_classes + 50)
        injected.append(InjectedFault(kind, split, images_file, i + 1, e.image_path))
    for split, prefix in prefixes.items():
        (annotations / f"{prefix}_images.txt").write_text(
            "".join(line + "\n" for line in image_lines[split])
        )
        (annotations / f"{prefix}_labels.txt").write_text(
            "".join(line + "\n" for line in label_lines[split])
        )

    spoilt = {f.image_path for f in injected}
    return Fixture(
        dataset="ingredient101",
        manual_dir=manual_dir,
        root=root,
        image_root=image_root,
        class_names=list(classes),
        ingredient_names=vocab,
        splits={s: [e for e in examples[s] if e.image_path not in spoilt] for s in SPLITS},
        faults=injected,
    )


WRITERS = {"vireo_food172": write_vireo_food172, "ingredient101": write_ingredient101}


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write one fixture release into --out."""

    def define(fv: flags.FlagValues) -> None:
        flags.DEFINE_enum("dataset", None, sorted(WRITERS), "the release layout", flag_values=fv)
        flags.DEFINE_string("out", None, "manual_dir to write", flag_values=fv)
        flags.mark_flags_as_required(["dataset", "out"], flag_values=fv)
        flags.DEFINE_integer("num_classes", 4, "classes in the fixture", flag_values=fv)
        flags.DEFINE_string("extra_top_level", None, "an extra top-level folder", flag_values=fv)
        flags.DEFINE_list("faults", [], "faults to plant (FAULTS names)", flag_values=fv)

    args, rest = cli.parse_flags("marnet_jax.testing.fixtures", define, argv, doc=__doc__)
    if rest:
        cli.usage_error("marnet_jax.testing.fixtures", f"unexpected arguments {rest}")
    fixture = WRITERS[args.dataset](
        args.out,
        num_classes=args.num_classes,
        extra_top_level=args.extra_top_level,
        faults=args.faults,
    )
    sizes = ", ".join(f"{s} {len(fixture.splits[s])}" for s in SPLITS)
    print(f"wrote {fixture.dataset} release to {fixture.manual_dir} ({sizes})")


if __name__ == "__main__":
    cli.run(main)
