"""Robustness: accuracy of trained models under test-time corruptions at 5 severities.

    python -m evidence.robustness --config configs/default.py --workdir runs/evidence \
        [--variants baseline,full] [--seeds 0,1,2] [--num_examples 1000 (0: the whole split)]

Reads the runs of `evidence.ablation` (same --config and --workdir) and evaluates every
head (fused, visual probe, CDR) of each on the test split, clean and under each corruption of
`corruptions.SEVERITIES` (lighting: brightness, contrast, colour cast; viewpoint: rotation,
crop/scale; camera: blur, Gaussian noise; clutter: occlusion) at severities 1..5. The corrupted
images are a pure function of --corruption_seed. Summaries: mean corruption accuracy (mCA: the mean
over corruptions and severities) and the relative drop (clean - mCA) / clean, per seed, then mean ±
std over seeds; paired verdicts against the baseline, overall and per nuisance group.

Writes to `<workdir>/robustness/`: robustness.json (everything, with provenance), robustness.csv
(long format), robustness.md (the fragment of docs/results.md), robustness.png (fused top-1 against
severity, one panel per corruption, one line per model) and corruptions.png (one test image under
every corruption and severity). Per-run results are cached in runs/ so a killed study continues.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import flags

from evidence import common, corruptions
from marnet_jax import cli, reporting

log = logging.getLogger("marnet_jax")

STUDY = "robustness"
OUTPUTS = ("logits", "visual_logits", "cdr_logits")
CSV_COLUMNS = [
    "model",
    "head",
    "corruption",
    "group",
    "severity",
    "num_seeds",
    "top1_mean",
    "top1_std",
    "top5_mean",
    "top5_std",
]


def config_name(command: str) -> str:
    """The --config value of a command line ('configs/default.py:full'), or 'config'."""
    args = shlex.split(command) if command else []
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return "config"


# --------------------------------------------------------------------------------------------------
# Evaluation of one run.


def evaluate_run(
    run_dir: Path,
    config: ml_collections.ConfigDict,
    *,
    names: Sequence[str],
    severities: Sequence[int],
    split: str,
    corruption_seed: int,
    cache: Path,
) -> dict[str, Any]:
    """{'clean': accuracies, 'corrupted': {name: {severity: accuracies}}} of one trained run, read
    from `cache` when it holds the same settings and checkpoint."""

    settings = {
        "run_dir": str(run_dir.resolve()),
        "step": common.latest_step(run_dir),
        "split": split,
        "corruptions": list(names),
        "severities": list(severities),
        "corruption_seed": corruption_seed,
    }
    if cache.exists():
        cached = reporting.read_json(cache, "")
        if cached.get("settings") == settings:
            log.info("%s: cached results reused.", run_dir)
            return cached
    trained = common.load_run(run_dir, common.run_config(run_dir, config))
    if trained.step != settings["step"]:
        raise RuntimeError(
            f"{run_dir}: restored step {trained.step}, newest is {settings['step']}."
        )
    fn = common.predict_fn(trained, OUTPUTS)
    result: dict[str, Any] = {"settings": settings, "corrupted": {}}
    clean = common.predict(trained, fn, split)
    result["clean"] = common.head_accuracies(clean)
    result["num_examples"] = len(clean["label"])
    for name in names:
        result["corrupted"][name] = {}
        for s in severities:
            out = common.predict(
                trained,
                fn,
                split,
                extra_transforms=[corruptions.Corrupt(name, s)],
                transform_seed=corruption_seed,
            )
            result["corrupted"][name][str(s)] = common.head_accuracies(out)
        log.info(
            "%s %s: fused top-1 clean %.3f, severities %s",
            run_dir.name,
            name,
            result["clean"]["fused_top1"],
            [round(result["corrupted"][name][str(s)]["fused_top1"], 3) for s in severities],
        )
    reporting.write_json(cache, result)
    return result


# --------------------------------------------------------------------------------------------------
# Summaries.


def mca(
    result: Mapping[str, Any], head: str = "fused", names: Sequence[str] | None = None
) -> float:
    """Mean top-1 of `head` over the corruptions `names` (default: all) and their severities."""
    names = list(result["corrupted"]) if names is None else names
    values = [r[f"{head}_top1"] for n in names for r in result["corrupted"][n].values()]
    return float(np.mean(values))


def relative_drop(result: Mapping[str, Any], head: str = "fused", names=None) -> float:
    """(clean - mCA) / clean: the fraction of the clean accuracy that the corruptions take away."""
    clean = result["clean"][f"{head}_top1"]
    return (clean - mca(result, head, names)) / clean if clean > 0 else float("nan")


def groups(names: Sequence[str]) -> dict[str, list[str]]:
    """{'all': names, 'lighting': [...], 'viewpoint': [...], ...} restricted to `names`."""
    out = {"all": list(names)}
    for n in names:
        out.setdefault(corruptions.GROUPS[n], []).append(n)
    return out


def summarise_model(per_seed: Mapping[int, Mapping[str, Any]], names: Sequence[str]) -> dict:
    """Per head: clean and per (corruption, severity) mean/std over seeds; per group: mCA and
    relative drop per seed and their mean/std."""
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    heads = [h for h in common.HEADS if f"{h}_top1" in first["clean"]]
    out: dict[str, Any] = {"seeds": seeds, "heads": {}}
    for head in heads:
        h: dict[str, Any] = {"curves": {}, "groups": {}}
        for metric in ("top1", "top5"):
            key = f"{head}_{metric}"
            h[f"clean_{metric}"] = common.mean_std([per_seed[s]["clean"][key] for s in seeds])
        for n in names:
            sev = sorted(first["corrupted"][n], key=int)
            h["curves"][n] = {
                sv: {
                    metric: common.mean_std(
                        [per_seed[s]["corrupted"][n][sv][f"{head}_{metric}"] for s in seeds]
                    )
                    for metric in ("top1", "top5")
                }
                for sv in sev
            }
        for group, members in groups(names).items():
            m = {s: mca(per_seed[s], head, members) for s in seeds}
            d = {s: relative_drop(per_seed[s], head, members) for s in seeds}
            h["groups"][group] = {
                "mca_per_seed": m,
                "relative_drop_per_seed": d,
                "mca": common.mean_std(list(m.values())),
                "relative_drop": common.mean_std(list(d.values())),
            }
        out["heads"][head] = h
    return out


def compare_to_baseline(
    summaries: Mapping[str, Mapping[str, Any]], reference: str = "baseline"
) -> list[dict[str, Any]]:
    """Paired by seed, fused head: relative drop and mCA of each model against `reference`."""
    if reference not in summaries:
        return []
    ref = summaries[reference]["heads"]["fused"]["groups"]
    out = []
    for label, summary in summaries.items():
        if label == reference:
            continue
        ours = summary["heads"]["fused"]["groups"]
        for group in ours:
            seeds = sorted(set(ours[group]["mca_per_seed"]) & set(ref[group]["mca_per_seed"]))
            if not seeds:
                continue
            drop_gain = [
                ref[group]["relative_drop_per_seed"][s] - ours[group]["relative_drop_per_seed"][s]
                for s in seeds
            ]
            mca_gain = [
                ours[group]["mca_per_seed"][s] - ref[group]["mca_per_seed"][s] for s in seeds
            ]
            out.append(
                {
                    "model": label,
                    "reference": reference,
                    "group": group,
                    "seeds": seeds,
                    "relative_drop": ours[group]["relative_drop"],
                    "reference_relative_drop": ref[group]["relative_drop"],
                    "mca": ours[group]["mca"],
                    "reference_mca": ref[group]["mca"],
                    "drop_verdict": common.paired_verdict(
                        drop_gain,
                        "loses less accuracy (more robust)",
                        "loses more accuracy (less robust)",
                    ),
                    "mca_verdict": common.paired_verdict(
                        mca_gain,
                        "higher accuracy under corruption",
                        "lower accuracy under corruption",
                    ),
                }
            )
    return out


# --------------------------------------------------------------------------------------------------
# Outputs.


def csv_rows(summaries: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for label, summary in summaries.items():
        n = len(summary["seeds"])
        for head, h in summary["heads"].items():
            base = {"model": label, "head": head, "num_seeds": n}
            (t1, t1s), (t5, t5s) = h["clean_top1"], h["clean_top5"]
            rows.append(
                base
                | {"corruption": "none", "group": "clean", "severity": 0}
                | {"top1_mean": t1, "top1_std": t1s, "top5_mean": t5, "top5_std": t5s}
            )
            for name, curve in h["curves"].items():
                for sv, m in curve.items():
                    rows.append(
                        base
                        | {"corruption": name, "group": corruptions.GROUPS[name], "severity": sv}
                        | {"top1_mean": m["top1"][0], "top1_std": m["top1"][1]}
                        | {"top5_mean": m["top5"][0], "top5_std": m["top5"][1]}
                    )
    return rows


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Fused top-1 (%) against severity (0 = clean), one panel per corruption plus the mean over
    corruptions, one line per model with a ±1 std band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = report["models"]
    names = report["corruptions"]
    panels = [*names, "mean over corruptions"]
    cols = 3 if len(panels) > 4 else len(panels)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.9), squeeze=False, sharey=True
    )
    for ax, panel in zip(axes.flat, panels):
        for i, (label, summary) in enumerate(summaries.items()):
            h = summary["heads"]["fused"]
            if panel in names:
                sev = sorted(h["curves"][panel], key=int)
                x = [0] + [int(s) for s in sev]
                mean = [h["clean_top1"][0]] + [h["curves"][panel][s]["top1"][0] for s in sev]
                std = [h["clean_top1"][1]] + [h["curves"][panel][s]["top1"][1] for s in sev]
            else:
                sev = sorted(h["curves"][names[0]], key=int)
                x = [0] + [int(s) for s in sev]
                per_sev = [np.mean([h["curves"][n][s]["top1"][0] for n in names]) for s in sev]
                mean, std = [h["clean_top1"][0], *per_sev], [np.nan] * len(x)
            mean, std = 100 * np.asarray(mean, float), 100 * np.asarray(std, float)
            colour = f"C{i}"
            ax.plot(x, mean, marker="o", color=colour, label=_model_label(label, summary))
            if np.any(np.isfinite(std)):
                ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2, lw=0)
        title = panel if panel not in names else f"{panel} ({corruptions.GROUPS[panel]})"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("severity (0 = clean)")
        ax.set_ylabel("fused top-1 (%)")
        ax.set_xticks(range(0, corruptions.MAX_SEVERITY + 1))
        ax.set_ylim(bottom=0)
        ax.yaxis.set_tick_params(labelleft=True)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    top = 1 - 0.4 / fig.get_figheight()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=len(labels),
        fontsize=10,
        bbox_to_anchor=(0.5, top),
    )
    prov = report["provenance"]
    seeds = ", ".join(str(s) for s in prov["seeds"])
    fig.suptitle(
        f"Robustness to test-time corruptions: {config_name(prov['command'])} "
        f"({prov['config']['dataset']}, {prov['config']['train_steps']} steps), seeds {seeds}, "
        f"{report['num_examples']} test images"
        + ("; bands: ±1 std over seeds" if len(prov["seeds"]) > 1 else ""),
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _model_label(label: str, summary: Mapping[str, Any]) -> str:
    names = {"baseline": "baseline (visual only)", "full": "MARNet (EMA + CDR)"}
    return f"{names.get(label, label)}, n={len(summary['seeds'])}"


def plot_examples(
    config: ml_collections.ConfigDict, split: str, names: Sequence[str], seed: int, path: Path
) -> None:
    """One test image under every corruption (rows) at severities 0..5 (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from marnet_jax.data import datasets, pipeline

    element = dict(datasets.source(config.data, split)[0])
    element = pipeline.DecodeImage().map(element)
    resize = pipeline.ResizeCentreCrop(
        config.data.image_size, config.data.eval_crop_ratio, config.data.interpolation
    )
    image = resize.map(element)["image"]
    cols = corruptions.MAX_SEVERITY + 1
    fig, axes = plt.subplots(len(names), cols, figsize=(1.3 * cols + 1.2, 1.3 * len(names) + 0.6))
    axes = np.atleast_2d(axes)
    for i, name in enumerate(names):
        for s in range(cols):
            rng = np.random.default_rng(seed)
            ax = axes[i, s]
            ax.imshow(corruptions.corrupt(image, name, s, rng), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("clean" if s == 0 else f"severity {s}", fontsize=9)
            if s == 0:
                ax.set_ylabel(name.replace("_", " "), fontsize=9)
    fig.suptitle(f"Test-time corruptions ({config.data.name}/{config.data.builder_config})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(report: Mapping[str, Any]) -> str:
    """The robustness fragment: verdicts, summary table, per-corruption table, the plot."""
    summaries = report["models"]
    names = report["corruptions"]
    n = report["num_examples"]
    lines = [
        f"Top-1 (%) on {n} test images, clean and under each corruption at severities 1-5 (mean ± "
        "std over seeds). mCA: mean corruption accuracy over all corruptions and severities; drop: "
        "(clean - mCA) / clean.",
        "",
    ]
    header = ["model", "head", "clean top-1", "mCA", "relative drop"]
    rows = []
    for label, s in summaries.items():
        for head, h in s["heads"].items():
            g = h["groups"]["all"]
            rows.append(
                [
                    _model_label(label, s),
                    head,
                    reporting.pct_pm(*h["clean_top1"]),
                    reporting.pct_pm(*g["mca"]),
                    reporting.pct_pm(*g["relative_drop"]),
                ]
            )
    lines += [reporting.markdown_table(header, rows), ""]
    if report["comparisons"]:
        lines += ["Paired by seed against the baseline (fused head):", ""]
        for c in report["comparisons"]:
            lines.append(
                f"- {c['model']}, {c['group']} corruptions: relative drop "
                f"{reporting.pct_pm(*c['relative_drop'])} % vs {reporting.pct_pm(*c['reference_relative_drop'])} % "
                f"(**{c['drop_verdict']}**); mCA {reporting.pct_pm(*c['mca'])} vs "
                f"{reporting.pct_pm(*c['reference_mca'])} % (**{c['mca_verdict']}**)."
            )
        lines.append("")
    sev = [str(s) for s in report["severities"]]
    header = ["corruption", "model", "clean", *[f"s{s}" for s in sev], "mean"]
    rows = []
    for name in names:
        for label, s in summaries.items():
            h = s["heads"]["fused"]
            curve = [h["curves"][name][v]["top1"][0] for v in sev]
            rows.append(
                [
                    f"{name} ({corruptions.GROUPS[name]})",
                    label,
                    reporting.pct(h["clean_top1"][0]),
                    *[reporting.pct(v) for v in curve],
                    reporting.pct(float(np.mean(curve))),
                ]
            )
    lines += ["Fused top-1 (%) per corruption and severity (mean over seeds):", ""]
    lines += [reporting.markdown_table(header, rows), ""]
    lines += [
        "![fused top-1 against corruption severity](robustness.png)",
        "",
        "![the corruptions at each severity on one test image](corruptions.png)",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The study.


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    variants: Sequence[str] = ("baseline", "full"),
    seeds: Sequence[int] | None = None,
    names: Sequence[str] = corruptions.NAMES,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    split: str | None = None,
    num_examples: int = 1000,
    corruption_seed: int = 0,
    command: str = "",
) -> dict[str, Any]:
    """Evaluates the selected ablation runs under every corruption; writes the study's files."""
    workdir = Path(workdir)
    out_dir = workdir / STUDY
    for name in names:
        if name not in corruptions.SEVERITIES:
            raise common.UsageError(
                f"Unknown corruption {name!r} in --corruptions; expected some of {list(corruptions.NAMES)}."
            )
    bad = [s for s in severities if not 1 <= s <= corruptions.MAX_SEVERITY]
    if bad or not severities or not names:
        raise common.UsageError(
            f"--severities must be some of 1..{corruptions.MAX_SEVERITY} and --corruptions not "
            f"empty; got severities {list(severities)}, corruptions {list(names)}."
        )
    severities = sorted(set(severities))
    split = common.split_with_limit(config.data, split or config.data.test_split, num_examples)
    runs = common.select_runs(common.run_index(workdir), variants, seeds)
    all_seeds = sorted({s for r in runs.values() for s in r})
    prov = common.Provenance(command, common.first_run_config(runs, config), all_seeds)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for label, by_seed in runs.items():
        results[label] = {}
        for s, run_dir in by_seed.items():
            log.info("Robustness: %s seed %d (%s)", label, s, run_dir)
            results[label][s] = evaluate_run(
                run_dir,
                config,
                names=names,
                severities=severities,
                split=split,
                corruption_seed=corruption_seed,
                cache=out_dir / "runs" / f"{label}_seed_{s}.json",
            )
    summaries = {label: summarise_model(r, names) for label, r in results.items()}
    report = {
        "study": STUDY,
        "split": split,
        "num_examples": next(iter(next(iter(results.values())).values()))["num_examples"],
        "corruptions": list(names),
        "groups": {n: corruptions.GROUPS[n] for n in names},
        "severities": severities,
        "severity_table": {n: corruptions.SEVERITIES[n] for n in names},
        "corruption_seed": corruption_seed,
        "runs": {label: {s: str(p) for s, p in r.items()} for label, r in runs.items()},
        "per_seed": results,
        "models": summaries,
        "comparisons": compare_to_baseline(summaries),
    }
    report["provenance"] = prov.finish()
    plot(report, out_dir / "robustness.png")
    plot_examples(config, split, names, corruption_seed, out_dir / "corruptions.png")
    reporting.write_json(out_dir / "robustness.json", report)
    reporting.write_csv(out_dir / "robustness.csv", CSV_COLUMNS, csv_rows(summaries))
    (out_dir / "robustness.md").write_text(markdown(report))
    log.info("Wrote %s/robustness.{json,csv,md,png}", out_dir)
    return report


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_list(
        "variants", ["baseline", "full"], "Ablation variants to evaluate.", flag_values=fv
    )
    flags.DEFINE_list(
        "seeds", [], "Seeds to evaluate (default: every seed the ablation trained).", flag_values=fv
    )
    flags.DEFINE_list(
        "corruptions", list(corruptions.NAMES), "Corruptions to apply.", flag_values=fv
    )
    flags.DEFINE_list("severities", ["1", "2", "3", "4", "5"], "Severities (1..5).", flag_values=fv)
    flags.DEFINE_string(
        "split", None, "Split to corrupt (default: config.data.test_split).", flag_values=fv
    )
    flags.DEFINE_integer(
        "num_examples",
        1000,
        "Use the first N examples of the split (0: all; 41 passes over them).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "corruption_seed", 0, "Seed of the random parts of the corruptions.", flag_values=fv
    )


def _run_from_flags(f: flags.FlagValues) -> Path:
    run(
        f.config,
        f.workdir,
        variants=f.variants,
        seeds=common.parse_ints(f.seeds, "--seeds") if f.seeds else None,
        names=f.corruptions,
        severities=common.parse_ints(f.severities, "--severities"),
        split=f.split,
        num_examples=f.num_examples,
        corruption_seed=f.corruption_seed,
        command=common.command_line(),
    )
    return Path(f.workdir) / STUDY / "robustness.md"


def main(argv: Sequence[str] | None = None) -> int:
    return common.study_cli(
        "evidence.robustness", _define_flags, _run_from_flags, argv, doc=__doc__
    )


if __name__ == "__main__":
    cli.run(main)
