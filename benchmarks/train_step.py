"""Train-step throughput, FLOPs, MFU and compile time of MARNet as the trainer runs it; prints a table.

  python -m benchmarks.train_step                     # CPU: the default config, full and baseline
  python -m benchmarks.train_step --preset cpu-smoke  # ResNet-50 / ViT-B/16 at 224 px, batch 4
  python -m benchmarks.train_step --preset gpu        # ResNet-50 224 px batch 64/128/256 f32/bf16, ViT-B/16
  python -m benchmarks.train_step --preset tiny       # seconds: configs/tiny.py (tests)

Each row builds the state, the model and the jitted step with the trainer's own code
(Experiment.build, Experiment.jit_train_step: sharded state and batch, donated state buffers) from a config
file, and feeds a synthetic device batch of the dataset's shapes (random images, multi-hot
ingredients), so no dataset is needed. Reported:
  compile: wall seconds to lower (trace) and to compile the step, separately, cold unless
    --compile_cache;
  step ms: median and interquartile range of single steps after warm-up, each waited for (the way a
    PyTorch eager step is timed);
  images/s: batch / median step; pipelined images/s: steps dispatched back to back (as the train
    loop runs them, metrics not waited for) over the same number of steps;
  GFLOP/step: XLA's cost analysis of the step's HLO with the diffusion chain's loop unrolled (the
    compiled program's own analysis, also in the JSON, counts a loop body once unless XLA unrolled
    the loop itself);
  MFU: achieved FLOP/s over a measured dense matmul rate in the row's compute dtype (GPU/TPU; on the
    CPU the same ratio against the CPU's float32 matmul rate is given for reference).
GPU presets on a machine without one print 'pending' rows.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import flags

from benchmarks import _common
from marnet_jax import cli, reporting
from marnet_jax.data import datasets
from marnet_jax.data.config import train_image_size
from marnet_jax.train import sharding
from marnet_jax.train.experiment import Experiment


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: a config file (module in configs/, its arg) and what the row overrides."""

    name: str
    config: str  # module in configs/
    arg: str | None  # config arg (variant / backbone)
    batch: int
    dtype: str = "float32"  # model and data dtype
    remat: bool = False
    backbone_kwargs: tuple[tuple[str, Any], ...] = ()  # overrides of config.model.backbone_kwargs
    compiler_options: tuple[tuple[str, Any], ...] = ()  # XLA options for this compile only
    train_image_size: int | None = None  # config.data.train_image_size (None: the config's)
    warmup: int = 2
    iters: int = 10
    gpu_only: bool = False

    def key(self) -> str:
        """Name, batch and dtype: one row (--cases takes names, which may cover several, or keys)."""
        return f"{self.name} b{self.batch} {self.dtype}" + (" remat" if self.remat else "")


def _paper(backbone: str, batch: int, dtype: str, **kw: Any) -> Case:
    name = f"{backbone} 224px full"
    return Case(name, "vireo_food172", backbone, batch, dtype, gpu_only=True, **kw)


PRESETS: dict[str, list[Case]] = {
    "tiny": [Case("tiny full", "tiny", "full", 16, warmup=1, iters=2)],
    "small": [
        Case("default full", "default", "full", 64),
        Case("default baseline", "default", "baseline", 64),
        # XLA's own conv gradients (conv_impl 'xla'), for what the CPU path ('auto') saves.
        Case(
            "default full xla-conv", "default", "full", 64, backbone_kwargs=(("conv_impl", "xla"),)
        ),
        Case(
            "default baseline xla-conv",
            "default",
            "baseline",
            64,
            backbone_kwargs=(("conv_impl", "xla"),),
        ),
        # Training crops of 48 px (data.train_image_size) for the default's 64-px images.
        Case("default full 48px crops", "default", "full", 64, train_image_size=48),
        Case("default baseline 48px crops", "default", "baseline", 64, train_image_size=48),
    ],
    "cpu-smoke": [
        Case("resnet50 224px full", "vireo_food172", "resnet50", 4, "bfloat16", warmup=1, iters=2),
        Case("vit_b16 224px full", "vireo_food172", "vit_b16", 4, "bfloat16", warmup=1, iters=2),
    ],
    "gpu": [
        *[
            _paper("resnet50", b, d, warmup=5, iters=20)
            for d in ("bfloat16", "float32")
            for b in (64, 128, 256)
        ],
        _paper("resnet50", 256, "bfloat16", remat=True, warmup=5, iters=20),
        _paper("vit_b16", 128, "bfloat16", warmup=5, iters=20),
        _paper("vit_b16", 128, "float32", warmup=5, iters=20),
        Case("default full", "default", "full", 64, warmup=5, iters=20),
        Case("default baseline", "default", "baseline", 64, warmup=5, iters=20),
    ],
}


def make_config(case: Case, devices: int) -> ml_collections.ConfigDict:
    config = importlib.import_module(f"configs.{case.config}").get_config(case.arg)
    config.train.batch_size = case.batch
    config.model.dtype = case.dtype
    config.data.dtype = case.dtype
    config.mesh.num_devices = devices
    if case.remat:
        config.model.remat = True
    if case.train_image_size:
        config.data.train_image_size = case.train_image_size
    for key, value in case.backbone_kwargs:
        config.model.backbone_kwargs[key] = value
    return config


def setup_step(
    config: ml_collections.ConfigDict, facts: Any, with_state: bool = True
) -> tuple[Any, Any, Any]:
    """(jitted train step, initial state or None, mesh) built by the trainer's own code."""
    exp = Experiment.build(config, facts)
    state = exp.initial_state() if with_state else None
    return exp.jit_train_step(), state, exp.mesh


@dataclasses.dataclass
class CompiledCase:
    """One case's compiled step on its synthetic device batch, ready to run."""

    config: ml_collections.ConfigDict
    devices: int
    lower_s: float
    compile_s: float
    gflop: float | None  # XLA cost analysis, diffusion chain unrolled
    compiled_gflop: float | None  # the compiled program's own analysis
    run: Callable[[int], None]  # n steps dispatched back to back, then waited for
    state: Callable[[], Any]  # the train state after the steps run so far
    program: Callable[[], str]  # the compiled program's text


def compile_case(case: Case, devices: int = -1, flops: bool = True) -> CompiledCase:
    """Builds the state and the jitted step of one case with the trainer's code and compiles it."""
    config = make_config(case, devices)
    facts = datasets.shape_facts(config.data)
    p_train, state, mesh = setup_step(config, facts)
    host = _common.synthetic_train_batch(
        case.batch, train_image_size(config.data), facts.num_classes, facts.num_ingredients
    )
    batch = sharding.global_batch(host, mesh)

    t0 = time.perf_counter()
    lowered = p_train.lower(state, batch)
    t1 = time.perf_counter()
    step = lowered.compile(dict(case.compiler_options) or None)
    lower_s, compile_s = t1 - t0, time.perf_counter() - t1
    gflop = None
    if flops:  # the same step traced anew with the chain unrolled, for the cost analysis only
        gflop = _common.xla_flops(setup_step(config, facts, False)[0], state, batch)
        gflop = None if gflop is None else gflop / 1e9
    compiled_gflop = _common.compiled_flops(step)
    holder = {"state": state}

    def run(n: int) -> None:
        for _ in range(n):
            holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    return CompiledCase(
        config, mesh.size, lower_s, compile_s, gflop,
        None if compiled_gflop is None else compiled_gflop / 1e9, run, lambda: holder["state"],
        step.as_text,
    )  # fmt: skip


def run_case(
    case: Case, devices: int = -1, flops: bool = True, peak: dict[str, float] | None = None
) -> dict[str, Any]:
    """Compiles and times one case; returns its JSON row."""
    c = compile_case(case, devices, flops)
    timing = _common.time_calls(lambda: c.run(1), case.warmup, case.iters)
    t0 = time.perf_counter()
    c.run(case.iters)  # back to back, as the train loop dispatches them
    pipelined = case.batch * case.iters / (time.perf_counter() - t0)

    achieved = None if c.gflop is None else c.gflop * 1e9 / timing.median_s
    rate = (peak or {}).get(case.dtype)
    return dict(
        name=case.name,
        config=f"configs/{case.config}.py:{case.arg}",
        backbone=c.config.model.backbone,
        backbone_kwargs=c.config.model.backbone_kwargs.to_dict(),
        image_size=train_image_size(c.config.data),
        batch=case.batch,
        dtype=case.dtype,
        remat=case.remat,
        devices=c.devices,
        status="measured",
        lower_s=round(c.lower_s, 2),
        compile_s=round(c.compile_s, 2),
        step=timing.as_dict(),
        images_per_s=round(case.batch / timing.median_s, 1),
        pipelined_images_per_s=round(pipelined, 1),
        gflop_per_step=None if c.gflop is None else round(c.gflop, 3),
        compiled_gflop_per_step=None if c.compiled_gflop is None else round(c.compiled_gflop, 3),
        achieved_tflop_per_s=None if achieved is None else round(achieved / 1e12, 4),
        mfu=None if (achieved is None or not rate) else round(achieved / rate, 4),
    )


def pending_row(case: Case, reason: str) -> dict[str, Any]:
    return dict(
        name=case.name,
        config=f"configs/{case.config}.py:{case.arg}",
        batch=case.batch,
        dtype=case.dtype,
        remat=case.remat,
        status=f"pending: {reason}",
    )


def print_table(rows: list[dict[str, Any]]) -> None:
    headers = [
        "case",
        "px",
        "batch",
        "dtype",
        "remat",
        "lower s",
        "compile s",
        "step ms (median)",
        "IQR ms",
        "images/s",
        "pipelined images/s",
        "GFLOP/step",
        "TFLOP/s",
        "MFU",
    ]
    table = []
    for r in rows:
        if r["status"] != "measured":
            table.append(
                [r["name"], "-", r["batch"], r["dtype"], r["remat"], r["status"]]
                + [""] * (len(headers) - 6)
            )
            continue
        s = r["step"]
        table.append(
            [
                r["name"],
                r["image_size"],
                r["batch"],
                r["dtype"],
                r["remat"],
                reporting.fmt(r["lower_s"]),
                reporting.fmt(r["compile_s"]),
                reporting.fmt(s["median_s"] * 1e3),
                f"{s['p25_s'] * 1e3:.0f}-{s['p75_s'] * 1e3:.0f}",
                reporting.fmt(r["images_per_s"]),
                reporting.fmt(r["pipelined_images_per_s"]),
                reporting.fmt(r["gflop_per_step"], 2),
                reporting.fmt(r["achieved_tflop_per_s"], 3),
                "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
            ]
        )
    print(reporting.markdown_table(headers, table))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    default_preset = "small" if jax.default_backend() == "cpu" else "gpu"

    def define(fv: flags.FlagValues) -> None:
        flags.DEFINE_integer("devices", -1, "devices to use (-1: all)", flag_values=fv)
        flags.DEFINE_boolean("no_flops", False, "skip the FLOPs count (one trace)", flag_values=fv)
        flags.DEFINE_string(
            "cases",
            "",
            "comma-separated case names (all their batches and dtypes) or keys such as "
            "'resnet50 224px full b256 bfloat16' to keep",
            flag_values=fv,
        )

    args = _common.parse_args("train_step", __doc__, argv, PRESETS, default_preset, define)
    _common.setup_jax(args)
    cases = PRESETS[args.preset]
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.name in wanted or c.key() in wanted]
        if not cases:
            keys = ", ".join(c.key() for c in PRESETS[args.preset])
            raise SystemExit(
                f"--cases {args.cases!r} matches no case of --preset {args.preset}: {keys}"
            )
    on_cpu = jax.default_backend() == "cpu"
    measured_cases = [c for c in cases if not (c.gpu_only and on_cpu)]
    peak = {}
    if measured_cases and not args.no_flops:
        for dtype in sorted({c.dtype for c in measured_cases}):
            peak[dtype] = _common.matmul_rate(dtype)["flops_per_s"]
    load_before = reporting.load_average()
    rows = []
    for case in cases:
        if case.gpu_only and on_cpu:
            row = pending_row(case, "GPU preset; no GPU on this machine")
        else:
            row = run_case(case, args.devices, flops=not args.no_flops, peak=peak)
        rows.append(row)
        print(f"{case.name} batch {case.batch} {case.dtype}: {row['status']}", flush=True)
    info = reporting.machine()
    info["load_average_before"] = load_before
    print(f"\n{args.preset} preset on {reporting.machine_line(info, load=True)}")
    if peak:
        print(
            "measured dense matmul rate: "
            + ", ".join(f"{d} {r / 1e12:.3f} TFLOP/s" for d, r in peak.items())
        )
    print_table(rows)
    out = dict(
        benchmark="train_step",
        preset=args.preset,
        machine=info,
        matmul_flops_per_s=peak,
        rows=rows,
    )
    return _common.save(args.json, out)


if __name__ == "__main__":
    cli.run(main)
