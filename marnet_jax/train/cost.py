"""FLOPs of a jitted step by XLA's cost analysis, with the diffusion chain counted at its full length.

XLA's cost analysis counts a loop body once, so a 10-pass reverse chain (a lax.scan) would count as
one pass: `hlo_flops` traces the step again with every scan unrolled (same values, same program
otherwise) and reads the FLOPs of that HLO before compilation, i.e. of the whole global step.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import jax


@contextlib.contextmanager
def unrolled_scans() -> Iterator[None]:
    """Traces every lax.scan fully unrolled (same values) inside the block."""
    original = jax.lax.scan

    @functools.wraps(original)
    def scan(*args, **kwargs):
        kwargs["unroll"] = True
        return original(*args, **kwargs)

    jax.lax.scan = scan
    try:
        yield
    finally:
        jax.lax.scan = original


def flops_of(cost: Any) -> float | None:
    """The 'flops' entry of a cost analysis (a dict, or a list with one dict per program)."""
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def hlo_flops(jitted: Any, *args: Any) -> float | None:
    """FLOPs of one call of the jitted function on `args` (arrays or ShapeDtypeStructs), loops
    unrolled; None where the backend gives no cost analysis."""
    with unrolled_scans():
        lowered = jitted.lower(*args)
    return flops_of(lowered.cost_analysis())
