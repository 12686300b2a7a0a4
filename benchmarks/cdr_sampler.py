"""CDR reverse sampling (image-only x_CDR): latency and throughput versus sampler, steps and batch.

  python -m benchmarks.cdr_sampler                    # CPU: the default config's denoiser
  python -m benchmarks.cdr_sampler --preset gpu       # the ResNet-50 paper-scale config, bf16
  python -m benchmarks.cdr_sampler --preset tiny      # seconds (tests)

The CDR module is the one the config builds (marnet_jax.models.build_model), with a T = 1000 step
noise schedule so that DDPM runs the full 1000-step ancestral chain; DDIM runs 10 or 50 of those
steps. Each call is one jitted `CDR.sample` (the whole chain is one lax.scan in one compiled
program) on random conditions [batch, D]. Reported: compile seconds, latency (median and
interquartile range of waited-for calls after warm-up), samples/s, and the denoiser FLOPs per call
(XLA's cost analysis of one denoiser pass times the passes in the chain).

The second table is what CDR adds to image-only prediction: `MARNet.predict` of the full model
(backbone, g_v, reverse chain, heads) against the same config without CDR ('ema' variant: backbone,
g_v, heads), as it runs in evaluation (the config's own T and sampler).
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from benchmarks import _common
from marnet_jax import cli, reporting
from marnet_jax.data import datasets
from marnet_jax.models import build_model
from marnet_jax.models.diffusion import CDR
from marnet_jax.models.marnet import MARNet


@dataclasses.dataclass(frozen=True)
class Preset:
    config: str  # module in configs/
    arg: str  # config arg, '{variant}' is replaced by the variant
    dtype: str
    chains: tuple[tuple[str, int, int], ...]  # (sampler, steps, batch)
    predict_batch: int
    warmup: int
    iters: int
    gpu_only: bool = False


PRESETS = {
    "tiny": Preset("tiny", "{variant}", "float32", (("ddim", 10, 8), ("ddpm", 1000, 8)), 8, 1, 2),
    "small": Preset(
        "default",
        "{variant}",
        "float32",
        (
            ("ddpm", 1000, 1),
            ("ddpm", 1000, 16),
            ("ddim", 50, 1),
            ("ddim", 50, 64),
            ("ddim", 50, 256),
            ("ddim", 10, 1),
            ("ddim", 10, 64),
            ("ddim", 10, 256),
            ("ddim", 10, 1024),
        ),
        64,
        2,
        5,
    ),
    "gpu": Preset(
        "vireo_food172",
        "resnet50,{variant}",
        "bfloat16",
        (
            ("ddpm", 1000, 1),
            ("ddpm", 1000, 256),
            ("ddim", 50, 1),
            ("ddim", 50, 256),
            ("ddim", 50, 1024),
            ("ddim", 10, 1),
            ("ddim", 10, 256),
            ("ddim", 10, 1024),
            ("ddim", 10, 4096),
        ),
        256,
        5,
        20,
        gpu_only=True,
    ),
}


CHAIN_HEADERS = ["sampler", "denoiser passes", "batch", "compile s", "latency ms (median)"]
CHAIN_HEADERS += ["IQR ms", "samples/s", "GFLOP/call"]
PREDICT_HEADERS = ["model", "backbone", "px", "batch", "chain", "ms (median)", "images/s"]
PREDICT_HEADERS += ["CDR adds"]


def _config(preset: Preset, variant: str = "full") -> ml_collections.ConfigDict:
    module = importlib.import_module(f"configs.{preset.config}")
    config = module.get_config(preset.arg.format(variant=variant))
    config.model.dtype = preset.dtype
    config.data.dtype = preset.dtype
    return config


def _cdr(config: ml_collections.ConfigDict, sampler: str, steps: int) -> tuple[CDR, int]:
    """The config's CDR module with a 1000-step schedule and the given sampler; condition size."""
    config.model.cdr.num_steps = 1000
    config.model.cdr.sampler = sampler
    config.model.cdr.sample_steps = steps
    facts = datasets.shape_facts(config.data)
    model = build_model(config.model, facts.num_classes, facts.num_ingredients)
    on_x_v = config.model.cdr_wiring.condition_on == "x_v"
    return model.cdr, model.backbone.feature_dim if on_x_v else config.model.embed_dim


def chain_row(preset: Preset, sampler: str, steps: int, batch: int) -> dict[str, Any]:
    config = _config(preset)
    cdr, cond_dim = _cdr(config, sampler, steps)
    cond = jax.random.normal(jax.random.key(0), (batch, cond_dim), jnp.float32)
    keys = {"params": jax.random.key(1), "diffusion": jax.random.key(2)}
    variables = jax.jit(lambda c: cdr.init(keys, c, method=CDR.sample))(cond)

    sample = jax.jit(lambda v, c, k: cdr.apply(v, c, method=CDR.sample, rngs={"diffusion": k}))
    key = jax.random.key(3)
    t0 = time.perf_counter()
    compiled = sample.lower(variables, cond, key).compile()
    compile_s = time.perf_counter() - t0
    timing = _common.time_calls(
        lambda: compiled(variables, cond, key).block_until_ready(), preset.warmup, preset.iters
    )
    x = jnp.zeros((batch, cdr.dim), jnp.float32)
    t = jnp.zeros((batch,), jnp.int32)
    call_flops = _common.xla_flops(
        lambda v: cdr.apply(v, x, t, cond, method=lambda m, *a: m.denoiser(*a)),
        variables,
    )
    passes = 1000 if sampler == "ddpm" else steps
    return dict(
        sampler=sampler,
        steps=passes,
        batch=batch,
        dim=cdr.dim,
        hidden_dim=cdr.hidden_dim,
        dtype=preset.dtype,
        compile_s=round(compile_s, 2),
        latency=timing.as_dict(),
        samples_per_s=round(batch / timing.median_s, 1),
        gflop_per_call=None if call_flops is None else round(call_flops * passes / 1e9, 6),
    )


def predict_row(preset: Preset, variant: str) -> dict[str, Any]:
    """MARNet.predict of one variant of the preset's config (its own T and sampler)."""
    config = _config(preset, variant)
    facts = datasets.shape_facts(config.data)
    model = build_model(config.model, facts.num_classes, facts.num_ingredients)
    size, batch = config.data.image_size, preset.predict_batch
    host = _common.synthetic_batch(
        batch, size, facts.num_classes, facts.num_ingredients, preset.dtype
    )
    images = jnp.asarray(host["image"])
    keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    keys["diffusion"] = jax.random.key(2)
    ingredients = jnp.zeros((2, facts.num_ingredients), jnp.float32)
    init = jax.jit(lambda k, x, i: model.init(k, x, i, train=False))
    variables = init(keys, images[:2], ingredients)
    predict = jax.jit(
        lambda v, x, k: model.apply(v, x, rngs={"diffusion": k}, method=MARNet.predict)
    )
    key = jax.random.key(3)
    compiled = predict.lower(variables, images, key).compile()
    timing = _common.time_calls(
        lambda: jax.block_until_ready(compiled(variables, images, key)),
        preset.warmup,
        preset.iters,
    )
    chain = f"{config.model.cdr.sampler}-{config.model.cdr.sample_steps}"
    return dict(
        variant=variant,
        backbone=config.model.backbone,
        image_size=size,
        batch=batch,
        dtype=preset.dtype,
        chain=chain if config.model.use_cdr else "-",
        latency=timing.as_dict(),
        images_per_s=round(batch / timing.median_s, 1),
    )


def predict_rows(preset: Preset) -> list[dict[str, Any]]:
    """Prediction without CDR ('ema' variant) and with it ('full'); the relative cost of CDR."""
    rows = [predict_row(preset, "ema"), predict_row(preset, "full")]
    base, full = rows[0]["latency"]["median_s"], rows[1]["latency"]["median_s"]
    rows[1]["cdr_overhead"] = round(full / base - 1.0, 4)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    default_preset = "small" if jax.default_backend() == "cpu" else "gpu"
    args = _common.parse_args("cdr_sampler", __doc__, argv, PRESETS, default_preset)
    _common.setup_jax(args)
    preset = PRESETS[args.preset]
    load_before = reporting.load_average()
    pending = preset.gpu_only and jax.default_backend() == "cpu"
    chains, predicts = [], []
    if pending:
        print(f"{args.preset}: GPU preset; pending (no GPU on this machine)")
    else:
        for sampler, steps, batch in preset.chains:
            chains.append(chain_row(preset, sampler, steps, batch))
            lat = chains[-1]["latency"]["median_s"]
            print(f"{sampler}-{steps} batch {batch}: {lat * 1e3:.1f} ms", flush=True)
        predicts = predict_rows(preset)
    info = reporting.machine()
    info["load_average_before"] = load_before
    print(
        f"\n{args.preset} preset (configs/{preset.config}.py) on {reporting.machine_line(info, load=True)}"
    )
    print(
        reporting.markdown_table(
            CHAIN_HEADERS,
            [
                [
                    r["sampler"],
                    r["steps"],
                    r["batch"],
                    reporting.fmt(r["compile_s"]),
                    reporting.fmt(r["latency"]["median_s"] * 1e3, 2),
                    f"{r['latency']['p25_s'] * 1e3:.2f}-{r['latency']['p75_s'] * 1e3:.2f}",
                    reporting.fmt(r["samples_per_s"]),
                    reporting.fmt(r["gflop_per_call"], 3),
                ]
                for r in chains
            ],
        )
    )
    if predicts:
        print("\nImage-only prediction (MARNet.predict), with and without CDR:")
        print(
            reporting.markdown_table(
                PREDICT_HEADERS,
                [
                    [
                        r["variant"],
                        r["backbone"],
                        r["image_size"],
                        r["batch"],
                        r["chain"],
                        reporting.fmt(r["latency"]["median_s"] * 1e3, 2),
                        reporting.fmt(r["images_per_s"]),
                        f"{100 * r['cdr_overhead']:.1f}%" if "cdr_overhead" in r else "-",
                    ]
                    for r in predicts
                ],
            )
        )
    out = dict(
        benchmark="cdr_sampler",
        preset=args.preset,
        config=f"configs/{preset.config}.py",
        status="pending: GPU preset; no GPU on this machine" if pending else "measured",
        machine=info,
        chains=chains,
        predict=predicts,
    )
    return _common.save(args.json, out)


if __name__ == "__main__":
    cli.run(main)
