"""What each XLA:CPU lever does to the train step, the levers taking turns in one process; a table.

  python -m benchmarks.cpu_levers                       # default config: full (joint), baseline
  python -m benchmarks.cpu_levers --torch               # plus PyTorch eager on the same step
  python -m benchmarks.cpu_levers --configs tiny:full --levers 'fast math,no fusion emitters'
  python -m benchmarks.cpu_levers --preset tiny         # seconds (tests)

A lever is either a set of XLA compile options, applied to that one compilation on top of the
XLA_FLAGS the entry points set (marnet_jax.cpu), or a config override (the ResNet's conv_impl). Every
lever compiles the trainer's own jitted step (benchmarks.train_step) from the same initial state, so
the table also says whether the lever keeps the numbers: the parameters' distance after a few steps
from the 'as trained' row's, relative to their norm (param_drift), and whether XLA's
optimised HLO differs (options that act below it, such as the instruction set, leave it the same
and show in the drift and the speed only). A lever this jaxlib does
not know becomes a row that says so. Timings as in benchmarks.torch_marnet: single waited-for steps,
the contenders taking turns; speed is the median over rounds of the reference's round median over
the row's.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import flags

from benchmarks import _common, train_step
from marnet_jax import cli, reporting
from marnet_jax.data import datasets

REFERENCE = "as trained"
# Steps before the parameters are compared: the first update of a warm-up schedule is zero, and
# Adam's second is nearly the sign of the gradient, so one or two steps hide most differences.
PROBE_STEPS = 3


@dataclasses.dataclass(frozen=True)
class Lever:
    name: str
    compiler_options: tuple[tuple[str, Any], ...] = ()
    backbone_kwargs: tuple[tuple[str, Any], ...] = ()


def _fusion(kind: str, *types: str) -> tuple[tuple[str, Any], ...]:
    return ((f"xla_cpu_experimental_{kind}_fusion_type", ",".join(types)),)


LEVERS = (
    Lever(REFERENCE),
    Lever("XLA's conv gradients (conv_impl=xla)", backbone_kwargs=(("conv_impl", "xla"),)),
    Lever("oneDNN ops (xla_cpu_use_onednn)", (("xla_cpu_use_onednn", True),)),
    Lever("oneDNN fusion: dot", _fusion("onednn", "LIBRARY_FUSION_TYPE_DOT")),
    Lever(
        "oneDNN fusion: dot + eltwise",
        _fusion("onednn", "LIBRARY_FUSION_TYPE_DOT", "LIBRARY_FUSION_TYPE_ELTWISE"),
    ),
    Lever("XNNPACK (xla_cpu_use_xnnpack)", (("xla_cpu_use_xnnpack", True),)),
    Lever("XNNPACK fusion: dot", _fusion("xnn", "LIBRARY_FUSION_TYPE_DOT")),
    Lever("YNNPACK fusion: dot", _fusion("ynn", "LIBRARY_FUSION_TYPE_DOT")),
    Lever(
        "YNNPACK fusion: convolutions",
        _fusion("ynn", "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"),
    ),
    Lever("no fusion emitters", (("xla_cpu_use_fusion_emitters", False),)),
    Lever("fast math", (("xla_cpu_enable_fast_math", True),)),
    Lever(
        "portable (no platform math; AVX2)",
        (("xla_cpu_enable_platform_dependent_math", False), ("xla_cpu_max_isa", "AVX2")),
    ),
)

PRESETS = {
    # configs, levers (empty: all), warm-up steps, rounds, timed steps per round
    "tiny": (("tiny:full",), (REFERENCE, "oneDNN ops (xla_cpu_use_onednn)"), 1, 2, 1),
    # full MARNet under the joint protocol: the network the torch port mirrors (--torch)
    "small": (("default:full,joint", "default:baseline"), (), 2, 6, 3),
}


def param_drift(state: Any, reference: Any) -> float:
    """||params - reference params|| / ||reference params|| over all parameters (L2). A per-leaf
    maximum would be ruled by leaves that start at zero, where rounding flips the sign of Adam's
    first, nearly sign-sized updates."""
    diff = ref = 0.0
    for a, b in zip(
        jax.tree.leaves(jax.device_get(state.params)),
        jax.tree.leaves(jax.device_get(reference.params)),
        strict=True,
    ):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        diff += float(np.sum((a - b) ** 2))
        ref += float(np.sum(b**2))
    return float(np.sqrt(diff / ref)) if ref else float(np.sqrt(diff))


def _compile(
    config_name: str, arg: str, lever: Lever, batch: int
) -> tuple[train_step.CompiledCase | None, str]:
    case = train_step.Case(
        f"{config_name} {arg}",
        config_name,
        arg,
        batch,
        backbone_kwargs=lever.backbone_kwargs,
        compiler_options=lever.compiler_options,
    )
    try:
        return train_step.compile_case(case, devices=1, flops=False), "ok"
    except Exception as e:  # an option this jaxlib does not know: the row says so
        return None, f"not available: {str(e).splitlines()[0][:120]}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def define(fv: flags.FlagValues) -> None:
        flags.DEFINE_string(
            "configs", "", "config:arg pairs (default: the preset's)", flag_values=fv
        )
        flags.DEFINE_string(
            "levers", "", f"comma-separated lever names (default: all); {REFERENCE!r} is always run",
            flag_values=fv,
        )  # fmt: skip
        flags.DEFINE_boolean(
            "torch", False, "race PyTorch eager too (default config)", flag_values=fv
        )

    args = _common.parse_args("cpu_levers", __doc__, argv, PRESETS, "small", define)
    _common.setup_jax(args)
    configs, lever_names, warmup, rounds, per_round = PRESETS[args.preset]
    configs = args.configs.split(",") if args.configs else configs
    wanted = set(args.levers.split(",")) if args.levers else set(lever_names)
    known = {lv.name for lv in LEVERS}
    if wanted - known:
        cli.usage_error(
            "benchmarks.cpu_levers", f"unknown levers {sorted(wanted - known)}: {sorted(known)}"
        )
    levers = [lv for lv in LEVERS if not wanted or lv.name in wanted or lv.name == REFERENCE]
    load_before = reporting.load_average()
    rows = []
    for spec in configs:
        config_name, _, arg = spec.partition(":")
        module = importlib.import_module(f"configs.{config_name}")
        config = module.get_config(arg) if arg else module.get_config()
        batch = config.train.batch_size
        contenders, reference = [], None  # (row, one waited-for step) of everything raced
        for lever in levers:
            c, status = _compile(config_name, arg or None, lever, batch)
            print(f"{spec} / {lever.name}: {status}", flush=True)
            row = dict(config=spec, lever=lever.name, status=status, batch=batch,
                       compiler_options=dict(lever.compiler_options),
                       backbone_kwargs=dict(lever.backbone_kwargs),
                       param_drift=None, same_program=None)  # fmt: skip
            rows.append(row)
            if c is None:
                continue
            c.run(PROBE_STEPS)  # from the same initial state: the drift probe
            reference = reference or c  # the first lever is the step as trained
            row["param_drift"] = param_drift(c.state(), reference.state())
            row["same_program"] = c.program() == reference.program()
            contenders.append((row, functools.partial(c.run, 1)))
        if args.torch:
            row = dict(config=spec, lever="PyTorch eager", status="ok", batch=batch,
                       param_drift=None, same_program=None)  # fmt: skip
            rows.append(row)
            contenders.append((row, _torch_step(config)))
        timings, round_medians = _common.time_in_turns(
            [fn for _, fn in contenders], warmup, rounds, per_round
        )
        for i, (row, _) in enumerate(contenders):
            ratios = round_medians[:, 0] / round_medians[:, i]
            row |= dict(step=timings[i].as_dict(), speed=_spread(ratios))
    info = reporting.machine()
    info["load_average_before"] = load_before
    print(f"\n{args.preset} preset on {reporting.machine_line(info, load=True)}")
    table = [
        [
            r["config"],
            r["lever"],
            reporting.fmt(r["step"]["median_s"] * 1e3) if "step" in r else "-",
            f"{r['speed']['median']:.2f}x ({r['speed']['min']:.2f}-{r['speed']['max']:.2f})"
            if "speed" in r
            else r["status"],
            "-" if r["param_drift"] is None else f"{r['param_drift']:.1e}",
            {None: "-", True: "same", False: "differs"}[r["same_program"]],
        ]
        for r in rows
    ]
    headers = ["config", "lever", "step ms (median)", f"speed vs {REFERENCE!r} (range)"]
    headers += [f"param drift after {PROBE_STEPS} steps", "optimised HLO"]
    print(reporting.markdown_table(headers, table))
    out = dict(benchmark="cpu_levers", preset=args.preset, machine=info, rows=rows)
    return _common.save(args.json, out)


def _spread(ratios: np.ndarray) -> dict[str, float]:
    return dict(
        median=round(float(np.median(ratios)), 3),
        min=round(float(ratios.min()), 3),
        max=round(float(ratios.max()), 3),
    )


def _torch_step(config: Any) -> Callable[[], None]:
    from benchmarks import torch_marnet

    facts = datasets.shape_facts(config.data)
    return torch_marnet.torch_step_fn(config, facts.num_classes, facts.num_ingredients)[0]


if __name__ == "__main__":
    cli.run(main)
