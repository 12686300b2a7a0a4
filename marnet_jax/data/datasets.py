"""Building and opening the project's tfds datasets (no TensorFlow), and the facts the model needs.

`prepare(data_cfg)` builds the dataset into ArrayRecord files when it is not built yet and returns
its `DatasetFacts`; `source(data_cfg, split)` opens a split as a random-access source for grain,
with 'image' left as the encoded PNG/JPEG bytes (the grain pipeline decodes them in parallel).

Multi-host: by default only process 0 builds; the others wait at a barrier
(`multihost_utils.sync_global_devices`) and then read what it wrote, so `data_dir` must be visible
to every process (GCS, NFS). With host-local disks set `data_cfg.build_on_all_processes = True`:
every process then builds its own copy and nobody waits.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from marnet_jax.data import manual_release

# tfds builder name -> module defining it (imported on first use, which registers it with tfds).
BUILDER_MODULES: dict[str, str] = {
    "synthetic_food": "marnet_jax.data.synthetic_food",
    "vireo_food172": "marnet_jax.data.vireo_food172",
    "ingredient101": "marnet_jax.data.ingredient101",
}

# DatasetInfo.metadata key of the ingredient vocabulary (names; index = multi-hot column).
INGREDIENT_NAMES_KEY = "ingredient_names"


@dataclasses.dataclass(frozen=True)
class DatasetFacts:
    """What the rest of the project needs to know about a prepared dataset."""

    name: str  # tfds builder name.
    builder_config: str | None  # tfds builder config name (None: the builder has none).
    num_classes: int
    num_ingredients: int | None  # Length V of the 'ingredients' multi-hot; None: not known
    class_names: tuple[str, ...]
    ingredient_names: tuple[str, ...]
    split_sizes: Mapping[str, int]  # Examples per split, e.g. {'train': 10000, ...}.
    image_shape: tuple[int, int, int] | None  # Stored (H, W, C) when fixed (synthetic), else None.


def builder_class(name: str) -> type[tfds.core.DatasetBuilder]:
    """The project's tfds builder class registered under `name`."""
    if name not in BUILDER_MODULES:
        raise ValueError(f"Unknown dataset {name!r}; expected one of {sorted(BUILDER_MODULES)}.")
    module = importlib.import_module(BUILDER_MODULES[name])
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and issubclass(value, tfds.core.DatasetBuilder)
            and getattr(value, "name", None) == name
        ):
            return value
    raise ImportError(f"{BUILDER_MODULES[name]} defines no tfds builder named {name!r}.")


def builder(data_cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """A builder for `data_cfg.name` / `data_cfg.builder_config` reading and writing
    `data_cfg.data_dir`."""
    cls = builder_class(data_cfg.name)
    kwargs: dict[str, Any] = {"data_dir": os.path.expanduser(data_cfg.data_dir)}
    if data_cfg.builder_config is not None:
        kwargs["config"] = data_cfg.builder_config
    if issubclass(cls, manual_release.ManualReleaseBuilder):
        kwargs["skip_bad_records"] = bool(data_cfg.skip_bad_records)
        kwargs["max_shorter_side"] = data_cfg.get("max_shorter_side")
    return cls(**kwargs)


# (classes, ingredients) of the released real datasets, for shape-only work on a machine without them
# (benchmarks, preflight; their builders learn the counts from the release files).
RELEASE_SHAPES = {
    ("vireo_food172", None): (172, 353),
    ("ingredient101", "full"): (101, 446),
    ("ingredient101", "simplified"): (101, 227),
}


def shape_facts(data_cfg: ml_collections.ConfigDict) -> DatasetFacts:
    """Class and ingredient counts of a dataset without building it (benchmarks and the preflight
    only need shapes): from the builder's features where they are fixed (synthetic_food), else
    from the release's published counts."""
    features = builder(data_cfg).info.features
    shape = features["ingredients"].shape
    if shape and shape[-1] is not None:
        num_classes, num_ingredients = int(features["label"].num_classes), int(shape[-1])
    else:
        key = (data_cfg.name, data_cfg.builder_config)
        if key not in RELEASE_SHAPES:
            raise ValueError(f"No known class/ingredient counts for dataset {key}.")
        num_classes, num_ingredients = RELEASE_SHAPES[key]
    return DatasetFacts(
        name=data_cfg.name,
        builder_config=data_cfg.builder_config,
        num_classes=num_classes,
        num_ingredients=num_ingredients,
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
        ingredient_names=tuple(f"ingredient_{i}" for i in range(num_ingredients)),
        split_sizes={},
        image_shape=None,
    )


def is_prepared(b: tfds.core.DatasetBuilder) -> bool:
    """tfds's `is_prepared`, without the warning it logs for a dataset not built yet (every first
    run would print one)."""
    return (b.data_path / "dataset_info.json").exists() and b.is_prepared()


def _build(b: tfds.core.DatasetBuilder, manual_dir: str | None) -> bool:
    """Builds the dataset under an exclusive lock next to its directory, so that processes asked
    to build it at once (two runs started together on a fresh machine) build it once: the others
    wait, then find it prepared. True if this call built it."""
    lock_path = (
        f"{os.fspath(b.data_path)}.build.lock"  # <data_dir>/<name>/<config>/<version>.build.lock
    )
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if is_prepared(b):
            return False
        manual = os.path.expanduser(manual_dir) if manual_dir else None
        b.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual),
            file_format="array_record",
        )
        return True


def prepare(data_cfg: ml_collections.ConfigDict) -> DatasetFacts:
    """Builds the dataset if needed (on process 0 only, unless configured otherwise); its facts.

    Every process must call this (it holds a barrier in multi-process runs).
    """
    b = builder(data_cfg)
    multi = jax.process_count() > 1 and not data_cfg.build_on_all_processes
    was_prepared = is_prepared(b)
    if not was_prepared and (not multi or jax.process_index() == 0):
        if not _build(b, data_cfg.manual_dir):
            b = builder(data_cfg)  # Another process built it meanwhile: read its DatasetInfo.
    if multi:
        # On every process, even one that already sees the files: all must reach the barrier.
        multihost_utils.sync_global_devices(
            f"marnet_jax.data.prepare:{data_cfg.name}/{data_cfg.builder_config}"
        )
        if not was_prepared and jax.process_index() != 0:
            b = builder(data_cfg)  # Its DatasetInfo predates the build: read what process 0 wrote.
            if not is_prepared(b):
                raise FileNotFoundError(
                    f"{b.data_path} is not prepared after process 0 built it: data_dir must be "
                    "shared by all processes, or set data.build_on_all_processes = True."
                )
    return facts_from_info(b.info, data_cfg.builder_config)


def facts_from_info(info: tfds.core.DatasetInfo, builder_config: str | None) -> DatasetFacts:
    """DatasetFacts from a prepared dataset's DatasetInfo."""
    features = info.features
    metadata = info.metadata or {}
    if INGREDIENT_NAMES_KEY not in metadata:
        raise KeyError(
            f"{info.name} has no {INGREDIENT_NAMES_KEY!r} in its DatasetInfo.metadata "
            f"(keys: {sorted(metadata)})."
        )
    ingredient_names = tuple(str(n) for n in metadata[INGREDIENT_NAMES_KEY])
    num_ingredients = int(features["ingredients"].shape[-1])
    if len(ingredient_names) != num_ingredients:
        raise ValueError(
            f"{info.name}: {len(ingredient_names)} ingredient names for a multi-hot of "
            f"length {num_ingredients}."
        )
    image_shape = tuple(features["image"].shape)
    return DatasetFacts(
        name=info.name,
        builder_config=builder_config,
        num_classes=int(features["label"].num_classes),
        num_ingredients=num_ingredients,
        class_names=tuple(features["label"].names),
        ingredient_names=ingredient_names,
        split_sizes={k: int(v.num_examples) for k, v in info.splits.items()},
        image_shape=image_shape if all(isinstance(d, int) for d in image_shape) else None,
    )


def source(data_cfg: ml_collections.ConfigDict, split: str) -> Sequence[dict[str, Any]]:
    """Random-access source over `split` (any tfds split string) of a prepared dataset.

    Elements are dicts: 'image' encoded bytes (decoding skipped), 'label' int, 'ingredients'
    uint8 [V], 'image_path' bytes. Picklable, so grain worker processes can open it.
    """
    b = builder(data_cfg)
    if not is_prepared(b):
        raise FileNotFoundError(
            f"{data_cfg.name}/{data_cfg.builder_config} is not prepared in {b.data_dir}; "
            "call marnet_jax.data.datasets.prepare(data_cfg) first."
        )
    return b.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
