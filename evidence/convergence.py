"""Learning curves: accuracy against the training budget, to compare variants at convergence.

    python -m evidence.convergence --config configs/default.py --workdir runs/evidence \
        [--budgets 1600,3200,6400,12800] [--variants baseline,full] [--seeds 0]
        [--extra_variant 'full_joint=full protocol=joint'] [--budgets_of full_joint=1600,6400]

Every (variant, budget, seed) is a normal training run with `train.num_steps` set to the budget
(its learning-rate schedule spans the whole budget: each point is a finished run, not a snapshot of
a longer one); `--budgets_of` gives some variants budgets of their own. Variants and extra variants
are named as in evidence.ablation. A variant has
converged at the smallest budget whose validation top-1 is within `--tolerance` points of its
best; the comparison at convergence reads the runs of that budget. Rerunning skips finished runs
and resumes an interrupted one. Writes `<workdir>/convergence/`: convergence.json, .csv, .md and
.png (validation top-1 against the budget).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags

from evidence import ablation, common
from marnet_jax import cli, reporting

log = logging.getLogger("marnet_jax")

STUDY = "convergence"
CSV_COLUMNS = [
    "variant",
    "steps",
    "num_seeds",
    "seeds",
    "val_fused_top1_mean",
    "val_fused_top1_std",
    "test_fused_top1_mean",
    "test_fused_top1_std",
    "train_wall_s_mean",
]


def run_dir(workdir: Path, label: str, steps: int, seed: int) -> Path:
    return workdir / STUDY / "runs" / label / f"steps_{steps}" / f"seed_{seed}"


def _mean_std(runs: Sequence[Mapping[str, Any]], split: str) -> tuple[float, float]:
    return common.mean_std([r[split]["fused_top1"] for r in runs])


def converged_at(rows: Sequence[Mapping[str, Any]], tolerance: float) -> int | None:
    """The smallest budget whose mean validation top-1 is within `tolerance` (a fraction) of the
    best budget's, or None when that cannot be told: one budget only, or the largest budget still
    gained more than `tolerance` over the one before it."""
    rows = sorted(rows, key=lambda r: r["steps"])
    if len(rows) < 2 or rows[-1]["val_mean"] - rows[-2]["val_mean"] > tolerance:
        return None
    best = max(r["val_mean"] for r in rows)
    return min(r["steps"] for r in rows if r["val_mean"] >= best - tolerance)


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    budgets: Sequence[int],
    variants: Sequence[str],
    seeds: Sequence[int],
    extra_variants: Sequence[str] = (),
    budgets_of: Mapping[str, Sequence[int]] | None = None,
    tolerance: float = 0.01,
    command: str = "",
) -> dict[str, Any]:
    """Trains what is missing, then writes convergence.json/.csv/.md/.png; returns the record."""
    workdir = Path(workdir)
    common.check_seeds(seeds, "--seeds")
    if not budgets or min(budgets) < 1:
        raise common.UsageError(f"--budgets must be positive step counts, got {list(budgets)}.")
    plan = ablation.variant_plan(variants, extra_variants)
    budgets_of = dict(budgets_of or {})
    unknown = sorted(set(budgets_of) - set(plan))
    if unknown:
        raise common.UsageError(f"--budgets_of names {unknown}, not trained here ({sorted(plan)}).")
    configs = {
        (label, n, s): ablation.variant_config(config, base, {**ov, "train.num_steps": n}, s)
        for label, (base, ov) in plan.items()
        for n in sorted(budgets_of.get(label, budgets))
        for s in seeds
    }
    prov = common.Provenance(command, config, seeds)
    records: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for i, ((label, n, s), cfg) in enumerate(configs.items(), 1):
        d = run_dir(workdir, label, n, s)
        log.info(
            "Convergence run %d/%d: %s, %d steps, seed %d in %s", i, len(configs), label, n, s, d
        )
        records.setdefault((label, n), []).append(ablation.train_run(cfg, d))

    report: dict[str, Any] = {
        "study": STUDY,
        "budgets": sorted(budgets),
        "rows": [],
        "variants": {},
    }
    for (label, n), runs in records.items():
        val_mean, val_std = _mean_std(runs, "validation")
        test_mean, test_std = _mean_std(runs, "test")
        report["rows"].append(
            {
                "variant": label,
                "protocol": ablation.protocol_of(configs[label, n, seeds[0]]),
                "overrides": plan[label][1],
                "steps": n,
                "seeds": [r["seed"] for r in runs],
                "val_mean": val_mean,
                "val_std": val_std,
                "test_mean": test_mean,
                "test_std": test_std,
                "train_wall_s_mean": common.mean_std([r["train_wall_s"] for r in runs])[0],
                "runs": [{k: x for k, x in r.items() if k != "config"} for r in runs],
            }
        )
    for label in plan:
        rows = [r for r in report["rows"] if r["variant"] == label]
        report["variants"][label] = {"converged_at": converged_at(rows, tolerance)}
    report["tolerance"] = tolerance
    report["provenance"] = prov.finish()
    common.write_study(
        workdir, STUDY, report, markdown(report), (CSV_COLUMNS, csv_rows(report)), plot
    )
    return report


def csv_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "variant": r["variant"],
            "steps": r["steps"],
            "num_seeds": len(r["seeds"]),
            "seeds": r["seeds"],
            "val_fused_top1_mean": r["val_mean"],
            "val_fused_top1_std": r["val_std"],
            "test_fused_top1_mean": r["test_mean"],
            "test_fused_top1_std": r["test_std"],
            "train_wall_s_mean": r["train_wall_s_mean"],
        }
        for r in report["rows"]
    ]


def markdown(report: Mapping[str, Any]) -> str:
    """The learning-curve fragment of docs/results.md: the table, where each variant converged,
    and the plot."""
    rows = [
        [
            r["variant"] + (f" ({ablation.overrides_text(r)})" if r["overrides"] else ""),
            r["protocol"],
            r["steps"],
            ", ".join(str(s) for s in r["seeds"]),
            reporting.pct_pm(r["val_mean"], r["val_std"]),
            reporting.pct_pm(r["test_mean"], r["test_std"]),
            f"{r['train_wall_s_mean'] / 60:.1f}",
        ]
        for r in sorted(report["rows"], key=lambda r: (r["variant"], r["steps"]))
    ]
    header = ["variant", "protocol", "steps", "seeds", "val top-1", "test top-1", "wall (min/run)"]
    tol = 100 * report["tolerance"]
    text = [
        "Fused top-1 (%) of runs trained for each budget (every run's schedule spans its own "
        "budget), mean ± sample std over seeds.",
        "",
        reporting.markdown_table(header, rows),
        "",
        f"Converged (validation top-1 within {tol:g} point(s) of the variant's best budget):",
        "",
    ]
    for label, v in report["variants"].items():
        budgets = sorted(r["steps"] for r in report["rows"] if r["variant"] == label)
        if v["converged_at"] is not None:
            text.append(f"- {label}: from {v['converged_at']} steps.")
        elif len(budgets) < 2:
            text.append(f"- {label}: not known (one budget only, {budgets[0]} steps).")
        else:
            text.append(f"- {label}: not by {budgets[-1]} steps (still rising).")
    text += ["", f"![validation top-1 against the training budget]({STUDY}.png)"]
    return "\n".join(text) + "\n"


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Validation (solid) and test (dashed) fused top-1 against the budget, one colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, label in enumerate(report["variants"]):
        rows = sorted(
            (r for r in report["rows"] if r["variant"] == label), key=lambda r: r["steps"]
        )
        x = [r["steps"] for r in rows]
        colour = f"C{i}"
        ax.plot(x, [100 * r["val_mean"] for r in rows], "o-", color=colour, label=f"{label} (val)")
        ax.plot(x, [100 * r["test_mean"] for r in rows], "s--", color=colour, alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xticks(report["budgets"])
    ax.set_xticklabels([str(b) for b in report["budgets"]])
    ax.set_xlabel("training steps (the whole schedule)")
    ax.set_ylabel("fused top-1 (%): validation solid, test dashed")
    ax.set_title(f"Learning curves ({report['provenance']['config']['dataset']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_list(
        "budgets", ["1600", "3200", "6400", "12800"], "Training budgets (steps).", flag_values=fv
    )
    flags.DEFINE_list("variants", ["baseline", "full"], "Variants to train.", flag_values=fv)
    flags.DEFINE_list("seeds", ["0"], "Seeds (config.seed) of every variant.", flag_values=fv)
    flags.DEFINE_multi_string(
        "extra_variant",
        None,
        "Another variant, as in evidence.ablation. Repeatable.",
        flag_values=fv,
    )
    flags.DEFINE_multi_string(
        "budgets_of",
        None,
        "Budgets of some variants instead of --budgets: 'VARIANT[,VARIANT...]=STEPS[,STEPS...]'.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "tolerance", 1.0, "Converged: within this many points of the best budget.", flag_values=fv
    )


def _run_from_flags(f: flags.FlagValues) -> Path:
    run(
        f.config,
        f.workdir,
        budgets=common.parse_ints(f.budgets, "--budgets"),
        variants=f.variants,
        seeds=common.parse_ints(f.seeds, "--seeds"),
        extra_variants=f.extra_variant or (),
        budgets_of=common.parse_ints_of(f.budgets_of or (), "--budgets_of"),
        tolerance=f.tolerance / 100.0,
        command=common.command_line(),
    )
    return Path(f.workdir) / STUDY / f"{STUDY}.md"


def main(argv: Sequence[str] | None = None) -> int:
    return common.study_cli(
        "evidence.convergence", _define_flags, _run_from_flags, argv, training=True, doc=__doc__
    )


if __name__ == "__main__":
    cli.run(main)
