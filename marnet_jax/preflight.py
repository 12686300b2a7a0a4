"""Pod preflight: compile the real train and eval steps for a Cloud TPU slice on any machine.

    python -m marnet_jax.preflight --config configs/X.py[:arg] --topology v5e:16x16 \
        [--num_slices 1] [--max_batch] [--json FILE] [--config.field=value ...]

With the TPU runtime library installed (libtpu, in requirements.txt), jax describes a TPU topology's chips
on a plain CPU machine and compiles for them ahead of time. This command builds the model, optimizer and
state shardings with the trainer's own code (`Experiment.build`, `jit_train_step`, `jit_eval_step`) for the
topology's chips and the config's mesh, compiles the train step and the eval step, and prints per chip:
memory (arguments, outputs, temporaries, code) against the chip's HBM, FLOPs per step, and the images/s
that the chip's published peak bf16 rate would allow at 100 % and 50 % MFU: bounds, not measurements.
`--max_batch` finds the largest per-chip train batch that fits (to a multiple of 8, in a few compiles).
It ends with one line naming the config field to change when the batch does not divide over the chips, the mesh does not match the
slice, or the step does not fit in HBM, before anyone pays for the pod.

`--topology` is `GEN:SHAPE` (v4:2x2x1, v5e:2x2, v5e:16x16, v5p:2x2x2, v6e:4x4) or a Cloud TPU
accelerator type (v4-32, v5litepod-8, v5p-16, v6e-256); see `topology_name`. GPU nodes are
`h100xN` / `h200xN` (N devices: 1-8 on one node, or whole nodes of 8), compiled against the XLA
target descriptions in marnet_jax/gpu_targets/ with the CUDA plugin (a separate install, see
`gpu_devices`); there XLA does not refuse a program larger than the GPU, so the command compares
each step's peak with the share of HBM that jax's allocator takes (XLA_PYTHON_CLIENT_MEM_FRACTION,
0.75 unless set).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags

from marnet_jax import cli, reporting
from marnet_jax.data import datasets, decoders
from marnet_jax.data.config import train_image_size
from marnet_jax.train import cost, sharding
from marnet_jax.train.experiment import Experiment

PROG = "marnet_jax.preflight"

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation or a GPU: what jax calls it, and its published per-chip HBM and dense bf16
    peak."""

    kind: str  # device_kind of its devices
    chip_config: str  # libtpu chip_config_name (TPU)
    cores_per_chip: int  # TensorCores counted by the accelerator-type name (v4-32 = 16 chips)
    hbm_bytes: int
    peak_bf16_flops: float
    target: str = ""  # GPU: its XLA target description in marnet_jax/gpu_targets/


CHIPS = {
    "v4": Chip("TPU v4", "megacore", 2, 32 * GiB, 275e12),
    "v5e": Chip("TPU v5 lite", "default", 1, 16 * GiB, 197e12),
    "v5p": Chip("TPU v5p", "megacore", 2, 95 * GiB, 459e12),
    "v6e": Chip("TPU v6 lite", "default", 1, 32 * GiB, 918e12),
}
# GPUs of one node (NODE x N devices, N <= 8, or whole nodes of 8): SXM parts, dense bf16 peak;
# HBM as the driver reports it (80 GB: 81,559 MiB; 141 GB: 143,771 MiB).
GPUS = {
    "h100": Chip("NVIDIA H100 80GB HBM3", "", 1, 81_559 * 2**20, 989e12, "h100_sxm.txtpb"),
    "h200": Chip("NVIDIA H200", "", 1, 143_771 * 2**20, 989e12, "h200_sxm.txtpb"),
}
GPU_TARGETS = Path(__file__).parent / "gpu_targets"
# On a GPU, jax's allocator takes this fraction of HBM (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75);
# XLA's GPU compiler does not refuse a program that needs more, so the preflight compares.
_DEFAULT_GPU_MEM_FRACTION = 0.75
# Accelerator-type prefixes of the Cloud TPU API, e.g. v5litepod-16 (launch/tpu_pod.sh's --type).
_TYPE_PREFIXES = {"v4": "v4", "v5litepod": "v5e", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}
# Slice shapes by chip count: 2-D tori (v5e, v6e) and 3-D (v4, v5p), as Cloud TPU builds them.
_SHAPES_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}
_SHAPES_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
}


class PreflightError(ValueError):
    """The config cannot run on the topology; the message names the field to change."""


class HbmOverflow(PreflightError):
    """A step does not fit in a chip's HBM."""


def _host_accelerator_type(gen: str) -> str:
    """The accelerator type of one host (4 chips) of a TPU generation: 'v5e' -> 'v5litepod-4'."""
    prefix = next(p for p, g in _TYPE_PREFIXES.items() if g == gen)  # the Cloud TPU API's name
    return f"{prefix}-{4 * CHIPS[gen].cores_per_chip}"


def topology_name(spec: str) -> str:
    """'v5e:2x2' as given, or an accelerator type ('v5litepod-8', 'v4-32') as 'GEN:SHAPE'."""
    spec = spec.strip()
    m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", spec)
    if m:
        if m.group(1) not in CHIPS:
            raise PreflightError(
                f"--topology {spec!r}: unknown TPU generation; use {sorted(CHIPS)}."
            )
        return spec
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", spec)
    if not m or m.group(1) not in _TYPE_PREFIXES:
        raise PreflightError(
            f"--topology {spec!r}: expected GEN:SHAPE (e.g. v5e:2x2, v4:2x2x1) or an accelerator "
            f"type (e.g. v5litepod-8, v4-32) of {sorted(_TYPE_PREFIXES)}."
        )
    gen = _TYPE_PREFIXES[m.group(1)]
    cores = int(m.group(2))
    chips = cores // CHIPS[gen].cores_per_chip
    shapes = _SHAPES_3D if gen in ("v4", "v5p") else _SHAPES_2D
    if chips not in shapes:
        raise PreflightError(
            f"--topology {spec!r}: no standard {gen} slice of {chips} chips; give GEN:SHAPE."
        )
    return f"{gen}:{shapes[chips]}"


def tpu_devices(topology: str, num_slices: int = 1) -> tuple[Chip, list[Any]]:
    """The chip generation and the abstract devices of a TPU topology ('v5e:2x2')."""
    from jax.experimental import topologies

    # libtpu takes a machine-wide lock when it loads, and any jax process on this machine that probed
    # for TPU chips (a CPU training, say) holds it; describing a topology uses no chip, so share it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    name = topology_name(topology)
    gen = name.split(":")[0]
    chip = CHIPS[gen]
    if not cli.tpu_chips_attached():
        # Off a TPU VM libtpu cannot look up the host it runs on and prints errors about it when it
        # loads; naming a host (one of the described generation) keeps it quiet, and does not
        # limit which topologies it then describes.
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", _host_accelerator_type(gen))
    try:
        desc = topologies.get_topology_desc(
            topology_name=name,
            platform="tpu",
            chip_config_name=chip.chip_config,
            chips_per_host_bounds=(2, 2, 1),
            num_slices=num_slices,
        )
    except Exception as e:  # no libtpu, or a shape libtpu refuses
        raise PreflightError(
            f"--topology {topology!r}: jax could not describe it ({_first_line(e)}). The TPU runtime "
            "library must be installed (pip install -r requirements.txt)."
        ) from e
    return chip, list(desc.devices)


def gpu_node(spec: str) -> tuple[Chip, int]:
    """'h100x8' -> (the GPU, 8 devices)."""
    m = re.fullmatch(r"(h100|h200)x(\d+)", spec.strip())
    n = int(m.group(2)) if m else 0
    if not m or n < 1 or (n > 8 and n % 8):
        raise PreflightError(
            f"--topology {spec!r}: expected GPUxN with GPU one of {sorted(GPUS)} and N devices "
            "(1-8 on one node, or a multiple of 8), e.g. h100x8."
        )
    return GPUS[m.group(1)], n


def gpu_devices(spec: str) -> tuple[Chip, list[Any], int]:
    """The GPU, the abstract devices of a node spec ('h100x8', 'h200x16' = 2 nodes of 8) and the
    bytes per device that jax's allocator may use there."""
    from jax.experimental import topologies

    chip, n = gpu_node(spec)
    shape = f"1x1x{n}" if n <= 8 else f"1x{n // 8}x8"  # slices x hosts x devices per host
    target = (GPU_TARGETS / chip.target).read_text()
    try:
        desc = topologies.get_topology_desc(
            topology_name=shape, platform="cuda", topology=shape, target_config=target
        )
    except Exception as e:  # no CUDA plugin, or it did not register
        raise PreflightError(
            f"--topology {spec!r}: jax could not describe it ({_first_line(e)}). GPU topologies need "
            "the CUDA plugin (pip install jax-cuda13-plugin==0.10.2 jax-cuda13-pjrt==0.10.2) and, "
            "on a machine without a GPU, JAX_PLATFORMS=cpu."
        ) from e
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", _DEFAULT_GPU_MEM_FRACTION))
    return chip, list(desc.devices), int(chip.hbm_bytes * fraction)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def _oom_detail(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if "memory" in x.lower() or "hbm" in x.lower()]
    return (lines[0] if lines else _first_line(e))[:300].rstrip(".")


def _spec(shape: tuple[int, ...], dtype: Any, shard: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=shard)


def batch_specs(
    config: ml_collections.ConfigDict,
    facts: datasets.DatasetFacts,
    mesh: Any,
    batch: int,
    eval_: bool,
) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract global batches as the trainer feeds them (uint8 image, label, ingredients; train:
    jitter factors and flips; eval: the padding mask), sharded over the batch axes."""
    shard = sharding.batch_sharding(mesh)
    decoder = decoders.Decoder() if eval_ else decoders.for_config(config.data)
    size = config.data.image_size if eval_ else train_image_size(config.data)
    out = {
        key: _spec(shape, dtype, shard)
        for key, (shape, dtype) in decoder.image_shapes(batch, size).items()
    }
    out["label"] = _spec((batch,), np.int32, shard)
    out["ingredients"] = _spec((batch, facts.num_ingredients), np.float32, shard)
    if eval_:
        out["mask"] = _spec((batch,), np.float32, shard)
        return out
    if config.data.augment.color_jitter:
        out["jitter"] = _spec((batch, 3), np.float32, shard)
    if config.data.augment.horizontal_flip:
        out["flip"] = _spec((batch,), np.bool_, shard)
    return out


def _check_divisible(config: ml_collections.ConfigDict, chips: int, topology: str) -> None:
    for field in ("batch_size", "eval_batch_size"):
        value = int(config.train[field])
        if value % chips:
            raise PreflightError(
                f"config.train.{field}={value} does not divide over the {chips} chips of "
                f"{topology}: use a multiple of {chips} (e.g. {chips * max(1, value // chips)})."
            )


def _memory(compiled: Any) -> dict[str, int]:
    """Per-chip bytes of a compiled program. `peak`: the larger of XLA's own peak estimate and
    arguments + outputs - donated + temporaries, plus the program's code (it lives in HBM too). On
    TPU, XLA reports no temporaries for some programs but still a peak, so neither alone is enough."""
    m = compiled.memory_analysis()
    out = {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "donated": int(m.alias_size_in_bytes),  # state buffers that are both argument and output
        "temporaries": int(m.temp_size_in_bytes),
        "code": int(m.generated_code_size_in_bytes),
        "xla_peak": int(getattr(m, "peak_memory_in_bytes", 0) or 0),
    }
    buffers = out["arguments"] + out["outputs"] - out["donated"] + out["temporaries"]
    out["peak"] = max(out["xla_peak"], buffers) + out["code"]
    return out


def _abstract_step(config: ml_collections.ConfigDict, facts: datasets.DatasetFacts, devices: list):
    """(jitted train step, abstract sharded state, abstract train batch, experiment) as the
    trainer builds them for `devices`."""
    exp = Experiment.build(config, facts, devices)
    state = exp.restore_target()
    batch = batch_specs(config, facts, exp.mesh, int(config.train.batch_size), eval_=False)
    return exp.jit_train_step(), state, batch, exp


def _global_train_flops(
    config: ml_collections.ConfigDict, facts: datasets.DatasetFacts
) -> float | None:
    """FLOPs of the whole global train step from its HLO lowered for one CPU device: the TPU
    program's own analysis counts the diffusion chain's loop body once, and the TPU lowering has
    no cost analysis without a TPU."""
    one = copy.deepcopy(config)
    one.mesh.num_devices, one.mesh.data, one.mesh.fsdp = -1, -1, 1
    step, state, batch, _ = _abstract_step(one, facts, jax.devices("cpu")[:1])
    return cost.hlo_flops(step, state, batch)


def _overflow(
    what: str, topology: str, field: str, value: Any, detail: str, fix: str
) -> HbmOverflow:
    """The one-line error of a step that does not fit, naming the config field to change."""
    return HbmOverflow(
        f"{topology}: the {what} step does not fit in a chip's HBM at config.train.{field}="
        f"{value}: {detail}. {fix}"
    )


_TRAIN_FIX = (
    "Lower config.train.batch_size, set config.model.remat=True, or shard parameters with "
    "config.mesh.fsdp."
)


def compile_train(
    config: ml_collections.ConfigDict,
    devices: Sequence[Any],
    topology: str,
    usable_bytes: int | None = None,
) -> tuple[Any, float, tuple, Any]:
    """(compiled train step, compile seconds, Experiment, abstract state) for `devices`;
    HbmOverflow when the step does not fit in a chip's HBM (XLA's verdict on TPU; on GPU, whose
    compiler does not check, the peak against `usable_bytes`)."""
    chips = len(devices)
    _check_divisible(config, chips, topology)
    facts = datasets.shape_facts(config.data)
    try:
        p_train, state, train_batch, exp = _abstract_step(config, facts, list(devices))
    except ValueError as e:  # make_mesh: the mesh does not match the slice
        raise PreflightError(f"{topology}: {_first_line(e)}") from e
    t0 = time.perf_counter()
    batch = f"{config.train.batch_size} ({config.train.batch_size // chips} per chip)"
    try:
        train = p_train.lower(state, train_batch).compile()
    except Exception as e:
        if _is_oom(e):
            raise _overflow(
                "train", topology, "batch_size", batch, _oom_detail(e), _TRAIN_FIX
            ) from e
        raise
    compile_s = time.perf_counter() - t0
    peak = _memory(train)["peak"]
    if usable_bytes is not None and peak > usable_bytes:
        detail = f"peak {_gib(peak)} per device, {_gib(usable_bytes)} usable"
        raise _overflow("train", topology, "batch_size", batch, detail, _TRAIN_FIX)
    return train, compile_s, exp, state


def compile_steps(
    config: ml_collections.ConfigDict,
    devices: Sequence[Any],
    topology: str,
    usable_bytes: int | None = None,
) -> dict[str, Any]:
    """Compiles the train and eval steps for `devices` with the trainer's code; per-chip numbers."""
    chips = len(devices)
    train, compile_s, exp, state = compile_train(config, devices, topology, usable_bytes)
    facts, mesh, abstract, shardings = exp.facts, exp.mesh, exp.abstract, exp.shardings
    eval_batch = batch_specs(config, facts, mesh, int(config.train.eval_batch_size), eval_=True)
    rng = _spec((2,), np.uint32, sharding.replicated(mesh))
    p_eval = exp.jit_eval_step()
    eval_fix = "Lower config.train.eval_batch_size."
    eval_size = config.train.eval_batch_size
    try:
        evaluate = p_eval.lower(state.variables(), eval_batch, rng).compile()
    except Exception as e:
        if _is_oom(e):
            detail = _oom_detail(e)
            raise _overflow("eval", topology, "eval_batch_size", eval_size, detail, eval_fix) from e
        raise
    eval_peak = _memory(evaluate)["peak"]
    if usable_bytes is not None and eval_peak > usable_bytes:
        detail = f"peak {_gib(eval_peak)} per device, {_gib(usable_bytes)} usable"
        raise _overflow("eval", topology, "eval_batch_size", eval_size, detail, eval_fix)
    global_flops = _global_train_flops(config, facts)
    params = jax.tree.leaves(abstract.params)
    sharded = sharding.describe_shardings(shardings.params, abstract.params)
    return {
        "chips": chips,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "global_batch": int(config.train.batch_size),
        "per_chip_batch": int(config.train.batch_size) // chips,
        "eval_batch": int(config.train.eval_batch_size),
        "parameters": int(sum(math.prod(p.shape) for p in params)),
        "fsdp_sharded_arrays": len(sharded),
        "train_memory": _memory(train),
        "eval_memory": _memory(evaluate),
        "train_flops_per_chip": None if global_flops is None else global_flops / chips,
        "compile_s": round(compile_s, 1),
    }


def bounds(result: dict[str, Any], chip: Chip) -> dict[str, float | None]:
    """Images/s the slice would reach if its chips ran the step at 100 % / 50 % of peak bf16."""
    flops = result["train_flops_per_chip"]
    if not flops:
        return {"images_per_s_at_100_mfu": None, "images_per_s_at_50_mfu": None}
    step_s = flops / chip.peak_bf16_flops
    ips = result["global_batch"] / step_s
    return {"images_per_s_at_100_mfu": ips, "images_per_s_at_50_mfu": ips / 2}


def max_batch(
    config: ml_collections.ConfigDict,
    devices: Sequence[Any],
    topology: str,
    hbm_bytes: int,
    granularity: int = 8,
    usable_bytes: int | None = None,
) -> int:
    """Largest per-chip train batch whose train step compiles within HBM, to `granularity` (a
    multiple of it; exact below it). Only the train step is compiled per try.

    A step's peak memory grows about linearly with the batch: the config's per-chip batch and twice
    it give the line, whose crossing with the chip's HBM is the first guess; steps from 1/8 of the
    guess, doubling, bracket the answer and bisection ends it. A few compiles, not the dozen of a doubling from 1
    (each several minutes at paper scale on a small machine).
    """
    chips = len(devices)
    peaks: dict[int, int | None] = {}

    def peak(per_chip: int) -> int | None:
        """Peak bytes per chip at this batch, None when it does not fit."""
        if per_chip not in peaks:
            trial = copy.deepcopy(config)
            trial.train.batch_size = per_chip * chips
            trial.train.eval_batch_size = chips
            try:
                compiled = compile_train(trial, devices, topology, usable_bytes)[0]
                peaks[per_chip] = _memory(compiled)["peak"]
            except HbmOverflow:
                peaks[per_chip] = None
        return peaks[per_chip]

    def snap(b: int) -> int:
        return max(1, b - b % granularity if b >= granularity else b)

    b1 = max(1, int(config.train.batch_size) // chips)
    if peak(b1) is None:
        lo, hi = 0, b1
    elif peak(2 * b1) is None:
        lo, hi = b1, 2 * b1
    else:
        slope = max((peak(2 * b1) - peak(b1)) / b1, 1.0)
        guess = snap(int(2 * b1 + (hbm_bytes - peak(2 * b1)) / slope))
        step = max(granularity, snap(guess // 8))
        if peak(guess) is not None:
            lo, hi = guess, guess + step
            while peak(hi) is not None:
                lo, hi, step = hi, hi + 2 * step, 2 * step
        else:
            lo, hi = max(2 * b1, guess - step), guess
            while peak(lo) is None:
                lo, hi, step = max(2 * b1, lo - 2 * step), lo, 2 * step
    while hi - lo > (granularity if lo >= granularity else 1):
        mid = (lo + hi) // 2
        mid = snap(mid) if snap(mid) > lo else mid
        lo, hi = (mid, hi) if peak(mid) is not None else (lo, mid)
    return lo


def run(
    config: ml_collections.ConfigDict,
    topology: str,
    num_slices: int = 1,
    find_max_batch: bool = False,
) -> dict[str, Any]:
    """The preflight record of one config on one topology (see the module docstring)."""
    usable = None
    if topology.strip().startswith(tuple(GPUS)):
        if num_slices != 1:
            raise PreflightError("--num_slices is for TPU slices; give GPU nodes as GPUxN.")
        name = topology.strip()
        _check_divisible(config, gpu_node(name)[1], name)  # before the CUDA plugin is needed
        chip, devices, usable = gpu_devices(name)
    else:
        name = topology_name(topology)
        chips = math.prod(int(d) for d in name.split(":")[1].split("x")) * num_slices
        name += f" x {num_slices} slices" if num_slices > 1 else ""
        _check_divisible(config, chips, name)  # before libtpu is needed
        chip, devices = tpu_devices(topology, num_slices)
    result = compile_steps(config, devices, name, usable)
    record = {
        "topology": name,
        "chip": chip.kind,
        "hbm_bytes_per_chip": chip.hbm_bytes,
        "usable_bytes_per_chip": usable,  # GPU: jax's allocator's share; TPU: XLA checks itself
        "peak_bf16_flops_per_chip": chip.peak_bf16_flops,
        "config": {
            "backbone": config.model.backbone,
            "variant": config.variant,
            "image_size": int(config.data.image_size),
            "train_image_size": train_image_size(config.data),
            "dtype": config.model.dtype,
            "remat": bool(config.model.remat),
        },
        **result,
        **bounds(result, chip),
    }
    if find_max_batch:
        record["max_per_chip_batch"] = max_batch(
            config, devices, name, usable or chip.hbm_bytes, usable_bytes=usable
        )
    return record


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def table(r: dict[str, Any]) -> str:
    """The record as a two-column markdown table."""
    tm, em = r["train_memory"], r["eval_memory"]
    hbm = r["hbm_bytes_per_chip"]
    flops = r["train_flops_per_chip"]
    rows = [
        ("topology", f"{r['topology']} ({r['chips']} x {r['chip']}, {_gib(hbm)} HBM each)"),
        ("config", ", ".join(f"{k} {v}" for k, v in r["config"].items())),
        ("mesh", " x ".join(f"{k}={v}" for k, v in r["mesh"].items())),
        ("train batch", f"{r['global_batch']} ({r['per_chip_batch']} per chip)"),
        ("parameters", f"{r['parameters']:,} ({r['fsdp_sharded_arrays']} arrays FSDP-sharded)"),
        (
            "train step memory per chip",
            f"peak {_gib(tm['peak'])} = {100 * tm['peak'] / hbm:.0f} % of HBM (arguments "
            f"{_gib(tm['arguments'])}, temporaries {_gib(tm['temporaries'])}, XLA's peak estimate "
            f"{_gib(tm['xla_peak'])}, code {_gib(tm['code'])})",
        ),
        ("eval step memory per chip", f"peak {_gib(em['peak'])} at batch {r['eval_batch']}"),
        *(
            [("usable per device", f"{_gib(r['usable_bytes_per_chip'])} (jax's allocator share)")]
            if r.get("usable_bytes_per_chip")
            else []
        ),
        (
            "train FLOPs per chip per step",
            "n/a"
            if flops is None
            else f"{flops:.3e} ({flops / r['per_chip_batch']:.3e} per image)",
        ),
    ]
    if r["images_per_s_at_100_mfu"]:
        rows.append(
            (
                "bound: images/s of the slice",
                f"{r['images_per_s_at_100_mfu']:,.0f} at 100 % MFU, "
                f"{r['images_per_s_at_50_mfu']:,.0f} at 50 % (from "
                f"{r['peak_bf16_flops_per_chip'] / 1e12:.0f} TFLOP/s peak bf16; not measured)",
            )
        )
    rows.append(("train step compile", f"{r['compile_s']} s"))
    if "max_per_chip_batch" in r:
        rows.append(("largest per-chip train batch that fits", str(r["max_per_chip_batch"])))
    return reporting.markdown_table(["quantity", "value"], rows)


def _define_flags(fv: flags.FlagValues, argv: Sequence[str] | None) -> None:
    cli.define_config(fv, argv)
    flags.DEFINE_string(
        "topology",
        None,
        "GEN:SHAPE (v5e:16x16), accelerator type (v4-32) or GPUs (h100x8).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_slices", 1, "Slices of that topology (multislice, data-parallel).", flag_values=fv
    )
    flags.DEFINE_boolean(
        "max_batch", False, "Also find the largest per-chip batch that fits.", flag_values=fv
    )
    flags.DEFINE_string("json", None, "Also write the record as JSON here.", flag_values=fv)
    flags.mark_flag_as_required("topology", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    """Compiles the config's steps for --topology and prints the record; the exit status."""
    # Abstract devices only: no accelerator is needed, and on a machine without a GPU the CUDA
    # plugin registers (for GPU topologies) only when the CPU is the chosen platform. (jax has read
    # the environment when it was imported: the setting goes to its config.)
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
    args, rest = cli.parse_flags(
        PROG, lambda fv: _define_flags(fv, argv), argv, "--config FILE --topology TOPOLOGY", __doc__
    )
    if rest:
        cli.usage_error(PROG, f"unexpected arguments {rest}.")
    try:
        record = run(args.config, args.topology, args.num_slices, args.max_batch)
    except PreflightError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    print(table(record))
    if args.json:
        reporting.write_json(args.json, record)
    return 0


if __name__ == "__main__":
    cli.run(main)
