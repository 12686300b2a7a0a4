"""Do the loss terms fight? Each term's gradient on the backbone over training, from the runs of the
learning-curve study (evidence.convergence) that logged gradient diagnostics.

    python -m evidence.gradients --workdir runs/evidence --steps 6400 [--seed 0]

A run logs them when trained with `--config.train.grad_diag_every=N` (steps.grad_diagnostics: every
N steps, the norm of each weighted loss term's gradient on the backbone's parameters and its cosine
with the fused CE's). This reads the 'grad' lines of every variant's run at `--steps` and `--seed`
and writes `<workdir>/gradients/`: gradients.json (the series), gradients.md (a table: each term's
norm relative to the CE's and its cosine with the CE's, early and late in training) and
gradients.png (the series, one column per variant).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import flags

from evidence import common, convergence
from marnet_jax import cli, reporting
from marnet_jax.train import metrics

PROG = "evidence.gradients"

STUDY = "gradients"
EARLY = 0.1  # the first 10 % of the steps
LATE = 0.5  # the last half


def read_series(run_dir: Path) -> dict[str, dict[str, list[float]]]:
    """{term: {'step': [...], 'norm': [...], 'cos_ce': [...]}} from a run's metrics.jsonl."""
    lines = metrics.read_metrics(run_dir)
    grad = sorted((x for x in lines if x["split"] == "grad"), key=lambda x: x["step"])
    out: dict[str, dict[str, list[float]]] = {}
    new = lambda: {"step": [], "norm": [], "cos_ce": []}
    for x in grad:
        for key, value in x.items():
            if key == "grad/total_norm" or not key.startswith("grad/"):
                continue
            if key.endswith("_norm"):
                series = out.setdefault(key[len("grad/") : -len("_norm")], new())
                series["step"].append(x["step"])
                series["norm"].append(value)
            elif key.endswith("_cos_ce"):
                out.setdefault(key[len("grad/") : -len("_cos_ce")], new())["cos_ce"].append(value)
    return out


def _window_mean(steps: list[int], values: list[float], lo: float, hi: float) -> float | None:
    chosen = [v for s, v in zip(steps, values) if lo <= s < hi]
    return sum(chosen) / len(chosen) if chosen else None


def summarise(series: Mapping[str, Mapping[str, list[float]]], num_steps: int) -> list[dict]:
    """Per auxiliary term: norm relative to the CE's and cosine with the CE's, early and late."""
    ce = series.get("ce")
    rows = []
    for term, s in series.items():
        if term == "ce" or ce is None:
            continue
        ratio = [n / c if c else float("nan") for n, c in zip(s["norm"], ce["norm"])]
        row = {"term": term}
        for name, lo, hi in (
            ("early", 0, EARLY * num_steps),
            ("late", LATE * num_steps, num_steps),
        ):
            row[f"ratio_{name}"] = _window_mean(s["step"], ratio, lo, hi)
            row[f"cos_{name}"] = _window_mean(s["step"], s["cos_ce"], lo, hi)
        rows.append(row)
    return rows


def run(workdir: str | Path, steps: int, seed: int = 0) -> dict[str, Any]:
    workdir = Path(workdir)
    report_path = workdir / convergence.STUDY / f"{convergence.STUDY}.json"
    if not report_path.exists():
        raise FileNotFoundError(f"{report_path} not found: run evidence.convergence first.")
    curves = json.loads(report_path.read_text())
    report: dict[str, Any] = {"study": STUDY, "steps": steps, "seed": seed, "variants": {}}
    for row in curves["rows"]:
        run_dir = convergence.run_dir(workdir, row["variant"], steps, seed)
        if row["steps"] != steps or not (run_dir / "metrics.jsonl").exists():
            continue
        series = read_series(run_dir)
        if series:
            report["variants"][row["variant"]] = {
                "protocol": row["protocol"],
                "series": series,
                "summary": summarise(series, steps),
            }
    if not report["variants"]:
        raise common.UsageError(
            f"No run of {steps} steps (seed {seed}) in {workdir / convergence.STUDY} logged "
            "gradient diagnostics (train with --config.train.grad_diag_every=N)."
        )
    report["provenance"] = curves["provenance"]
    common.write_study(workdir, STUDY, report, markdown(report), plot=plot)
    return report


def _fmt(x: float | None, pattern: str) -> str:
    return "-" if x is None else pattern.format(x)


def markdown(report: Mapping[str, Any]) -> str:
    rows = [
        [
            label,
            v["protocol"],
            r["term"],
            _fmt(r["ratio_early"], "{:.2f}"),
            _fmt(r["ratio_late"], "{:.2f}"),
            _fmt(r["cos_early"], "{:+.2f}"),
            _fmt(r["cos_late"], "{:+.2f}"),
        ]
        for label, v in report["variants"].items()
        for r in v["summary"]
    ]
    header = [
        "variant",
        "protocol",
        "term",
        "norm / CE's, first 10 %",
        "norm / CE's, last 50 %",
        "cosine with CE's, first 10 %",
        "cosine with CE's, last 50 %",
    ]
    text = [
        f"Gradients on the backbone's parameters of each loss term as it enters the total (weight "
        f"and ramp included), seed {report['seed']}, runs of {report['steps']} steps of the "
        "learning-curve study. A cosine below 0 means the term pulls the visual features against "
        "the classification loss.",
        "",
        reporting.markdown_table(header, rows) if rows else "(no auxiliary terms)",
        "",
        f"![gradient norms and cosines over training]({STUDY}.png)",
    ]
    return "\n".join(text) + "\n"


def plot(report: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(report["variants"])
    fig, axes = plt.subplots(2, len(labels), figsize=(4 * len(labels), 6), squeeze=False)
    for j, label in enumerate(labels):
        series = report["variants"][label]["series"]
        for i, term in enumerate(series):
            s = series[term]
            axes[0][j].plot(s["step"], s["norm"], color=f"C{i}", label=term, lw=1)
            if term != "ce":
                axes[1][j].plot(s["step"], s["cos_ce"], color=f"C{i}", label=term, lw=1)
        axes[0][j].set_yscale("log")
        axes[0][j].set_title(f"{label} ({report['variants'][label]['protocol']})")
        axes[0][j].set_ylabel("gradient norm on the backbone")
        axes[1][j].axhline(0.0, color="grey", lw=0.8)
        axes[1][j].set_ylim(-1, 1)
        axes[1][j].set_ylabel("cosine with the CE's gradient")
        axes[1][j].set_xlabel("step")
        axes[0][j].legend(fontsize=7)
        axes[0][j].grid(alpha=0.3)
        axes[1][j].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "workdir", None, "Evidence workdir of evidence.convergence.", flag_values=fv
    )
    flags.DEFINE_integer("steps", None, "The budget whose runs to read.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "The seed whose runs to read.", flag_values=fv)
    flags.mark_flags_as_required(["workdir", "steps"], flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = cli.parse_flags(PROG, _define_flags, argv, "--workdir DIR --steps N", __doc__)
    if rest:
        cli.usage_error(PROG, f"unexpected arguments {rest}.")
    return common.run_cli(PROG, lambda: print(markdown(run(args.workdir, args.steps, args.seed))))


if __name__ == "__main__":
    cli.run(main)
