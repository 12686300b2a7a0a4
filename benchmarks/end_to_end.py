"""Input pipeline + train step together, as the trainer runs them: is the data or the model the limit?

  python -m benchmarks.end_to_end                     # configs/default.py on 1,024 synthetic images
  python -m benchmarks.end_to_end --preset full       # on the default config's dataset (builds it)
  python -m benchmarks.end_to_end --preset tiny       # seconds (tests)
  python -m benchmarks.end_to_end --preset paper      # paper scale, for a GPU host: ResNet-50 MARNet
                                                      # at 224 px in bf16 on 512x384 JPEGs, 8 and 16
                                                      # workers, crops decoded on the CPU (resized
                                                      # there or in the train step) and by DALI on
                                                      # the GPU [--workers 8,16] [--batch 256]
                                                      # [--decoders cpu,cpu_decode,dali]

For each data worker count (and, on synthetic_food, with the training split read from its records
and decoded once into memory: config.data.cache_decoded) three rates are measured, in images/s over
the same number of steps after warm-up:
  data:  the grain input pipeline alone (decode, crop, augmentation draws, batch), as trainer reads it;
  model: the jitted train step alone on one device-resident batch, steps dispatched back to back;
  both:  the trainer's loop: grain batches through loop.DevicePrefetcher (2 batches in flight on
         the device) into the train step, metrics checked asynchronously (loop.PendingMetrics).
The bottleneck is the slower of data and model; 'both / min' near 100% means they overlap. On a
machine whose cores are shared by the pipeline and the step (the CPU backend), both compete.
Each decoder (config.data.decoder: 'cpu'; 'cpu_decode', whose train step, and so model, includes
the resize; or 'dali' for DALI on the GPU, where data includes the GPU decode) is measured at each
worker count; a decoder that cannot run here gets a row that says why.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import pathlib
import tempfile
import time
from typing import Any

import jax
import tensorflow_datasets as tfds
from absl import flags

from benchmarks import _common, input_pipeline, train_step
from marnet_jax import cli, reporting
from marnet_jax.data import dali, datasets, decoders, pipeline, synthetic_food
from marnet_jax.data.config import train_image_size
from marnet_jax.train import loop, sharding


@dataclasses.dataclass(frozen=True)
class Preset:
    config: str  # module in configs/
    arg: str
    # synthetic_food builder config of a small train split (num_train examples); JPEG: num_train
    # photo-like 512x384 JPEGs cycled to Vireo-Food172's train length; None: the config's dataset.
    source: str | None
    num_train: int
    workers: tuple[int, ...]
    decoders: tuple[str, ...]  # config.data.decoder values
    warmup: int
    steps: int


JPEG = "jpeg"  # Preset.source: benchmarks.input_pipeline's photo-like JPEGs
PRESETS = {
    "tiny": Preset("tiny", "full", "tiny", 64, (0,), ("cpu",), 1, 3),
    "small": Preset("default", "full", "default", 1024, (0, 1, 2), ("cpu",), 3, 12),
    "full": Preset("default", "full", None, 0, (0, 1, 2), ("cpu",), 5, 30),
    "paper": Preset(
        "vireo_food172", "resnet50,full", JPEG, 256, (8, 16), ("cpu", "cpu_decode", "dali"), 5, 20
    ),
}


def small_source(base: str, num_train: int, data_dir: str):
    """A synthetic_food train split of `num_train` examples, built in `data_dir`."""
    cfg = synthetic_food.make_config(base, num_train=num_train, num_validation=32, num_test=32)
    builder = synthetic_food.SyntheticFood(config=cfg, data_dir=data_dir)
    if not datasets.is_prepared(builder):
        builder.download_and_prepare(file_format="array_record")
        builder = synthetic_food.SyntheticFood(config=cfg, data_dir=data_dir)
    return builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})


def _rate(images: int, seconds: float) -> float:
    return round(images / seconds, 1)


def dali_unavailable() -> str | None:
    """Why the 'dali' decoder cannot run here, or None."""
    try:
        dali.require_dali()
    except ImportError as e:
        return str(e)
    return dali.not_on_gpus(jax.local_devices())


def measure(config, src, p_train, state, mesh, preset: Preset) -> tuple[dict[str, Any], Any]:
    """Data-only, model-only and combined rates for `config.data.worker_count` and
    `config.data.decoder`; the new state."""
    b, decoder = config.train.batch_size, decoders.for_config(config.data)

    def iterator():
        batches = pipeline.train_iterator(
            config.data, batch_size=b, seed=0, shard_index=0, shard_count=1, data_source=src
        )
        return decoder.on_devices(batches, sharding.batch_sharding(mesh), config.data)

    it = iterator()
    for _ in range(preset.warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(preset.steps):
        next(it)
    data = _rate(b * preset.steps, time.perf_counter() - t0)

    host = next(it)
    batch = sharding.global_batch({k: host[k] for k in decoder.train_keys() if k in host}, mesh)
    for _ in range(preset.warmup):
        state, metrics = p_train(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(preset.steps):
        state, metrics = p_train(state, batch)
    jax.block_until_ready((state, metrics))
    model = _rate(b * preset.steps, time.perf_counter() - t0)
    if hasattr(it, "close"):
        it.close()

    batches = loop.DevicePrefetcher(iterator(), mesh, decoder.train_keys())
    pending = loop.PendingMetrics()
    for i in range(preset.warmup):
        state, metrics = p_train(state, next(batches))
        pending.add(i, metrics, None)
    pending.drain(None)
    t0 = time.perf_counter()
    for i in range(preset.steps):
        state, metrics = p_train(state, next(batches))
        pending.add(i, metrics, None)
    pending.drain(None)
    jax.block_until_ready(state)
    both = _rate(b * preset.steps, time.perf_counter() - t0)
    row = dict(
        decoder=config.data.decoder,
        decoded_once=bool(config.data.cache_decoded),
        status="measured",
        workers=config.data.worker_count,
        read_threads=config.data.read_threads,
        batch=b,
        image_size=train_image_size(config.data),
        data_images_per_s=data,
        model_images_per_s=model,
        both_images_per_s=both,
        bottleneck="data" if data < model else "model",
        both_over_min=round(both / min(data, model), 3),
    )
    return row, state


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def define(fv: flags.FlagValues) -> None:
        flags.DEFINE_string("data_dir", None, "tfds data_dir (default: a temp dir)", flag_values=fv)
        flags.DEFINE_integer("devices", -1, "devices to use (-1: all)", flag_values=fv)
        flags.DEFINE_string(
            "workers", None, "data worker counts (default: the preset's)", flag_values=fv
        )
        flags.DEFINE_integer("batch", None, "global batch (default: the config's)", flag_values=fv)
        flags.DEFINE_string(
            "decoders", None, "config.data.decoder values (default: the preset's)", flag_values=fv
        )

    args = _common.parse_args("end_to_end", __doc__, argv, PRESETS, "small", define)
    _common.setup_jax(args)
    preset = PRESETS[args.preset]
    config = importlib.import_module(f"configs.{preset.config}").get_config(preset.arg)
    config.mesh.num_devices = args.devices
    if args.batch:
        config.train.batch_size = args.batch
    workers = [int(w) for w in args.workers.split(",")] if args.workers else preset.workers
    names = args.decoders.split(",") if args.decoders else preset.decoders
    load_before = reporting.load_average()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or str(pathlib.Path(tmp) / "tfds")
        if preset.source is None:
            if args.data_dir:
                config.data.data_dir = args.data_dir
            facts = datasets.prepare(config.data)
            src = datasets.source(config.data, config.data.train_split)
        elif preset.source == JPEG:
            facts = datasets.shape_facts(config.data)
            src = input_pipeline.jpeg_source(preset.num_train, pathlib.Path(tmp) / "jpeg")
        else:
            facts = datasets.shape_facts(config.data)
            src = small_source(preset.source, preset.num_train, data_dir)
        t0 = time.perf_counter()
        p_train, state, mesh = train_step.setup_step(config, facts)
        host = _common.synthetic_train_batch(
            config.train.batch_size,
            train_image_size(config.data),
            facts.num_classes,
            facts.num_ingredients,
        )
        state, _ = p_train(state, sharding.global_batch(host, mesh))  # compiles
        jax.block_until_ready(state)
        print(f"set-up and compile: {time.perf_counter() - t0:.1f} s", flush=True)
        for decoder in names:
            config.data.decoder = decoder
            decoders.for_config(config.data)  # an unknown name fails here
            why_not = dali_unavailable() if decoder == "dali" else None
            caches = (False,) if preset.source == JPEG or decoder == "dali" else (False, True)
            for worker_count, cached in itertools.product(workers, caches):
                config.data.worker_count, config.data.cache_decoded = worker_count, cached
                if why_not:
                    rows.append(dict(decoder=decoder, status=f"not run: {why_not}"))
                    print(f"decoder={decoder}: not run: {why_not}", flush=True)
                    break
                row, state = measure(config, src, p_train, state, mesh, preset)
                rows.append(row)
                print(
                    f"decoder={decoder} workers={worker_count} decoded once={cached}: data "
                    f"{row['data_images_per_s']} "
                    f"model {row['model_images_per_s']} both {row['both_images_per_s']} images/s",
                    flush=True,
                )
    info = reporting.machine()
    info["load_average_before"] = load_before
    print(
        f"\nconfigs/{preset.config}.py:{preset.arg}, {args.preset} preset, batch "
        f"{config.train.batch_size}, on {reporting.machine_line(info, load=True)}"
    )
    headers = ["decoder", "decoded once", "workers", "read threads", "px", "data images/s"]
    headers += ["model images/s"]
    headers += ["both images/s", "bottleneck", "both / min"]
    measured = [r for r in rows if r["status"] == "measured"]
    print(
        reporting.markdown_table(
            headers,
            [
                [
                    r["decoder"],
                    "yes" if r["decoded_once"] else "no",
                    r["workers"],
                    r["read_threads"],
                    r["image_size"],
                    reporting.fmt(r["data_images_per_s"]),
                    reporting.fmt(r["model_images_per_s"]),
                    reporting.fmt(r["both_images_per_s"]),
                    r["bottleneck"],
                    f"{100 * r['both_over_min']:.0f}%",
                ]
                for r in measured
            ],
        )
    )
    for r in rows:
        if r["status"] != "measured":
            print(f"decoder {r['decoder']}: {r['status']}")
    out = dict(
        benchmark="end_to_end",
        preset=args.preset,
        config=f"configs/{preset.config}.py:{preset.arg}",
        machine=info,
        rows=rows,
    )
    return _common.save(args.json, out)


if __name__ == "__main__":
    cli.run(main)
