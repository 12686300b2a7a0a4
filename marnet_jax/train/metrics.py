"""Metric output: JSON lines and TensorBoard event files in the workdir (process 0 only), summary table."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from etils import epath


class MetricWriter:
    """Appends `{"step", "split", **metrics}` lines to metrics.jsonl and scalars to TensorBoard."""

    def __init__(self, workdir: str | epath.Path, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter

            workdir = epath.Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(workdir / "metrics.jsonl", "a")
            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        record = {"step": int(step), "split": split, **clean}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in clean.items():
            if math.isfinite(v):
                self._tb.add_scalar(f"{split}/{k}", v, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def summary_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table of accuracies: one row per split, columns like fused_top1 (in %)."""
    columns = sorted({k for r in results.values() for k in r if k.endswith(("top1", "top5"))})
    lines = [
        "| split | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for split, r in results.items():
        cells = [f"{100 * r[c]:.2f}" if c in r else "-" for c in columns]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
