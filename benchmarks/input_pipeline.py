"""Input pipeline throughput on the host (decode + crop + augmentation draws + batch); prints a table.

  python -m benchmarks.input_pipeline                  # small preset: a few minutes on 2 cores
  python -m benchmarks.input_pipeline --preset full --json /tmp/input_pipeline.json

Cases:
  synthetic_64px_png  synthetic_food 'default' geometry (64 px PNG, 48 ingredients) read from a
                      freshly built tfds ArrayRecord dataset (small: 1,024 train examples; full: the
                      'default' config itself, built into --data_dir if needed); read from the
                      records, and decoded once into memory (data.cache_decoded, its default):
                      the first batch then includes decoding the whole split.
  jpeg_224px          512x384 photo-like JPEGs (written to a temp dir, read back into an in-memory
                      source as long as Vireo-Food172's train split, which cycles through them: the
                      shuffle's cost per element depends on the split's length) through
                      random-resized-crop to 224 px and the flip and colour-jitter draws.
  jpeg_1024px_224px   the same at 1024x768 (real food photos come that large and larger).
  jpeg_1024px_shrunk  those 1024x768 JPEGs as a dataset built with max_shorter_side=SHRINK_TO
                      stores them (manual_release.shrink_image).
Each case runs its train pipeline (decode + random-resized-crop to uint8, the flip and colour-jitter
draws; the flip, jitter and normalisation run in the train step) with worker_count 0, 1, 2 (and
read_threads 0 and the config default at 0 workers), once per host decoder (--decoders: 'cpu'
resizes the crop on the host, 'cpu_decode' ships the decoded box for the train step to resize),
and its eval pipeline (decode, resize + centre crop to uint8; the eval step normalises) at 0
workers.
Images/s is wall-clock over --batches batches after --warmup batches (worker start-up excluded; it
is reported as the time to the first batch). On a shared machine wall-clock rates depend on the
load; images/CPU-s (main process, 0 workers) is the load-independent single-core cost.
"""

from __future__ import annotations

import io
import itertools
import os
import pathlib
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from benchmarks import _common
from marnet_jax import cli, reporting
from marnet_jax.data import config as data_config
from marnet_jax.data import datasets, manual_release, pipeline, synthetic_food

PRESETS = {
    # num synthetic train examples, JPEG files, batch size, warm-up batches, timed batches
    "small": dict(synthetic_train=1024, jpegs=256, batch=32, warmup=3, batches=12),
    "full": dict(synthetic_train=None, jpegs=1024, batch=64, warmup=5, batches=40),
}


def photo_like_jpeg(rng: np.random.Generator, width: int = 512, height: int = 384) -> bytes:
    """A JPEG with smooth colour regions, edges and mild noise (sizes like real food photos)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for _ in range(6):  # Blobs of colour.
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(40, 160)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        image += blob * rng.uniform(0, 255, 3)
    image = image / max(float(image.max()), 1.0) * 220 + 20
    image += rng.normal(0, 6, image.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


SHRINK_TO = 320  # the jpeg_1024px_shrunk case's max_shorter_side
SPLIT_LENGTH = 66_071  # Vireo-Food172's train split: the JPEG sources' length


class Cycled(Sequence):
    """`records` repeated to `length` elements (random access, as a data source)."""

    def __init__(self, records: Sequence[dict], length: int):
        self.records, self.length = records, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.records[index % len(self.records)]


def jpeg_source(
    n: int,
    directory: pathlib.Path,
    size: tuple[int, int] = (512, 384),
    max_shorter_side: int | None = None,
) -> Cycled:
    """Writes n JPEG files of `size` (width, height) and returns records like the real datasets'
    (bytes read from disk; shrunk as a build with `max_shorter_side` stores them), cycled to the
    length of Vireo-Food172's train split."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        path = directory / f"{i:05d}.jpg"
        data = photo_like_jpeg(rng, *size)
        if max_shorter_side is not None:
            data = manual_release.shrink_image(data, max_shorter_side)
        path.write_bytes(data)
        ingredients = np.zeros(353, np.uint8)
        ingredients[rng.choice(353, 3, replace=False)] = 1
        records.append(
            {
                "image": path.read_bytes(),
                "label": i % 172,
                "ingredients": ingredients,
                "image_path": str(path).encode(),
            }
        )
    return Cycled(records, SPLIT_LENGTH)


def synthetic_source(num_train: int | None, data_dir: str):
    """The synthetic train split as the pipeline reads it (tfds ArrayRecord data source)."""
    if num_train is None:
        cfg = data_config.get_data_config("synthetic_food")
        cfg.data_dir = data_dir
        datasets.prepare(cfg)
        return datasets.source(cfg, "train")
    config = synthetic_food.make_config(
        "default", num_train=num_train, num_validation=32, num_test=32
    )
    builder = synthetic_food.SyntheticFood(config=config, data_dir=data_dir)
    if not datasets.is_prepared(builder):
        builder.download_and_prepare(file_format="array_record")
        builder = synthetic_food.SyntheticFood(config=config, data_dir=data_dir)
    return builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})


def _batches(cfg, src, batch: int, pipeline_kind: str):
    """The train stream, or eval passes over `src` one after the other."""
    if pipeline_kind == "train":
        return pipeline.train_iterator(
            cfg, batch_size=batch, seed=0, shard_index=0, shard_count=1, data_source=src
        )

    def passes():
        while True:
            yield from pipeline.eval_batches(
                cfg, batch_size=batch, shard_index=0, shard_count=1, data_source=src
            )

    return passes()


def measure(
    cfg, src, *, batch: int, warmup: int, batches: int, pipeline_kind: str = "train"
) -> tuple[float, float, float]:
    """(images per wall second, images per CPU second of this process, seconds to first batch).

    The CPU-second rate counts this process's threads only, so it is the per-core cost when
    worker_count is 0 (and not meaningful with worker processes).
    """
    t0 = time.perf_counter()
    it = _batches(cfg, src, batch, pipeline_kind)
    next(it)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        next(it)
    t1, c1 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - t1)
    cpu_rate = batches * batch / (time.process_time() - c1)
    if hasattr(it, "close"):
        it.close()
    return rate, cpu_rate, first


def main(argv: list[str] | None = None) -> None:
    def define(fv: flags.FlagValues) -> None:
        flags.DEFINE_string("workers", "0,1,2", "comma-separated worker counts", flag_values=fv)
        flags.DEFINE_string("data_dir", None, "tfds data_dir (default: a temp dir)", flag_values=fv)
        flags.DEFINE_string(
            "decoders", "cpu,cpu_decode", "config.data.decoder values (host ones)", flag_values=fv
        )

    args = _common.parse_args("input_pipeline", __doc__, argv, PRESETS, "small", define)
    preset = PRESETS[args.preset]
    workers = [int(w) for w in args.workers.split(",")]
    decoders = args.decoders.split(",")
    if not set(decoders) <= {"cpu", "cpu_decode"}:
        raise ValueError(
            f"--decoders takes 'cpu' and 'cpu_decode' (host decoders), got {decoders}."
        )

    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        data_dir = args.data_dir or str(tmp / "tfds")
        if preset["synthetic_train"] is None and args.data_dir is None:
            data_dir = os.path.expanduser(data_config.get_data_config().data_dir)
        cases = [
            (
                "synthetic_64px_png",
                "synthetic_food",
                synthetic_source(preset["synthetic_train"], data_dir),
            ),
            ("jpeg_224px", "vireo_food172", jpeg_source(preset["jpegs"], tmp / "jpeg")),
            (
                "jpeg_1024px_224px",
                "vireo_food172",
                jpeg_source(preset["jpegs"], tmp / "jpeg1024", (1024, 768)),
            ),
            (
                "jpeg_1024px_shrunk",
                "vireo_food172",
                jpeg_source(preset["jpegs"], tmp / "jpeg1024s", (1024, 768), SHRINK_TO),
            ),
        ]
        runs = [("train", d) for d in decoders] + [("eval", "cpu")]
        for (case, dataset, src), (kind, decoder) in itertools.product(cases, runs):
            default_threads = data_config.get_data_config(dataset).read_threads
            settings = [(0, 0)] + [(w, default_threads) for w in workers if kind == "train"]
            caches = (False, True) if kind == "train" and dataset == "synthetic_food" else (False,)
            for (worker_count, threads), cached in itertools.product(settings, caches):
                cfg = data_config.get_data_config(dataset)
                cfg.worker_count, cfg.read_threads = worker_count, threads
                cfg.decoder, cfg.cache_decoded = decoder, cached
                rate, cpu_rate, first = measure(
                    cfg,
                    src,
                    batch=preset["batch"],
                    warmup=preset["warmup"],
                    batches=preset["batches"],
                    pipeline_kind=kind,
                )
                row = dict(
                    case=case,
                    pipeline=kind,
                    decoder=decoder,
                    decoded_once=cached,
                    image_size=cfg.image_size,
                    workers=worker_count,
                    read_threads=threads,
                    batch=preset["batch"],
                    images_per_s=round(rate, 1),
                    images_per_cpu_s=round(cpu_rate, 1) if worker_count == 0 else None,
                    first_batch_s=round(first, 2),
                )
                rows.append(row)
                print(
                    f"{case:20s} {kind:5s} {decoder:10s} {cfg.image_size:4d}px  workers={worker_count}  "
                    f"threads={threads}  decoded once={cached!s:5s}  {rate:8.1f} img/s  "
                    f"first batch {first:5.2f} s",
                    flush=True,
                )

    info = reporting.machine()
    print(
        f"\n{args.preset} preset, batch {preset['batch']}, on {reporting.machine_line(info)}; "
        f"1-min load average {load_before:.1f} before the run (other processes share the CPUs)"
    )
    table = [
        [
            r["case"],
            r["pipeline"],
            r["decoder"],
            "yes" if r["decoded_once"] else "no",
            r["image_size"],
            r["workers"],
            r["read_threads"],
            reporting.fmt(r["images_per_s"], 0),
            reporting.fmt(r["images_per_cpu_s"], 0),
            reporting.fmt(r["first_batch_s"], 2),
        ]
        for r in rows
    ]
    headers = ["case", "pipeline", "decoder", "decoded once", "px", "workers", "read threads"]
    headers += ["images/s"]
    headers += ["images/CPU-s", "first batch (s)"]
    print(reporting.markdown_table(headers, table))
    out = dict(preset=args.preset, machine=info, load_average_before=load_before, rows=rows)
    _common.save(args.json, out)


if __name__ == "__main__":
    cli.run(main)
