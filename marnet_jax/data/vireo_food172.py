"""tfds builder 'vireo_food172': VIREO Food-172 (172 Chinese dishes, per-image ingredient labels).

Reads the release as shipped (see MANUAL_DOWNLOAD_INSTRUCTIONS) from a manual_dir:

    <root>/ready_chinese_food/<class_id>/<file>.jpg   class_id 1..172
    <root>/SplitAndIngreLabel/TR.txt VAL.txt TE.txt  one image per line: '/1/4_41.jpg'
    <root>/SplitAndIngreLabel/FoodList.txt           line i = name of class i (1-based)
    <root>/SplitAndIngreLabel/IngredientList.txt     line j = name of ingredient column j
    <root>/SplitAndIngreLabel/IngreLabel.txt         '<path> v1 ... vV', v in {-1, 1}

<root> is the manual_dir itself or a single folder inside it (e.g. `VireoFood172/`). Quirks handled:
the leading slash of the split lines (IngreLabel.txt keys match them), any whitespace between the
IngreLabel.txt columns (a double space after '.jpg'), stray ';' around FoodList.txt names.

Splits: train (TR.txt), validation (VAL.txt), test (TE.txt). Features: 'image' (the shipped JPEG
bytes), 'label' (first path component - 1; ClassLabel with the FoodList names), 'ingredients' (uint8
[V] multi-hot: -1 -> 0, 1 -> 1), 'image_path' (e.g. '1/4_41.jpg', relative to ready_chinese_food/).
Metadata: 'class_names', 'ingredient_names', 'ingredient_vocabulary', 'image_formats',
'skip_bad_records', 'skipped_records', 'num_problems', 'problems', 'unused_ingredient_rows'.
Bad input: see manual_release.
"""

from __future__ import annotations

import re
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from marnet_jax.data import manual_release
from marnet_jax.data.manual_release import ProblemLog, Record, Release

SPLIT_FILES = {"train": "TR.txt", "validation": "VAL.txt", "test": "TE.txt"}
ANNOTATION_FILES = (*SPLIT_FILES.values(), "FoodList.txt", "IngredientList.txt", "IngreLabel.txt")

_STRAY = re.compile(r"^[\s;]+|[\s;]+$")


def clean_food_name(line: str) -> str:
    """FoodList.txt entry without surrounding whitespace and stray ';'."""
    return _STRAY.sub("", line)


def normalize_key(path: str) -> str:
    """'/1/4_41.jpg' form (one leading slash), as IngreLabel.txt and the split lists write it."""
    return "/" + path.strip().lstrip("/")


def read_ingredient_rows(
    path: epath.Path, num_ingredients: int, log: ProblemLog
) -> tuple[dict[str, tuple[np.ndarray, int]], set[str]]:
    """IngreLabel.txt -> ({key: (uint8 [V] multi-hot, line)}, keys of bad rows); logs bad rows."""
    rows: dict[str, tuple[np.ndarray, int]] = {}
    bad: set[str] = set()
    for lineno, line in enumerate(manual_release.read_lines(path), start=1):
        tokens = line.split()
        if not tokens:
            continue
        key, values = normalize_key(tokens[0]), tokens[1:]
        if key in rows or key in bad:
            where = f"line {rows[key][1]}" if key in rows else "an earlier bad row"
            log.note(path, lineno, f"duplicate row for {key} (first at {where})")
            rows.pop(key, None)
            bad.add(key)
            continue
        if len(values) != num_ingredients:
            log.note(
                path,
                lineno,
                f"row for {key} has {len(values)} values, expected {num_ingredients} (one per line "
                "of IngredientList.txt)",
            )
            bad.add(key)
            continue
        num_positive = values.count("1")
        if num_positive + values.count("-1") != len(values):
            col = next(j for j, v in enumerate(values) if v not in ("1", "-1"))
            log.note(
                path,
                lineno,
                f"row for {key}: value {values[col]!r} in column {col + 1} is not -1 or 1",
            )
            bad.add(key)
            continue
        multi_hot = np.zeros(num_ingredients, np.uint8)
        start = 0
        for _ in range(num_positive):  # list.index runs in C; rows hold few positives
            start = values.index("1", start) + 1
            multi_hot[start - 1] = 1
        rows[key] = (multi_hot, lineno)
    return rows, bad


class VireoFood172(manual_release.ManualReleaseBuilder):
    """VIREO Food-172 from the manually downloaded release (see MANUAL_DOWNLOAD_INSTRUCTIONS)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Release layout as shipped; shipped JPEG bytes; per-image multi-hot."
    }
    DESCRIPTION = (
        "VIREO Food-172: 110,241 images of 172 Chinese dishes with per-image labels over 353 "
        "ingredients (Chen and Ngo, ACM MM 2016). Splits TR/VAL/TE as released."
    )
    HOMEPAGE = "http://vireo.cs.cityu.edu.hk/VireoFood172/"
    CITATION = """@inproceedings{chen2016deep,
  title={Deep-based Ingredient Recognition for Cooking Recipe Retrieval},
  author={Chen, Jingjing and Ngo, Chong-Wah},
  booktitle={Proceedings of the 24th ACM International Conference on Multimedia},
  pages={32--41},
  year={2016}
}"""
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the two archives of VIREO Food-172 from the VIREO lab (City University of Hong Kong),
http://vireo.cs.cityu.edu.hk/VireoFood172/ (the site may ask you to accept its terms of use):
  - VireoFood172.zip        the images (folder ready_chinese_food/, 172 class folders named 1..172)
  - SplitAndIngreLabel.zip  splits and labels (TR.txt, VAL.txt, TE.txt, FoodList.txt,
                            IngredientList.txt, IngreLabel.txt)
Extract both into the same manual_dir, so that it holds
  <manual_dir>/ready_chinese_food/1/....jpg
  <manual_dir>/SplitAndIngreLabel/TR.txt (and the other five files)
(one extra top-level folder, e.g. <manual_dir>/VireoFood172/ready_chinese_food/, is also accepted).
Then: python -m marnet_jax.build_dataset --dataset vireo_food172 --manual_dir <manual_dir> \\
        --data_dir <dir>
"""

    def _read_annotations(self, manual_dir: epath.Path) -> Release:
        _, folders = manual_release.locate_release(
            manual_dir,
            {"images": ["ready_chinese_food"], "labels": ["SplitAndIngreLabel"]},
            self.name,
            extra_folder_example="VireoFood172",
        )
        image_root = folders["images"]
        files = manual_release.require_files(folders["labels"], ANNOTATION_FILES, self.name)
        class_names = manual_release.read_names(files["FoodList.txt"], "class", clean_food_name)
        ingredient_names = manual_release.read_names(
            files["IngredientList.txt"], "ingredient", unique=False
        )
        log = ProblemLog()
        rows, bad_rows = read_ingredient_rows(files["IngreLabel.txt"], len(ingredient_names), log)

        records: dict[str, list[Record]] = {}
        seen: dict[str, str] = {}  # key -> 'TR.txt:12'
        for split, name in SPLIT_FILES.items():
            list_file = files[name]
            records[split] = []
            for lineno, line in enumerate(manual_release.read_lines(list_file), start=1):
                tokens = line.split()
                if not tokens:
                    continue
                if len(tokens) != 1:
                    log.drop(split, list_file, lineno, f"expected one image path, got {line!r}")
                    continue
                key = normalize_key(tokens[0])
                parts = key[1:].split("/")
                if len(parts) != 2 or not parts[0].isdigit():
                    log.drop(split, list_file, lineno, f"{key!r} is not '/<class_id>/<file>'")
                    continue
                class_id = int(parts[0])
                if not 1 <= class_id <= len(class_names):
                    log.drop(
                        split,
                        list_file,
                        lineno,
                        f"class id {class_id} of {key} is outside 1..{len(class_names)} "
                        "(FoodList.txt lines)",
                    )
                    continue
                if key in seen:
                    log.drop(split, list_file, lineno, f"{key} already listed at {seen[key]}")
                    continue
                seen[key] = f"{name}:{lineno}"
                if key not in rows:
                    if key not in bad_rows:  # a bad row was already reported at its own line
                        log.drop(
                            split,
                            list_file,
                            lineno,
                            f"{key} has no row in {files['IngreLabel.txt']}",
                        )
                    else:
                        log.skipped[split] += 1
                    continue
                records[split].append(
                    Record(
                        image_file=image_root / parts[0] / parts[1],
                        image_path=key[1:],
                        label=class_id - 1,
                        ingredients=rows[key][0],
                        list_file=str(list_file),
                        line=lineno,
                    )
                )

        unused = sorted((line, key) for key, (_, line) in rows.items() if key not in seen)
        for line, key in unused:
            log.note(files["IngreLabel.txt"], line, f"unknown key {key}: it is in no split list")
        return Release(
            class_names=class_names,
            ingredient_names=ingredient_names,
            records=records,
            log=log,
            metadata={
                "ingredient_vocabulary": (
                    "SplitAndIngreLabel/IngredientList.txt, line j = ingredient column j of "
                    "IngreLabel.txt (per-image labels)"
                ),
                "unused_ingredient_rows": len(unused),
            },
        )
