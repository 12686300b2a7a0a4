"""tfds builder 'ingredient101': Food-101 images with the Ingredients101 per-class ingredient lists.

Reads the two releases as shipped (see MANUAL_DOWNLOAD_INSTRUCTIONS) from a manual_dir:

    <root>/food-101/images/<class_name>/<image_id>.jpg
    <root>/Ingredients101/Annotations/  (or annotations/)
        classes.txt                  line i = name of class i (0-based)
        ingredients.txt              line i = comma-separated ingredients of class i ('full')
        ingredients_simplified.txt   the same, simplified vocabulary ('simplified')
        {train,val,test}_images.txt  '<class_name>/<image_id>', no extension ('.jpg' appended)
        {train,val,test}_labels.txt  0-based class index, line-aligned with *_images.txt

<root> is the manual_dir itself or a single folder inside it.

Ingredients are per class: every image of class c gets class c's multi-hot vector (so the text must
never be used at prediction time). Vocabulary: the sorted set of names over all classes, after
stripping whitespace around each comma-separated item (case kept, empty items dropped); stored in
the metadata as 'ingredient_names'. The class folder of each image path must agree with the label
line (compared case-insensitively, spaces read as '_'), otherwise that record is bad.

Splits: train, validation (val_*), test. Features as in manual_release ('image_path' is relative to
food-101/images/, e.g. 'apple_pie/1005649.jpg'). Metadata: 'class_names', 'ingredient_names',
'ingredient_vocabulary', 'ingredients_file', 'annotations_folder', 'classes_without_ingredients',
'image_formats', 'skip_bad_records', 'skipped_records', 'num_problems', 'problems'.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from marnet_jax.data import manual_release
from marnet_jax.data.manual_release import ProblemLog, Record, Release

SPLIT_PREFIXES = {"train": "train", "validation": "val", "test": "test"}


@dataclasses.dataclass
class Ingredient101Config(tfds.core.BuilderConfig):
    """Which per-class ingredient file of the Annotations folder gives the vocabulary."""

    ingredients_file: str = "ingredients.txt"


def parse_ingredient_lists(path: epath.Path, num_classes: int) -> list[list[str]]:
    """Per-class ingredient lists (line i = class i): items stripped, empties dropped, in order."""
    lines = manual_release.read_lines(path)
    if len(lines) != num_classes:
        raise manual_release.ReleaseFormatError(
            f"{path}: {len(lines)} lines, but classes.txt names {num_classes} classes (line i "
            "must list the ingredients of class i)"
        )
    lists = []
    for line in lines:
        items = [item.strip() for item in line.split(",")]
        lists.append(list(dict.fromkeys(item for item in items if item)))
    return lists


def class_key(name: str) -> str:
    """Form in which a classes.txt name and an image folder name are compared."""
    return name.strip().lower().replace(" ", "_")


class Ingredient101(manual_release.ManualReleaseBuilder):
    """Ingredient-101 (Food-101 images + Ingredients101 lists); configs 'full' and 'simplified'."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Release layout as shipped; shipped JPEG bytes; per-class multi-hot."
    }
    BUILDER_CONFIGS: ClassVar[list[Ingredient101Config]] = [
        Ingredient101Config(
            name="full",
            description="Ingredient lists of ingredients.txt (446 unique names in the release).",
            ingredients_file="ingredients.txt",
        ),
        Ingredient101Config(
            name="simplified",
            description="Ingredient lists of ingredients_simplified.txt (about 227 unique names).",
            ingredients_file="ingredients_simplified.txt",
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "full"
    DESCRIPTION = (
        "Ingredient-101 (Bolanos et al. 2017): the 101,000 Food-101 images (101 classes) with "
        "the per-class ingredient lists of the Ingredients101 annotations and their "
        "train/val/test split."
    )
    HOMEPAGE = "http://www.ub.edu/cvub/ingredients101/"
    CITATION = """@inproceedings{bolanos2017food,
  title={Food Ingredients Recognition through Multi-label Learning},
  author={Bola{\\~n}os, Marc and Ferr{\\`a}, Aina and Radeva, Petia},
  booktitle={New Trends in Image Analysis and Processing -- ICIAP 2017 Workshops},
  pages={394--402},
  year={2017}
}
@inproceedings{bossard14,
  title={Food-101 -- Mining Discriminative Components with Random Forests},
  author={Bossard, Lukas and Guillaumin, Matthieu and Van Gool, Luc},
  booktitle={European Conference on Computer Vision},
  year={2014}
}"""
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download two releases:
  - Food-101 from ETH Zurich, https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/
    (food-101.tar.gz, about 5 GB; extracts to food-101/images/<class_name>/<id>.jpg and
    food-101/meta/)
  - the Ingredients101 annotations from the University of Barcelona,
    http://www.ub.edu/cvub/ingredients101/ (extracts to Ingredients101/Annotations/ holding
    classes.txt, ingredients.txt, ingredients_simplified.txt, {train,val,test}_images.txt and
    {train,val,test}_labels.txt)
Extract both into the same manual_dir, so that it holds
  <manual_dir>/food-101/images/apple_pie/....jpg
  <manual_dir>/Ingredients101/Annotations/classes.txt  ('annotations/' in lower case also works)
(one extra top-level folder around both is also accepted).
Then: python -m marnet_jax.build_dataset --dataset ingredient101 [--config simplified] \\
        --manual_dir <manual_dir> --data_dir <dir>
"""

    def _read_annotations(self, manual_dir: epath.Path) -> Release:
        config: Ingredient101Config = self.builder_config
        _, folders = manual_release.locate_release(
            manual_dir,
            {
                "images": ["food-101/images"],
                "annotations": ["Ingredients101/Annotations", "Ingredients101/annotations"],
            },
            self.name,
            extra_folder_example="Ingredient101",
        )
        image_root, annotations = folders["images"], folders["annotations"]
        split_files = [
            f"{prefix}_{kind}.txt"
            for prefix in SPLIT_PREFIXES.values()
            for kind in ("images", "labels")
        ]
        files = manual_release.require_files(
            annotations, ["classes.txt", config.ingredients_file, *split_files], self.name
        )
        class_names = manual_release.read_names(files["classes.txt"], "class")
        lists = parse_ingredient_lists(files[config.ingredients_file], len(class_names))
        vocabulary = sorted({name for items in lists for name in items})
        index = {name: j for j, name in enumerate(vocabulary)}
        vectors = np.zeros((len(class_names), len(vocabulary)), np.uint8)
        for c, items in enumerate(lists):
            vectors[c, [index[name] for name in items]] = 1

        log = ProblemLog()
        records: dict[str, list[Record]] = {}
        seen: dict[str, str] = {}
        for split, prefix in SPLIT_PREFIXES.items():
            images_file, labels_file = files[f"{prefix}_images.txt"], files[f"{prefix}_labels.txt"]
            images = manual_release.read_lines(images_file)
            labels = manual_release.read_lines(labels_file)
            if len(images) != len(labels):
                raise manual_release.ReleaseFormatError(
                    f"{images_file} has {len(images)} lines but {labels_file} has {len(labels)}: "
                    "line i of one must describe line i of the other"
                )
            records[split] = []
            for lineno, (image, label) in enumerate(zip(images, labels, strict=True), start=1):
                image, label = image.strip(), label.strip()
                if not image and not label:
                    continue
                where = f"(label at {labels_file.name}:{lineno})"
                parts = image.split("/")
                if len(parts) != 2 or not all(parts):
                    log.drop(
                        split, images_file, lineno, f"{image!r} is not '<class_name>/<image_id>'"
                    )
                    continue
                if not label.isdigit() or int(label) >= len(class_names):
                    log.drop(
                        split,
                        images_file,
                        lineno,
                        f"label {label!r} {where} is not a class index 0..{len(class_names) - 1}",
                    )
                    continue
                c = int(label)
                if class_key(parts[0]) != class_key(class_names[c]):
                    log.drop(
                        split,
                        images_file,
                        lineno,
                        f"image {image!r} is in folder {parts[0]!r} but its label {c} {where} is "
                        f"{class_names[c]!r} (classes.txt:{c + 1})",
                    )
                    continue
                file_name = parts[1] if parts[1].lower().endswith(".jpg") else parts[1] + ".jpg"
                image_path = f"{parts[0]}/{file_name}"
                if image_path in seen:
                    log.drop(
                        split,
                        images_file,
                        lineno,
                        f"{image_path} already listed at {seen[image_path]}",
                    )
                    continue
                seen[image_path] = f"{images_file.name}:{lineno}"
                records[split].append(
                    Record(
                        image_file=image_root / parts[0] / file_name,
                        image_path=image_path,
                        label=c,
                        ingredients=vectors[c],
                        list_file=str(images_file),
                        line=lineno,
                    )
                )
        empty = [class_names[c] for c in range(len(class_names)) if not vectors[c].any()]
        return Release(
            class_names=class_names,
            ingredient_names=vocabulary,
            records=records,
            log=log,
            metadata={
                "ingredient_vocabulary": (
                    f"sorted unique names of {annotations.name}/{config.ingredients_file} "
                    "(per class, comma-separated, whitespace stripped, case kept)"
                ),
                "ingredients_file": config.ingredients_file,
                "annotations_folder": annotations.name,
                "classes_without_ingredients": empty,
            },
        )
