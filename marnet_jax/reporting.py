"""Report helpers shared by the studies (evidence) and the benchmarks: the machine a
number comes from, percentages, markdown tables, and JSON / CSV files written atomically."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def short_cpu(model: str) -> str:
    """A CPU model name without trademarks and filler: 'Intel(R) Xeon(R) Processor' -> 'Intel Xeon'."""
    words = re.sub(r"\((R|TM|tm)\)", "", model).split()
    return " ".join(w for w in words if w not in ("Processor", "CPU")) or model


def machine() -> dict[str, Any]:
    """The machine the numbers come from: CPU, cores this process may use, JAX devices, load."""
    import jax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "jax_backend": jax.default_backend(),
        "jax_devices": f"{len(devices)} x {', '.join(kinds)}",
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "load_average_1_5_15": load_average(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_line(m: Mapping[str, Any], load: bool = False) -> str:
    """One line naming the machine of `machine()` (and its load average when it was recorded)."""
    cores = m.get("usable_cores") or m.get("cpu_count")
    line = (
        f"{m['cpu']} ({cores} usable of {m['cpu_count']} cores), {m['platform']}; JAX "
        f"{m['jax_version']} on {m['jax_devices']} ({m['jax_backend']})"
    )
    if load:
        line += (
            f", 1/5/15-min load average {'/'.join(f'{x:.1f}' for x in m['load_average_1_5_15'])}"
        )
    return line


def _clean(obj: Any) -> Any:
    """JSON-able copy: NumPy scalars/arrays to Python, NaN/Inf to None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON (NaN/Inf as null), written through a temporary file: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)  # a killed study never leaves half a JSON


def read_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON at `path`; a missing file names itself and `what` it should have held."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {what}")
    return json.loads(path.read_text())


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(row.get(k)) for k in columns})


def _csv_cell(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return "" if not math.isfinite(v) else f"{float(v):.6g}"
    if isinstance(v, list | tuple):
        return " ".join(str(x) for x in v)
    return "" if v is None else v


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x: float | None, digits: int = 1) -> str:
    """A fraction as a percentage, '-' when missing."""
    if x is None or not math.isfinite(x):
        return "-"
    return f"{100 * x:.{digits}f}"


def pct_pm(mean: float | None, std: float | None, digits: int = 1) -> str:
    """'41.2 ± 1.3' (percent); the spread is left out when there is one seed."""
    if std is None or not math.isfinite(std):
        return pct(mean, digits)
    return f"{pct(mean, digits)} ± {pct(std, digits)}"


def fmt(x: float | None, digits: int = 1) -> str:
    """A number with `digits` decimals, '-' when missing."""
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"
