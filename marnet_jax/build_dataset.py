"""Builds a marnet_jax tfds dataset into a data_dir (`tfds build` needs TensorFlow; this does not).

    python -m marnet_jax.build_dataset --dataset vireo_food172 --manual_dir DIR --data_dir DIR
    python -m marnet_jax.build_dataset --dataset ingredient101 --config simplified --manual_dir DIR \\
        --data_dir DIR [--skip_bad_records] [--max_shorter_side N]
    python -m marnet_jax.build_dataset --dataset synthetic_food --config tiny --data_dir DIR

The builders are the project's (datasets.BUILDER_MODULES). Prints the split sizes when done; exits
with status 1 and the builder's message on bad input.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import tensorflow_datasets as tfds
from absl import flags

from marnet_jax import cli
from marnet_jax.data import datasets, manual_release

PROG = "marnet_jax.build_dataset"


def build(
    dataset: str,
    data_dir: str,
    *,
    config: str | None = None,
    manual_dir: str | None = None,
    skip_bad_records: bool = False,
    max_shorter_side: int | None = None,
    overwrite: bool = False,
) -> tfds.core.DatasetBuilder:
    """Builds (or reuses) `dataset` in data_dir and returns its builder."""
    cls = datasets.builder_class(dataset)
    kwargs = {}
    if issubclass(cls, manual_release.ManualReleaseBuilder):
        kwargs["skip_bad_records"] = skip_bad_records
        kwargs["max_shorter_side"] = max_shorter_side
    elif skip_bad_records or max_shorter_side is not None:
        raise ValueError(
            f"{dataset} does not read a manual release: --skip_bad_records and "
            "--max_shorter_side do not apply"
        )
    builder = cls(data_dir=data_dir, config=config, **kwargs)
    mode = (
        tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if overwrite
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode),
        file_format="array_record",
    )
    return builder


def summary(builder: tfds.core.DatasetBuilder) -> str:
    """Split sizes, class and ingredient counts, and skipped records of a prepared builder."""
    info = builder.info
    lines = [f"{info.full_name} in {builder.data_path}"]
    for name, split in info.splits.items():
        lines.append(f"  {name:<10} {split.num_examples:>8} examples")
    features = info.features
    lines.append(
        f"  classes {features['label'].num_classes}, ingredients {features['ingredients'].shape[0]}"
    )
    metadata = info.metadata or {}
    if metadata.get("max_shorter_side") is not None:
        lines.append(
            f"  images shrunk to a shorter side of at most {metadata['max_shorter_side']} px"
        )
    if "skipped_records" in metadata.keys():
        skipped = metadata["skipped_records"]
        if any(skipped.values()) or metadata["num_problems"]:
            lines.append(f"  skipped records {skipped}; {metadata['num_problems']} problem(s):")
            lines.extend(f"    {p}" for p in metadata["problems"][:10])
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    available = sorted(datasets.BUILDER_MODULES)

    def define(fv: flags.FlagValues) -> None:
        flags.DEFINE_enum("dataset", None, available, "the dataset to build", flag_values=fv)
        flags.DEFINE_string("data_dir", None, "tfds data_dir to write into", flag_values=fv)
        flags.mark_flags_as_required(["dataset", "data_dir"], flag_values=fv)
        flags.DEFINE_string(
            "config", None, "builder config (default: the builder's)", flag_values=fv
        )
        flags.DEFINE_string(
            "manual_dir", None, "folder holding the extracted release", flag_values=fv
        )
        flags.DEFINE_boolean(
            "skip_bad_records",
            False,
            "leave bad records out (counted in the metadata) instead of stopping",
            flag_values=fv,
        )
        flags.DEFINE_integer(
            "max_shorter_side",
            None,
            "store images whose shorter side is larger shrunk to this many pixels (JPEG); "
            "default: the bytes as shipped",
            lower_bound=1,
            flag_values=fv,
        )
        flags.DEFINE_boolean("overwrite", False, "rebuild an existing dataset", flag_values=fv)

    args, rest = cli.parse_flags(PROG, define, argv, doc=__doc__)
    if rest:
        cli.usage_error(PROG, f"unexpected arguments {rest}")
    try:
        builder = build(
            args.dataset,
            args.data_dir,
            config=args.config,
            manual_dir=args.manual_dir,
            skip_bad_records=args.skip_bad_records,
            max_shorter_side=args.max_shorter_side,
            overwrite=args.overwrite,
        )
    except (
        manual_release.ReleaseLayoutError,
        manual_release.ReleaseFormatError,
        manual_release.BadRecordsError,
        manual_release.BuiltSizeError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(builder))
    return 0


if __name__ == "__main__":
    cli.run(main)
