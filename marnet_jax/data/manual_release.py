"""Shared machinery of the tfds builders that read a dataset release from a manual_dir.

`vireo_food172` and `ingredient101` both read an archive that the user downloaded and extracted by
hand. This module holds what they share:

- `ManualReleaseBuilder`: a `tfds.core.GeneratorBasedBuilder` base whose features (class names,
  ingredient vocabulary size) come from the release itself. The release is read and validated in
  full (annotation files, every image decoded) in `download_and_prepare` *before* tfds writes
  anything, and `_info()` is rebuilt from it. A prepared dataset restores its features from its own
  `metadata.json`.
- The bad-input policy. Structural faults (missing manual_dir, missing folder or file, a name list
  with a hole, two line-aligned files of different lengths) always stop the build with
  `ReleaseLayoutError` / `ReleaseFormatError`. Record-level faults (a split line whose image is
  missing or not a decodable image, an annotation row of the wrong length, with a bad value or an
  unknown key, a label that disagrees with the image path, a duplicate) are collected as `Problem`s
  (`file:line: message`). With `skip_bad_records=False` (default) the build stops with
  `BadRecordsError` listing the first problems; with `skip_bad_records=True` the affected records
  are left out and the dataset metadata keeps the per-split skip counts and the first problems. No
  record is ever written with a guessed value.
- tfds writes into `<name>/incomplete.*` and renames it to `<version>` only on success
  (tfds.core.utils.incomplete_dir), so a build that fails late leaves no loadable dataset either;
  validating up front means a bad release fails before any file is written.

Image bytes are stored exactly as shipped: `tfds.features.Image.encode_example` passes `bytes`
through without decoding or re-encoding (tests compare the stored bytes with the files). The one
exception is opt-in: `max_shorter_side=N` stores every image whose shorter side exceeds N pixels
shrunk to N (aspect kept, Lanczos, JPEG quality `SHRUNK_JPEG_QUALITY`), for a smaller dataset that
decodes faster; the metadata records N, and a builder asked for another N refuses the prepared
dataset rather than load images of a size it was not asked for.
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageFile

SPLITS = ("train", "validation", "test")
SHRUNK_JPEG_QUALITY = 95  # JPEG quality of images shrunk at build time (max_shorter_side)
# How many problems an error message lists, and how many the dataset metadata keeps.
MAX_PROBLEMS_IN_ERROR = 20
MAX_PROBLEMS_IN_METADATA = 100


class ReleaseLayoutError(FileNotFoundError):
    """The manual_dir, or a folder or file the release must contain, is missing."""


class BuiltSizeError(ValueError):
    """A prepared dataset was built with another max_shorter_side than the one asked for."""


class ReleaseFormatError(ValueError):
    """An annotation file is malformed in a way that no single record can be blamed for."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One bad input found while reading a release: where (file, 1-based line) and what."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"


class BadRecordsError(ValueError):
    """Raised when a release holds bad records and skip_bad_records is off."""

    def __init__(self, dataset: str, problems: Sequence[Problem]):
        self.problems = list(problems)
        shown = "\n".join(f"  {p}" for p in self.problems[:MAX_PROBLEMS_IN_ERROR])
        more = len(self.problems) - MAX_PROBLEMS_IN_ERROR
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{dataset}: found {len(self.problems)} bad input record(s); nothing was written.\n"
            f"{shown}{tail}\n"
            "Fix the files, or build with skip_bad_records=True (--skip_bad_records) to leave "
            "these records out (the skip counts and problems are then kept in the metadata)."
        )


@dataclasses.dataclass(frozen=True)
class Record:
    """One example to write: image file, path relative to the image root, label, multi-hot."""

    image_file: epath.Path
    image_path: str
    label: int
    ingredients: np.ndarray  # uint8 [V] multi-hot
    list_file: str  # the split list the record comes from, and its 1-based line (for messages)
    line: int


class ProblemLog:
    """Collects problems while a release is read, and how many records of each split they remove."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.skipped: collections.Counter[str] = collections.Counter()

    def drop(self, split: str, file: str | os.PathLike, line: int | None, message: str) -> None:
        """A record of `split` is bad and is left out."""
        self.problems.append(Problem(os.fspath(file), line, message))
        self.skipped[split] += 1

    def note(self, file: str | os.PathLike, line: int | None, message: str) -> None:
        """An annotation row is bad but no split record depends on it (e.g. an unknown key)."""
        self.problems.append(Problem(os.fspath(file), line, message))


@dataclasses.dataclass
class Release:
    """What a builder read from a release: names and the valid records of every split."""

    class_names: list[str]
    ingredient_names: list[str]
    records: dict[str, list[Record]]
    log: ProblemLog
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Reading files.


def read_lines(path: epath.Path) -> list[str]:
    """Lines of a text file (UTF-8 with or without BOM, else GB18030), trailing blank lines dropped.

    Line i of the result is line i+1 of the file, so callers can report 1-based line numbers.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = data.decode("gb18030")
        except UnicodeDecodeError as e:
            raise ReleaseFormatError(f"{path}: not UTF-8 or GB18030 text ({e})") from e
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def read_names(
    path: epath.Path, what: str, clean: Callable[[str], str] = str.strip, unique: bool = True
) -> list[str]:
    """A list where line i names item i: every line must hold a name (a hole shifts the rest)."""
    names = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(read_lines(path), start=1):
        name = clean(raw)
        if not name:
            raise ReleaseFormatError(
                f"{path}:{lineno}: empty {what} name (line i names {what} i, so a blank line would "
                "shift every later one)"
            )
        if unique and name in first_line:
            raise ReleaseFormatError(
                f"{path}:{lineno}: {what} name {name!r} repeats line {first_line[name]}"
            )
        first_line.setdefault(name, lineno)
        names.append(name)
    if not names:
        raise ReleaseFormatError(f"{path}: no {what} names")
    return names


def locate_release(
    manual_dir: epath.Path,
    required: Mapping[str, Sequence[str]],
    dataset: str,
    extra_folder_example: str,
) -> tuple[epath.Path, dict[str, epath.Path]]:
    """Finds the release's folders in manual_dir, or one level deeper under a single extra folder.

    Args:
      manual_dir: the folder the user extracted the archives into.
      required: for each needed folder, its accepted relative paths (first existing one wins), e.g.
        {'annotations': ['Ingredients101/Annotations', 'Ingredients101/annotations']}.
      dataset: dataset name, for messages.
      extra_folder_example: an example extra top-level folder name, for messages.

    Returns:
      (root, {key: folder}).
    """
    manual_dir = epath.Path(manual_dir)
    if not manual_dir.is_dir():
        raise ReleaseLayoutError(
            f"{dataset}: manual_dir {manual_dir} does not exist or is not a folder. Extract the "
            f"release there (see the builder's MANUAL_DOWNLOAD_INSTRUCTIONS), expected: "
            + ", ".join(f"{manual_dir / alts[0]}/" for alts in required.values())
        )

    def resolve(root: epath.Path) -> dict[str, epath.Path]:
        found = {}
        for key, alternatives in required.items():
            for rel in alternatives:
                if (root / rel).is_dir():
                    found[key] = root / rel
                    break
        return found

    candidates = [manual_dir, *sorted(d for d in manual_dir.iterdir() if d.is_dir())]
    resolved = [(root, resolve(root)) for root in candidates]
    complete = [(root, found) for root, found in resolved if len(found) == len(required)]
    if len(complete) == 1:
        return complete[0]
    if len(complete) > 1:
        raise ReleaseLayoutError(
            f"{dataset}: found the release in more than one place under {manual_dir}: "
            + ", ".join(os.fspath(root) for root, _ in complete)
            + ". Keep one."
        )
    best_root, best = max(resolved, key=lambda rf: len(rf[1]))  # first (manual_dir) wins ties
    missing = [
        " or ".join(f"{best_root / rel}/" for rel in alts)
        for key, alts in required.items()
        if key not in best
    ]
    raise ReleaseLayoutError(
        f"{dataset}: missing in manual_dir {manual_dir}: expected folder "
        + "; ".join(missing)
        + f" (the release may also sit one level deeper, e.g. {manual_dir / extra_folder_example}/"
        "...). See the builder's MANUAL_DOWNLOAD_INSTRUCTIONS."
    )


def require_files(folder: epath.Path, names: Sequence[str], dataset: str) -> dict[str, epath.Path]:
    """Full paths of files that must exist in folder; one error lists every missing one."""
    paths = {name: folder / name for name in names}
    missing = [os.fspath(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ReleaseLayoutError(
            f"{dataset}: missing required file(s): {', '.join(missing)}. See the builder's "
            "MANUAL_DOWNLOAD_INSTRUCTIONS."
        )
    return paths


# ----------------------------------------------------------------------------------------------
# Checking images.


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """PIL's LOAD_TRUNCATED_IMAGES off while checking (a truncated JPEG must be reported)."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def inspect_image(path: epath.Path) -> tuple[str | None, str]:
    """Decodes an image file (JPEGs at 1/8 scale: every entropy-coded byte is still read).

    Returns (error or None, 'FORMAT/MODE').
    """
    try:
        with Image.open(os.fspath(path)) as im:
            kind = f"{im.format}/{im.mode}"
            if im.format == "JPEG":
                im.draft(None, (1, 1))
            im.load()
    except FileNotFoundError:
        return f"image not found: {path}", ""
    except Exception as e:
        return f"unreadable image {path} ({type(e).__name__}: {e})", ""
    return None, kind


def check_images(records: dict[str, list[Record]], log: ProblemLog) -> tuple[dict, dict[str, int]]:
    """Decodes every record's image (threads); bad ones are logged and removed.

    Returns (records without bad images, {'FORMAT/MODE': count}).
    """
    flat = [(split, r) for split, rs in records.items() for r in rs]
    workers = min(16, (os.cpu_count() or 2) * 2)
    with _strict_truncation(), concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda sr: inspect_image(sr[1].image_file), flat, chunksize=64))
    kinds: collections.Counter[str] = collections.Counter()
    kept: dict[str, list[Record]] = {split: [] for split in records}
    for (split, record), (error, kind) in zip(flat, results, strict=True):
        if error is None:
            kinds[kind] += 1
            kept[split].append(record)
        else:
            log.drop(split, record.list_file, record.line, error)
    return kept, dict(sorted(kinds.items()))


def shrink_image(data: bytes, max_shorter_side: int) -> bytes:
    """Encoded image `data` with its shorter side brought down to `max_shorter_side` pixels (aspect
    kept, Lanczos from a DCT-scaled JPEG decode no smaller than the target), re-encoded as RGB JPEG;
    `data` itself when the shorter side is already that small."""
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        if min(width, height) <= max_shorter_side:
            return data
        scale = max_shorter_side / min(width, height)
        if width <= height:
            size = (max_shorter_side, round(height * scale))
        else:
            size = (round(width * scale), max_shorter_side)
        img.draft("RGB", size)  # JPEG: decode at the coarsest DCT scale still >= size
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        out = io.BytesIO()
        rgb.resize(size, Image.Resampling.LANCZOS).save(
            out, format="JPEG", quality=SHRUNK_JPEG_QUALITY
        )
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# The builder base.


class ManualReleaseBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """GeneratorBasedBuilder reading a manually downloaded release; see the module docstring.

    Subclasses implement `_read_annotations(manual_dir) -> Release` (everything but the image
    check) and set DESCRIPTION, HOMEPAGE, CITATION, MANUAL_DOWNLOAD_INSTRUCTIONS, VERSION.

    Constructor: `Builder(data_dir=..., config=..., skip_bad_records=False,
    max_shorter_side=None)`; `tfds.builder(name, skip_bad_records=True, ...)` forwards the options.
    A prepared dataset built with another `max_shorter_side` raises BuiltSizeError.
    """

    DESCRIPTION: ClassVar[str] = ""
    HOMEPAGE: ClassVar[str] = ""
    CITATION: ClassVar[str] = ""

    def __init__(
        self,
        *,
        skip_bad_records: bool = False,
        max_shorter_side: int | None = None,
        **kwargs: Any,
    ):
        if max_shorter_side is not None and int(max_shorter_side) < 1:
            raise ValueError(
                f"max_shorter_side must be a positive int or None, not {max_shorter_side!r}"
            )
        self._skip_bad_records = bool(skip_bad_records)
        self._max_shorter_side = None if max_shorter_side is None else int(max_shorter_side)
        self._release: Release | None = None
        super().__init__(**kwargs)
        # Kept when pickled (grain workers reopen the builder).
        self._original_state["skip_bad_records"] = self._skip_bad_records
        self._original_state["max_shorter_side"] = self._max_shorter_side
        if kwargs.get("file_format") is None and not self.data_path.exists():
            self.info.set_file_format("array_record", override=True)  # random access by default

    @property
    def info(self) -> tfds.core.DatasetInfo:
        """DatasetInfo, cached per builder and rebuilt once the release has been read."""
        info = self.__dict__.get("_cached_info")
        if info is None:
            info = self._info()
            self.__dict__["_cached_info"] = info
        return info

    @property
    def skip_bad_records(self) -> bool:
        return self._skip_bad_records

    def _check_built_size(self) -> None:
        """Raises if the prepared dataset was built with another max_shorter_side than asked."""
        saved = self._saved_metadata()
        if saved is not None and saved.get("max_shorter_side") != self._max_shorter_side:
            raise BuiltSizeError(
                f"{self.data_path} was built with max_shorter_side="
                f"{saved.get('max_shorter_side')}, not {self._max_shorter_side} as asked "
                "(data.max_shorter_side): ask for what was built, rebuild it (build --overwrite), "
                "or build into another data_dir."
            )

    def as_data_source(self, *args: Any, **kwargs: Any) -> Any:
        """tfds' data source, once the prepared images are checked to be of the size asked for."""
        self._check_built_size()
        return super().as_data_source(*args, **kwargs)

    @abc.abstractmethod
    def _read_annotations(self, manual_dir: epath.Path) -> Release:
        """Reads and validates the release's annotation files (not the images)."""

    def read_release(self, manual_dir: epath.PathLike) -> Release:
        """Reads and validates the whole release, images included; raises on bad input."""
        release = self._read_annotations(epath.Path(manual_dir))
        release.records, image_kinds = check_images(release.records, release.log)
        release.metadata["image_formats"] = image_kinds
        problems = release.log.problems
        if problems and not self._skip_bad_records:
            raise BadRecordsError(self.name, problems)
        empty = [split for split, rs in release.records.items() if not rs]
        if empty:
            raise BadRecordsError(
                self.name,
                [
                    Problem(os.fspath(manual_dir), None, f"split {s!r} has no valid record")
                    for s in empty
                ]
                + problems,
            )
        return release

    def download_and_prepare(
        self,
        *,
        download_dir: epath.PathLike | None = None,
        download_config: tfds.download.DownloadConfig | None = None,
        file_format: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Reads and validates the release from the manual_dir, then lets tfds write the dataset.

        Writes ArrayRecord unless another file_format is asked for.
        """
        download_config = download_config or tfds.download.DownloadConfig()
        mode = download_config.download_mode
        will_generate = mode != tfds.download.GenerateMode.UPDATE_DATASET_INFO and (
            not self.data_path.exists() or mode.overwrite_dataset
        )
        if will_generate:
            manual_dir = download_config.manual_dir or (
                epath.Path(download_dir or self.data_dir_root / "downloads") / "manual"
            )
            self._release = self.read_release(manual_dir)
            previous = self.info
            self.__dict__.pop("_cached_info", None)  # features now come from the release
            self.info.set_file_format(previous.file_format)
            file_format = file_format or "array_record"
        else:
            self._check_built_size()
        super().download_and_prepare(
            download_dir=download_dir,
            download_config=download_config,
            file_format=file_format,
            **kwargs,
        )

    def _saved_metadata(self) -> dict[str, Any] | None:
        path = self.data_path / "metadata.json"
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def _release_metadata(self, release: Release) -> dict[str, Any]:
        log = release.log
        return {
            "class_names": release.class_names,
            "ingredient_names": release.ingredient_names,
            **release.metadata,
            "skip_bad_records": self._skip_bad_records,
            "max_shorter_side": self._max_shorter_side,
            "skipped_records": {split: int(log.skipped.get(split, 0)) for split in release.records},
            "num_problems": len(log.problems),
            "problems": [str(p) for p in log.problems[:MAX_PROBLEMS_IN_METADATA]],
        }

    def _info(self) -> tfds.core.DatasetInfo:
        if self._release is not None:
            metadata = self._release_metadata(self._release)
        else:
            metadata = self._saved_metadata()  # prepared dataset: what was written
        if metadata is not None:
            label = tfds.features.ClassLabel(names=metadata["class_names"])
            shape = (len(metadata["ingredient_names"]),)
        else:  # neither prepared nor read yet: names are unknown until download_and_prepare
            label = tfds.features.ClassLabel()
            shape = (None,)
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "label": label,
                    "ingredients": tfds.features.Tensor(shape=shape, dtype=np.uint8),
                    "image_path": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            metadata=tfds.core.MetadataDict(metadata or {}),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # the release was read (and validated) in download_and_prepare
        if self._release is None:
            raise RuntimeError(f"{self.name}: call download_and_prepare() to build this dataset")
        return {
            split: self._generate_examples(records)
            for split, records in self._release.records.items()
        }

    def _generate_examples(self, records: Sequence[Record]):
        for r in records:
            image = r.image_file.read_bytes()  # as shipped: tfds stores bytes unchanged
            if self._max_shorter_side is not None:
                image = shrink_image(image, self._max_shorter_side)
            yield (
                r.image_path,
                {
                    "image": image,
                    "label": r.label,
                    "ingredients": r.ingredients,
                    "image_path": r.image_path,
                },
            )
