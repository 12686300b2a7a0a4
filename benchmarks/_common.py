"""Shared pieces of the benchmarks: timing, FLOPs, synthetic batches, the common options (the
machine facts, tables and JSON files are marnet_jax.reporting's, shared with the studies).

Every benchmark prints a markdown table and writes the same rows as JSON with the machine and the
load average next to them (on a shared machine wall-clock times depend on the load).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from marnet_jax import cli, reporting
from marnet_jax.train import cost


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call after warm-up: median and spread, plus this process's CPU seconds."""

    median_s: float
    p25_s: float
    p75_s: float
    min_s: float
    max_s: float
    cpu_s: float  # median CPU seconds of this process (all its threads) per call
    iters: int

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in vars(self).items()}


def timing_of(wall: Sequence[float], cpu: Sequence[float]) -> Timing:
    """Timing of measured calls: wall and process-CPU seconds per call."""
    if not wall:
        raise ValueError("no timed calls.")
    w = np.asarray(wall)
    return Timing(
        median_s=float(np.median(w)),
        p25_s=float(np.percentile(w, 25)),
        p75_s=float(np.percentile(w, 75)),
        min_s=float(w.min()),
        max_s=float(w.max()),
        cpu_s=float(np.median(cpu)),
        iters=len(w),
    )


def timed_calls(fn: Callable[[], Any], iters: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of `iters` calls of `fn()` (which must block until done)."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}.")
    wall, cpu = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def time_calls(fn: Callable[[], Any], warmup: int, iters: int) -> Timing:
    """Times `fn()` (which must block until its work is done) `iters` times after `warmup` calls."""
    for _ in range(warmup):
        fn()
    return timing_of(*timed_calls(fn, iters))


def time_in_turns(
    fns: Sequence[Callable[[], Any]], warmup: int, rounds: int, per_round: int, pause_s: float = 0.2
) -> tuple[list[Timing], np.ndarray]:
    """Times several blocking functions taking turns; (their Timings, round medians [rounds, n]).

    In each round every function runs `per_round` timed calls, the order rotating from round to
    round, so a machine whose speed drifts during the run slows all of them alike; `pause_s` before
    each turn lets the previous one's worker threads go idle.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    n = len(fns)
    wall, cpu = [[] for _ in range(n)], [[] for _ in range(n)]
    round_medians = np.zeros((rounds, n))
    for r in range(rounds):
        for k in range(n):
            i = (r + k) % n
            time.sleep(pause_s)
            w, c = timed_calls(fns[i], per_round)
            wall[i] += w
            cpu[i] += c
            round_medians[r, i] = np.median(w)
    return [timing_of(w, c) for w, c in zip(wall, cpu, strict=True)], round_medians


def parse_args(
    name: str,
    doc: str,
    argv: Sequence[str] | None,
    presets: Sequence[str],
    default_preset: str,
    define: Callable[[flags.FlagValues], None] = lambda fv: None,
) -> flags.FlagValues:
    """The benchmark's absl flags: the shared --preset, --json, --compile_cache and `define`'s."""

    def define_all(fv: flags.FlagValues) -> None:
        flags.DEFINE_enum("preset", default_preset, sorted(presets), "cases to run", flag_values=fv)
        flags.DEFINE_string(
            "json",
            os.path.join(tempfile.gettempdir(), "marnet_benchmarks", f"{name}.json"),
            "where to write the results",
            flag_values=fv,
        )
        flags.DEFINE_boolean(
            "compile_cache",
            False,
            "keep JAX's persistent compilation cache (compile times are then not cold)",
            flag_values=fv,
        )
        define(fv)

    args, rest = cli.parse_flags(f"benchmarks.{name}", define_all, argv, doc=doc)
    if rest:
        cli.usage_error(f"benchmarks.{name}", f"unexpected arguments {rest}")
    return args


def setup_jax(args: flags.FlagValues) -> None:
    """Cold compiles unless --compile_cache (a cache hit would make compile times meaningless)."""
    if not args.compile_cache:
        jax.config.update("jax_enable_compilation_cache", False)


def save(path: str, out: dict[str, Any]) -> dict[str, Any]:
    """Writes a benchmark's results (reporting.write_json), says where, and returns them."""
    reporting.write_json(path, out)
    print(f"wrote {path}")
    return out


def synthetic_batch(
    batch_size: int,
    image_size: int,
    num_classes: int,
    num_ingredients: int,
    dtype: str = "float32",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A host batch shaped like the input pipeline's: normalised images, labels, multi-hot."""
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((batch_size, image_size, image_size, 3), np.float32)
    ingredients = (rng.random((batch_size, num_ingredients)) < 0.1).astype(np.float32)
    ingredients[np.arange(batch_size), rng.integers(0, num_ingredients, batch_size)] = 1.0
    return {
        "image": image.astype(jnp.dtype(dtype)),
        "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
        "ingredients": ingredients,
    }


def synthetic_train_batch(
    batch_size: int, image_size: int, num_classes: int, num_ingredients: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """A host training batch shaped like the train pipeline's: uint8 crops, colour-jitter factors
    ('jitter' [B, 3]), flips ('flip' [B]), labels, multi-hot; the train step does the rest."""
    host = synthetic_batch(batch_size, image_size, num_classes, num_ingredients, seed=seed)
    rng = np.random.default_rng(seed + 1)
    host["image"] = rng.integers(0, 256, host["image"].shape, dtype=np.uint8)
    host["jitter"] = rng.uniform(0.8, 1.2, (batch_size, 3)).astype(np.float32)
    host["flip"] = rng.random(batch_size) < 0.5
    return host


def xla_flops(fn: Callable[..., Any], *args: Any) -> float | None:
    """FLOPs of one call of `fn(*args)` by XLA's cost analysis of its HLO, loops unrolled."""
    return cost.hlo_flops(jax.jit(fn), *args)


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs from the compiled program's cost analysis (loop bodies counted once)."""
    return cost.flops_of(compiled.cost_analysis())


def matmul_rate(dtype: str, n: int | None = None, iters: int = 10) -> dict[str, Any]:
    """Measured dense matmul rate (FLOP/s) of the default device: the peak that MFU is taken
    against. n: matrix size (default 8192 on accelerators, 1024 on the CPU)."""
    if n is None:
        n = 1024 if jax.default_backend() == "cpu" else 8192
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.dtype(dtype))
    b = jax.random.normal(k2, (n, n), jnp.dtype(dtype))
    mm = jax.jit(lambda a, b: a @ b)
    t = time_calls(lambda: mm(a, b).block_until_ready(), warmup=2, iters=iters)
    return {"dtype": dtype, "n": n, "flops_per_s": 2.0 * n**3 / t.median_s}
