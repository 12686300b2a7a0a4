"""Low-data study: variants trained on a fixed fraction of the training split, over several seeds.

    python -m evidence.low_data --config configs/default.py --workdir runs/evidence \
        [--fractions 0.1,0.3,1.0] [--variants baseline,aux,full] [--seeds 0,1,2]
        [--extra_variant 'full=full loss.w_mse=0.3'] [--seeds_at 0.1=0,1,2,3,4]
        [--setting_at '0.1:full=full loss.w_mse=0.3'] [--steps_at 0.1=1600]

Privileged text should matter most when images are few. Every (variant, fraction, seed) is a normal
training run with `data.train_fraction` set (a fixed random subset, the same for every seed and
variant, nested across fractions). Variants and extra variants are named as in evidence.ablation
(the same label for the same settings in both studies). `--setting_at` gives a label another setting at
one fraction (the one its search on that share of the data chose on validation); `--seeds_at` gives a
fraction seeds of its own (more where the comparison is closest), `--steps_at` a training budget of its
own (where its search found the models stop learning). Runs of fraction 1.0 are the ablation's own
(`<workdir>/ablation/runs/<variant>/seed_<s>/`): trained once, shared by both studies. Rerunning skips
finished runs and resumes an interrupted one. Writes `<workdir>/low_data/`: low_data.json (every run,
summaries, paired comparisons per fraction), low_data.csv, low_data.md and low_data.png (fused test
top-1 against the fraction).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags

from evidence import ablation, common
from marnet_jax import cli, reporting

log = logging.getLogger("marnet_jax")

STUDY = "low_data"
# (name, variant, reference): compared at every fraction, paired by seed.
COMPARISONS = (
    ("MARNet against the baseline", "full", "baseline"),
    ("MARNet against the ingredient head", "full", "aux"),
    ("Ingredient head against the baseline", "aux", "baseline"),
    ("MARNet against distillation", "full", "distill"),
    ("Distillation against the baseline", "distill", "baseline"),
)
CSV_COLUMNS = ["variant", "fraction", "num_train", "num_seeds", "seeds"] + [
    f"{h}_top1_{s}" for h in ablation.HEADS for s in ("mean", "std")
]


def run_dir(workdir: Path, variant: str, fraction: float, seed: int) -> Path:
    """Where a run lives: the ablation's folder at fraction 1.0, this study's otherwise."""
    if fraction == 1.0:
        return workdir / common.ABLATION / "runs" / variant / f"seed_{seed}"
    return workdir / STUDY / "runs" / variant / f"frac_{fraction:g}" / f"seed_{seed}"


def _parse_fractions(values: Sequence[str], flag: str = "--fractions") -> list[float]:
    try:
        fractions = sorted({float(v) for v in values})
    except ValueError as e:
        raise common.UsageError(f"{flag} must be numbers, got {list(values)}.") from e
    if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
        raise common.UsageError(f"{flag} must be in (0, 1], got {list(values)}.")
    return fractions


def parse_setting_at(specs: Sequence[str]) -> dict[tuple[float, str], tuple[str, dict[str, Any]]]:
    """['0.1:full=full loss.w_mse=0.3', ...] -> {(0.1, 'full'): ('full', {'loss.w_mse': 0.3})}."""
    out: dict[tuple[float, str], tuple[str, dict[str, Any]]] = {}
    for spec in specs:
        fraction, sep, variant = spec.partition(":")
        if not sep:
            raise common.UsageError(
                f"--setting_at {spec!r}: expected 'FRACTION:LABEL=BASE field=value ...'."
            )
        (f,) = _parse_fractions([fraction], "--setting_at's fraction")
        label, base, overrides = ablation.parse_extra_variant(variant)
        if (f, label) in out:
            raise common.UsageError(f"--setting_at gives {label!r} at {f:g} twice.")
        out[(f, label)] = (base, overrides)
    return out


def parse_at(specs: Sequence[str], flag: str) -> dict[float, list[int]]:
    """['0.1=0,1,2,3,4', ...] -> {0.1: [0, 1, 2, 3, 4]}: a fraction's own integers (--seeds_at,
    --steps_at)."""
    out: dict[float, list[int]] = {}
    for key, values in common.parse_ints_of(specs, flag, key="FRACTION").items():
        (f,) = _parse_fractions([key], f"{flag}'s fraction")
        if f in out:
            raise common.UsageError(f"{flag} names the fraction {f:g} twice.")
        out[f] = values
    return out


def parse_steps_at(specs: Sequence[str]) -> dict[float, int]:
    """['0.1=1600', ...] -> {0.1: 1600}."""
    out = {}
    for f, values in parse_at(specs, "--steps_at").items():
        if len(values) != 1 or values[0] < 1:
            raise common.UsageError(f"--steps_at {f:g}: expected one positive number of steps.")
        out[f] = values[0]
    return out


@dataclasses.dataclass(frozen=True)
class AtFraction:
    """What a study sets per share of the data: {(fraction, label): (base, overrides)} (the
    setting its search chose there), {fraction: seeds} and {fraction: train steps}."""

    settings: Mapping[tuple[float, str], tuple[str, Mapping[str, Any]]] = dataclasses.field(
        default_factory=dict
    )
    seeds: Mapping[float, Sequence[int]] = dataclasses.field(default_factory=dict)
    steps: Mapping[float, int] = dataclasses.field(default_factory=dict)


def plan_runs(
    config: ml_collections.ConfigDict,
    fractions: Sequence[float],
    variants: Sequence[str],
    seeds: Sequence[int],
    extra_variants: Sequence[str] = (),
    at: AtFraction = AtFraction(),
) -> dict[tuple[str, float, int], tuple[dict[str, Any], ml_collections.ConfigDict]]:
    """{(label, fraction, seed): (the setting's overrides, its config)} of the study: each label's
    setting over `seeds` for the config's train.num_steps, or what `at` gives that fraction."""
    common.check_seeds(seeds, "--seeds")
    settings = ablation.variant_plan(variants, extra_variants)
    for f, own in at.seeds.items():
        common.check_seeds(own, f"--seeds_at {f:g}")
    for (f, label), (base, _) in at.settings.items():
        if f not in fractions or label not in settings or settings[label][0] != base:
            raise common.UsageError(
                f"--setting_at {f:g}:{label}={base}: expected a fraction of {list(fractions)} and "
                f"a label trained here with its own base variant "
                f"({ {k: b for k, (b, _) in settings.items()} })."
            )
    for flag, given in (("--seeds_at", at.seeds), ("--steps_at", at.steps)):
        unknown = sorted(set(given) - set(fractions))
        if unknown:
            raise common.UsageError(
                f"{flag} names {unknown}, not in --fractions {list(fractions)}."
            )
    plan = {}
    for label in settings:
        for f in fractions:
            base, overrides = at.settings.get((f, label), settings[label])
            budget = {"train.num_steps": at.steps[f]} if f in at.steps else {}
            for s in at.seeds.get(f, seeds):
                cfg = ablation.variant_config(
                    config, base, {**overrides, **budget, "data.train_fraction": f}, s
                )
                plan[(label, f, s)] = (dict(overrides), cfg)
    return plan


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    fractions: Sequence[float],
    variants: Sequence[str],
    seeds: Sequence[int],
    extra_variants: Sequence[str] = (),
    at: AtFraction = AtFraction(),
    command: str = "",
) -> dict[str, Any]:
    """Trains what is missing, then writes low_data.json/.csv/.md/.png; returns the JSON record."""
    workdir = Path(workdir)
    plan = plan_runs(config, fractions, variants, seeds, extra_variants, at)
    prov = common.Provenance(command, config, sorted({s for (_, _, s) in plan}))
    records: dict[tuple[str, float], dict[int, dict[str, Any]]] = {}
    for i, ((v, f, s), (_, cfg)) in enumerate(plan.items(), 1):
        d = run_dir(workdir, v, f, s)
        log.info("Low-data run %d/%d: %s, fraction %g, seed %d in %s", i, len(plan), v, f, s, d)
        records.setdefault((v, f), {})[s] = ablation.train_run(cfg, d)
    # Every seed of a (variant, fraction) has the same setting and budget.
    setting = {(v, f): (ov, cfg.train.num_steps) for (v, f, _), (ov, cfg) in plan.items()}

    from marnet_jax.data import datasets

    num_train = datasets.prepare(config.data).split_sizes[config.data.train_split]
    report: dict[str, Any] = {"study": STUDY, "fractions": list(fractions), "rows": []}
    for (v, f), runs in records.items():
        report["rows"].append(
            {
                "variant": v,
                "fraction": f,
                "num_train": round(f * num_train),
                "seeds": sorted(runs),
                "overrides": setting[(v, f)][0],
                "steps": setting[(v, f)][1],
                "summary": ablation.summarise([runs[s] for s in sorted(runs)]),
                "runs": [{k: x for k, x in r.items() if k != "config"} for r in runs.values()],
            }
        )
    report["comparisons"] = [
        c | {"fraction": f}
        for f in fractions
        for name, a, b in COMPARISONS
        if (a, f) in records and (b, f) in records
        for c in [ablation.compare(name, records[(a, f)], records[(b, f)], a, b)]
        if c is not None
    ]
    report["provenance"] = prov.finish()
    common.write_study(
        workdir, STUDY, report, markdown(report), (CSV_COLUMNS, csv_rows(report)), plot
    )
    return report


def csv_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "variant": r["variant"],
            "fraction": r["fraction"],
            "num_train": r["num_train"],
            "num_seeds": len(r["seeds"]),
            "seeds": r["seeds"],
            **{k: v for k, v in r["summary"].items() if "_top1_" in k},
        }
        for r in report["rows"]
    ]


def markdown(report: Mapping[str, Any]) -> str:
    """The low-data fragment of docs/results.md: a table, the paired verdicts and the plot."""
    rows = [
        [
            r["variant"],
            f"{100 * r['fraction']:g} % ({r['num_train']})",
            len(r["seeds"]),
            reporting.pct_pm(
                r["summary"].get("fused_top1_mean"), r["summary"].get("fused_top1_std")
            ),
            reporting.pct_pm(
                r["summary"].get("visual_top1_mean"), r["summary"].get("visual_top1_std")
            ),
            reporting.pct_pm(r["summary"].get("cdr_top1_mean"), r["summary"].get("cdr_top1_std")),
            r.get("steps", "?"),
            ablation.overrides_text({"overrides": r.get("overrides", {})}) or "-",
        ]
        for r in sorted(report["rows"], key=lambda r: (r["fraction"], r["variant"]))
    ]
    header = [
        "variant",
        "training images",
        "seeds",
        "fused top-1",
        "visual probe",
        "CDR head",
        "train steps",
        "setting (overrides)",
    ]
    text = [
        "Test top-1 (%) by the fraction of the training split trained on (a fixed random subset, "
        "the same for every seed and variant), mean ± sample std over seeds.",
        "",
        reporting.markdown_table(header, rows),
        "",
        "Paired by seed (fused test top-1):",
        "",
    ]
    for c in report["comparisons"]:
        text.append(
            f"- {100 * c['fraction']:g} % of the data, {c['name']} ({c['variant']} vs "
            f"{c['reference']}): **{c['verdict']}**; {reporting.pct(c['variant_mean'])} vs "
            f"{reporting.pct(c['reference_mean'])} %, difference "
            f"{reporting.pct_pm(c['delta_mean'], c['delta_std'])} points."
        )
    text += ["", f"![fused test top-1 against the training fraction]({STUDY}.png)"]
    return "\n".join(text) + "\n"


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Fused test top-1 (mean ± std over seeds) against the fraction, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for v in dict.fromkeys(r["variant"] for r in report["rows"]):
        rows = sorted((r for r in report["rows"] if r["variant"] == v), key=lambda r: r["fraction"])
        x = [100 * r["fraction"] for r in rows]
        y = [100 * r["summary"]["fused_top1_mean"] for r in rows]
        e = [100 * (r["summary"].get("fused_top1_std") or 0.0) for r in rows]
        e = [0.0 if x != x else x for x in e]  # NaN (one seed) -> no bar
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=v)
    ax.set_xscale("log")
    ax.set_xticks([100 * f for f in report["fractions"]])
    ax.set_xticklabels([f"{100 * f:g}" for f in report["fractions"]])
    ax.set_xlabel("training images (% of the training split)")
    ax.set_ylabel("fused test top-1 (%)")
    ax.set_title(f"Low-data study ({report['provenance']['config']['dataset']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_list(
        "fractions", ["0.1", "0.3", "1.0"], "Fractions of the training split.", flag_values=fv
    )
    flags.DEFINE_list("variants", ["baseline", "aux", "full"], "Variants to train.", flag_values=fv)
    flags.DEFINE_list(
        "seeds", ["0", "1", "2"], "Seeds (config.seed) of every variant.", flag_values=fv
    )
    flags.DEFINE_multi_string(
        "extra_variant",
        None,
        "Another variant, as in evidence.ablation. Repeatable.",
        flag_values=fv,
    )
    flags.DEFINE_multi_string(
        "setting_at",
        None,
        "'FRACTION:LABEL=BASE field=value ...': LABEL's setting at that fraction. Repeatable.",
        flag_values=fv,
    )
    flags.DEFINE_multi_string(
        "seeds_at",
        None,
        "'FRACTION=SEED,SEED,...': the seeds of every variant at that fraction. Repeatable.",
        flag_values=fv,
    )
    flags.DEFINE_multi_string(
        "steps_at",
        None,
        "'FRACTION=STEPS': train.num_steps at that fraction (its search's budget). Repeatable.",
        flag_values=fv,
    )


def _run_from_flags(f: flags.FlagValues) -> Path:
    run(
        f.config,
        f.workdir,
        fractions=_parse_fractions(f.fractions),
        variants=f.variants,
        seeds=common.parse_ints(f.seeds, "--seeds"),
        extra_variants=f.extra_variant or (),
        at=AtFraction(
            settings=parse_setting_at(f.setting_at or ()),
            seeds=parse_at(f.seeds_at or (), "--seeds_at"),
            steps=parse_steps_at(f.steps_at or ()),
        ),
        command=common.command_line(),
    )
    return Path(f.workdir) / STUDY / f"{STUDY}.md"


def main(argv: Sequence[str] | None = None) -> int:
    return common.study_cli(
        "evidence.low_data", _define_flags, _run_from_flags, argv, training=True, doc=__doc__
    )


if __name__ == "__main__":
    cli.run(main)
