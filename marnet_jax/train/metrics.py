"""Metric output: JSON lines and TensorBoard event files in the workdir (process 0 only), summary table.

The workdir can be any path etils.epath supports: a local folder, or gs://... on Cloud TPU (which needs
gcsfs installed for epath, and google-cloud-storage for tensorboardX; both are the user's choice and are not
in requirements.txt).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from etils import epath


def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


class MetricWriter:
    """Appends `{"step", "split", **metrics}` lines to metrics.jsonl and scalars to TensorBoard.

    A local metrics.jsonl is kept open in append mode and flushed after every line. Object stores
    (gs://, s3://) cannot append (gcsfs silently turns mode 'a' into an overwrite) and show an object only
    once it is closed, so there the whole file, earlier runs' lines included, is rewritten on each write.
    """

    def __init__(self, workdir: str | epath.Path, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        self._path = None
        self._text = ""  # object stores only: the file's content so far
        if enabled:
            from tensorboardX import SummaryWriter

            workdir = epath.Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self._path = workdir / "metrics.jsonl"
            if _is_local(self._path):
                self._jsonl = self._path.open("a")
            elif self._path.exists():
                self._text = self._path.read_text()
            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        record = {"step": int(step), "split": split, **clean}
        line = json.dumps(record) + "\n"
        if self._jsonl is not None:
            self._jsonl.write(line)
            self._jsonl.flush()
        else:
            self._text += line
            self._path.write_text(self._text)
        for k, v in clean.items():
            if math.isfinite(v):
                self._tb.add_scalar(f"{split}/{k}", v, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            if self._jsonl is not None:
                self._jsonl.close()
            self._tb.close()


def read_lines(workdir: str | epath.Path) -> tuple[list[dict[str, float]], int]:
    """Every readable line of `<workdir>/metrics.jsonl` as logged (a resumed run's repeats
    included), and how many lines could not be read (cut short by a kill mid-write)."""
    path = epath.Path(workdir) / "metrics.jsonl"
    lines, torn = [], 0
    for raw in path.read_text().splitlines() if path.exists() else []:
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            torn += 1
    return lines, torn


def read_metrics(workdir: str | epath.Path) -> list[dict[str, float]]:
    """The lines of `<workdir>/metrics.jsonl`, one per (step, split), in the order logged.

    A run killed and resumed logs the steps after its checkpoint again (the same values: resume is
    exact): the last line of each (step, split) is kept. A line cut short by a kill mid-write is
    skipped.
    """
    lines: dict[tuple[int, str], dict[str, float]] = {}
    for x in read_lines(workdir)[0]:
        key = (x["step"], x["split"])
        lines.pop(key, None)
        lines[key] = x
    return list(lines.values())


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
