"""Ablation: baseline / +EMA / +CDR / full MARNet (and extra variants) over several seeds.

    python -m evidence.ablation --config configs/default.py --workdir runs/evidence \
        [--seeds 0,1,2] [--variants baseline,ema,cdr,full] [--extra_variant 'gated=full model.fusion=gated']
        [--seeds_of baseline,full=0,1,2,3,4]

Trains every (variant, seed) with `trainer.train_and_evaluate` in `<workdir>/ablation/runs/<variant>/
seed_<s>/` (a normal training workdir), one after the other, and records the wall and CPU time of each.
Every variant runs over `--seeds`, except those `--seeds_of` gives seeds of their own (more seeds where
a verdict matters most); paired verdicts use the seeds both sides share.
Rerunning the command skips finished runs and resumes an interrupted one from its checkpoint; a run
directory trained with a different config is an error, not a silent mix. Writes to
`<workdir>/ablation/`: ablation.json (every run, summaries, paired comparisons and their verdicts,
provenance), ablation.csv (one row per variant), ablation.md (the fragment of docs/results.md).
Any config field can be overridden as in marnet_jax.main (`--config.train.num_steps=300`).
"""

from __future__ import annotations

import ast
import copy
import json
import logging
import resource
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags

from evidence import common
from marnet_jax import cli, reporting
from marnet_jax.config import PROTOCOLS, VARIANTS, apply_variant, upgrade
from marnet_jax.models.config import moved_field
from marnet_jax.train.steps import EVAL_HEADS

log = logging.getLogger("marnet_jax")

MARKER = common.RUN_MARKER
HEADS = tuple(EVAL_HEADS)
# (name, variant, reference): what each paired comparison tests (the paper's claims).
COMPARISONS = (
    ("EMA alone", "ema", "baseline"),
    ("CDR alone", "cdr", "baseline"),
    ("EMA + CDR (full MARNet)", "full", "baseline"),
    ("CDR on top of EMA", "full", "ema"),
    ("EMA on top of CDR", "full", "cdr"),
    ("Ingredient head (aux) alone", "aux", "baseline"),
    ("MARNet against the ingredient head", "full", "aux"),
    ("Distillation from the text teacher (distill) alone", "distill", "baseline"),
    ("MARNet against distillation", "full", "distill"),
)
# Config fields that do not change what a run computes: they may differ when a run is resumed.
_IGNORED = (
    "data.data_dir",
    "data.manual_dir",
    "data.read_threads",
    "data.prefetch_buffer_size",
    "protocol",  # a name: the fields it sets are compared (a baseline is one run under any)
)
_IGNORED_PREFIXES = (
    "checkpoint.",
    "mesh.",
    "train.log_every",
    "train.stop_check_every",
    "train.grad_diag_every",  # the diagnostics read the state, never change it
)
CSV_COLUMNS = [
    "variant",
    "base",
    "overrides",
    "use_ema",
    "use_cdr",
    "use_aux",
    "use_distill",
    "protocol",
    "num_seeds",
    "seeds",
    *[f"{h}_{m}_{s}" for h in HEADS for m in ("top1", "top5") for s in ("mean", "std")],
    "train_wall_s_mean",
    "train_wall_s_std",
    "train_cpu_s_mean",
]


Preempted = common.Preempted


# --------------------------------------------------------------------------------------------------
# Variants.


def parse_extra_variant(spec: str) -> tuple[str, str, dict[str, Any]]:
    """'LABEL=BASE field=value ...' -> (label, base variant, {dotted field: value}).

    Values are Python literals (numbers, True, 'quoted') or bare strings: 'gated=full model.fusion=gated'.
    A field of an earlier config layout is read under its name now (models.config.moved_field), so
    the commands of earlier studies still run.
    The field `protocol` (a key of PROTOCOLS) trains the variant under another protocol than the
    config's: 'full_joint=full protocol=joint'. A label equal to its base gives that variant
    settings of its own under its own name (each variant's tuned settings, compared as the
    variant): 'baseline=baseline loss.label_smoothing=0.1'.
    """
    head, *assignments = spec.split()
    label, sep, base = head.partition("=")
    if not sep or not label or base not in VARIANTS:
        raise common.UsageError(
            f"--extra_variant {spec!r}: expected 'LABEL=BASE field=value ...' with BASE one of "
            f"{sorted(VARIANTS)}."
        )
    if not label.replace("_", "").replace("-", "").isalnum() or label in set(VARIANTS) - {base}:
        raise common.UsageError(
            f"--extra_variant {spec!r}: the label must be letters, digits, '_' or '-', and a "
            f"variant's name ({sorted(VARIANTS)}) only as the label of that variant itself."
        )
    if label == base and not assignments:
        raise common.UsageError(
            f"--extra_variant {spec!r} gives {base!r} no settings: list it in --variants instead."
        )
    overrides = {}
    for a in assignments:
        field, sep, raw = a.partition("=")
        if not sep:
            raise common.UsageError(f"--extra_variant {spec!r}: {a!r} is not field=value.")
        field = moved_field(field)
        try:
            overrides[field] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            overrides[field] = raw
    return label, base, overrides


def variant_plan(
    variants: Sequence[str], extra_variants: Sequence[str]
) -> dict[str, tuple[str, dict[str, Any]]]:
    """{label: (base variant, overrides)} of a study: `variants` as they are, then each
    --extra_variant spec."""
    plan: dict[str, tuple[str, dict[str, Any]]] = {}
    for v in variants:
        if v not in VARIANTS:
            raise common.UsageError(
                f"Unknown variant {v!r} in --variants; expected one of {sorted(VARIANTS)}."
            )
        plan[v] = (v, {})
    for spec in extra_variants:
        label, base, overrides = parse_extra_variant(spec)
        if label in plan:
            raise common.UsageError(f"Variant label {label!r} given twice.")
        plan[label] = (base, overrides)
    if not plan:
        raise common.UsageError("No variants to train.")
    return plan


def _set_field(config: ml_collections.ConfigDict, field: str, value: Any) -> None:
    *path, last = field.split(".")
    node = config
    try:
        for p in path:
            node = node[p]
        if last not in node:
            raise KeyError(last)
        node[last] = value
    except (KeyError, AttributeError, TypeError) as e:
        raise common.UsageError(f"Cannot set config field {field}={value!r}: {e}") from e


def protocol_of(config: ml_collections.ConfigDict) -> str:
    """The protocol a run was trained under, or '-' for a variant that never reads the text."""
    m = config.model
    reads_text = m.use_ema or m.use_cdr or m.use_distill
    return config.protocol if reads_text else "-"


def variant_config(
    config: ml_collections.ConfigDict, base: str, overrides: Mapping[str, Any], seed: int
) -> ml_collections.ConfigDict:
    """A copy of `config` switched to variant `base` (under the config's protocol, or the one
    `overrides` names) with `overrides` and `seed`."""
    config = copy.deepcopy(config)
    protocol = overrides.get("protocol", config.protocol)
    if protocol not in PROTOCOLS:
        raise common.UsageError(f"protocol={protocol!r}: expected one of {sorted(PROTOCOLS)}.")
    apply_variant(config, f"{base},{protocol}")
    for field, value in overrides.items():
        if field == "protocol":
            continue
        _set_field(config, field, value)
    config.seed = int(seed)
    return config


# --------------------------------------------------------------------------------------------------
# One run.


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Fields (dotted) set in both configs whose values differ and matter for the result, as
    'field: old -> new'. A field only one side has (added to or removed from the code since) is not
    a difference: the code's defaults keep old behaviour."""
    a, b = _flat(old), _flat(new)
    out = []
    for key in sorted(set(a) & set(b)):
        if key in _IGNORED or key.startswith(_IGNORED_PREFIXES):
            continue
        if a[key] != b[key]:
            out.append(f"{key}: {a[key]!r} -> {b[key]!r}")
    return out


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train_run(config: ml_collections.ConfigDict, run_dir: Path) -> dict[str, Any]:
    """Trains and tests one (variant, seed) in `run_dir`, or returns its record if it is done.

    The record (also written to `<run_dir>/evidence_run.json`): the trainer's validation and test
    accuracies, wall and process CPU seconds of the call that finished it, and the step it started
    from (> 0 when it resumed an interrupted run: then the times cover only the remaining steps).
    """
    from marnet_jax.train import trainer

    wanted = json.loads(config.to_json_best_effort())
    for path in (run_dir / MARKER, run_dir / "config.json"):
        if path.exists():
            old = json.loads(path.read_text())
            old = old.get("config", old) if path.name == MARKER else old
            old = upgrade(old).to_dict()  # an earlier layout, read as the trainer reads it
            diff = config_differences(old, wanted)
            if diff:
                raise common.UsageError(
                    f"{run_dir} holds a run with another config ({'; '.join(diff[:6])}). Use "
                    "another --workdir, or delete that run directory to retrain it."
                )
    if (run_dir / MARKER).exists():
        record = json.loads((run_dir / MARKER).read_text())
        log.info("%s: already done (%.0f s), skipped.", run_dir, record["train_wall_s"])
        return record

    start_step = common.latest_step(run_dir) or 0
    t0, c0 = time.perf_counter(), _cpu_seconds()
    results = trainer.train_and_evaluate(config, str(run_dir))
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    if "preempted_at_step" in results:
        raise Preempted(
            f"{run_dir} stopped at step {results['preempted_at_step']} (SIGTERM); run the same "
            "command again to resume it."
        )
    record = {
        "variant": config.variant,
        "seed": int(config.seed),
        "steps": int(config.train.num_steps),
        "start_step": start_step,
        "train_wall_s": round(wall, 1),
        "train_cpu_s": round(cpu, 1),
        "validation": results[config.data.eval_split],
        "test": results[config.data.test_split],
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": reporting.machine(),  # load averages: over the end of the training
        "config": wanted,
    }
    reporting.write_json(run_dir / MARKER, record)
    return record


# --------------------------------------------------------------------------------------------------
# Summaries.


def summarise(runs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean and sample std over seeds of every head's test accuracy, and of the training time."""
    out: dict[str, float] = {}
    for head in HEADS:
        for m in ("top1", "top5"):
            values = [r["test"][f"{head}_{m}"] for r in runs if f"{head}_{m}" in r["test"]]
            if values:
                out[f"{head}_{m}_mean"], out[f"{head}_{m}_std"] = common.mean_std(values)
    out["train_wall_s_mean"], out["train_wall_s_std"] = common.mean_std(
        [r["train_wall_s"] for r in runs]
    )
    out["train_cpu_s_mean"] = common.mean_std([r["train_cpu_s"] for r in runs])[0]
    return out


def compare(
    name: str,
    runs_a: Mapping[int, Mapping[str, Any]],
    runs_b: Mapping[int, Mapping[str, Any]],
    a: str,
    b: str,
    metric: str = "fused_top1",
) -> dict[str, Any] | None:
    """Paired (same seed) difference in test `metric` of variant a minus variant b, with a verdict."""
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        return None
    deltas = {s: runs_a[s]["test"][metric] - runs_b[s]["test"][metric] for s in seeds}
    mean, std = common.mean_std(list(deltas.values()))
    verdict = common.paired_verdict(list(deltas.values()), "helps", "does not help (hurts)")
    return {
        "name": name,
        "variant": a,
        "reference": b,
        "metric": metric,
        "seeds": seeds,
        "per_seed_delta": deltas,
        "delta_mean": mean,
        "delta_std": std,
        "variant_mean": common.mean_std([runs_a[s]["test"][metric] for s in seeds])[0],
        "reference_mean": common.mean_std([runs_b[s]["test"][metric] for s in seeds])[0],
        "verdict": verdict,
    }


def sentence(c: Mapping[str, Any]) -> str:
    """A paired comparison in one line: verdict, means and the difference over seeds."""
    return (
        f"{c['name']} ({c['variant']} vs {c['reference']}): **{c['verdict']}**; fused test top-1 "
        f"{reporting.pct(c['variant_mean'])} vs {reporting.pct(c['reference_mean'])} %, difference "
        f"{reporting.pct_pm(c['delta_mean'], c['delta_std'])} points over seeds "
        f"{', '.join(str(s) for s in c['seeds'])}."
    )


def markdown(report: Mapping[str, Any]) -> str:
    """The ablation fragment of docs/results.md: table, then the paired verdicts."""
    rows = []
    slow = False
    for label, v in report["variants"].items():
        s = v["summary"]
        resumed = any(r["start_step"] > 0 for r in v["runs"])
        slow |= resumed
        minutes = s["train_wall_s_mean"] / 60
        rows.append(
            [
                label if not v["overrides"] else f"{label} ({v['base']}, {overrides_text(v)})",
                "yes" if v["use_ema"] else "no",
                "yes" if v["use_cdr"] else "no",
                "yes" if v.get("use_aux") else "no",
                "yes" if v.get("use_distill") else "no",
                report_protocol(v),
                ", ".join(str(r["seed"]) for r in v["runs"]),
                reporting.pct_pm(s.get("fused_top1_mean"), s.get("fused_top1_std")),
                reporting.pct_pm(s.get("fused_top5_mean"), s.get("fused_top5_std")),
                reporting.pct_pm(s.get("visual_top1_mean"), s.get("visual_top1_std")),
                reporting.pct_pm(s.get("cdr_top1_mean"), s.get("cdr_top1_std")),
                f"{minutes:.1f}" + (" *" if resumed else ""),
            ]
        )
    n_test = report["num_test_examples"]
    text = [
        f"Test accuracy (%) on {n_test} test images, mean ± sample std over each variant's seeds "
        "(paired verdicts use the seeds both variants share). `fused` is the model's "
        "classifier; `visual probe` is the stop-gradient linear probe on the visual feature "
        "(x_EMA with EMA, x_v without); `CDR head` classifies x_CDR from the image-only reverse chain; "
        "`aux` is the visual-only model trained with an extra ingredient-prediction head (BCE); "
        "`distill` the visual-only model trained towards the text teacher's softened class "
        "probabilities. Protocol: how the text side is trained (docs/method.md, 'Training "
        "protocol'); it matters only to variants that read the text.",
        "",
        reporting.markdown_table(
            [
                "variant",
                "EMA",
                "CDR",
                "aux",
                "distill",
                "protocol",
                "seeds",
                "fused top-1",
                "fused top-5",
                "visual probe top-1",
                "CDR head top-1",
                "train wall (min/run)",
            ],
            rows,
        ),
    ]
    if slow:
        text.append(
            "\n\\* resumed after an interruption: the time covers only the steps after the resume."
        )
    if report["comparisons"]:
        text += ["", "Paired by seed (fused test top-1):", ""]
        text += [f"- {sentence(c)}" for c in report["comparisons"]]
    return "\n".join(text) + "\n"


def report_protocol(v: Mapping[str, Any]) -> str:
    """A report variant's protocol; reports written before protocols existed trained 'joint'."""
    if "protocol" in v:
        return v["protocol"]
    return "joint" if v["use_ema"] or v["use_cdr"] else "-"


def overrides_text(v: Mapping[str, Any]) -> str:
    """A report variant's overrides as 'field=value, ...' ('' for none), each field under its name
    now."""
    return ", ".join(f"{moved_field(k)}={val}" for k, val in v["overrides"].items())


def csv_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for label, v in report["variants"].items():
        rows.append(
            {
                "variant": label,
                "base": v["base"],
                "overrides": overrides_text(v),
                "use_ema": v["use_ema"],
                "use_cdr": v["use_cdr"],
                "use_aux": v.get("use_aux", False),
                "use_distill": v.get("use_distill", False),
                "protocol": report_protocol(v),
                "num_seeds": len(v["runs"]),
                "seeds": [r["seed"] for r in v["runs"]],
                **v["summary"],
            }
        )
    return rows


# --------------------------------------------------------------------------------------------------
# The study.


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    variants: Sequence[str] = ("baseline", "ema", "cdr", "full"),
    seeds: Sequence[int] = (0, 1, 2),
    extra_variants: Sequence[str] = (),
    seeds_of: Mapping[str, Sequence[int]] | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Trains what is missing, then writes ablation.json/.csv/.md; returns the JSON record.

    Every variant runs over `seeds`, except those `seeds_of` maps to seeds of their own.
    """
    out_dir = Path(workdir) / common.ABLATION
    seeds_of = dict(seeds_of or {})
    common.check_seeds(seeds, "--seeds")
    for label, own in seeds_of.items():
        common.check_seeds(own, f"--seeds_of {label}")
    plan = variant_plan(variants, extra_variants)
    unknown = sorted(set(seeds_of) - set(plan))
    if unknown:
        raise common.UsageError(
            f"--seeds_of names {unknown}, which are not trained here ({sorted(plan)})."
        )
    seeds_by_label = {label: list(seeds_of.get(label, seeds)) for label in plan}
    # Check every variant's config before the first (long) training starts.
    configs = {
        (label, s): variant_config(config, base, overrides, s)
        for label, (base, overrides) in plan.items()
        for s in seeds_by_label[label]
    }
    all_seeds = sorted({s for own in seeds_by_label.values() for s in own})
    prov = common.Provenance(command, config, all_seeds)
    records: dict[str, dict[int, dict[str, Any]]] = {label: {} for label in plan}
    total = len(configs)
    for i, ((label, s), cfg) in enumerate(configs.items(), 1):
        run_dir = out_dir / "runs" / label / f"seed_{s}"
        log.info("Ablation run %d/%d: %s seed %d in %s", i, total, label, s, run_dir)
        records[label][s] = train_run(cfg, run_dir) | {"dir": f"runs/{label}/seed_{s}"}

    report: dict[str, Any] = {"study": "ablation", "variants": {}}
    for label, (base, overrides) in plan.items():
        runs = [records[label][s] for s in seeds_by_label[label]]
        use_ema, use_cdr, use_aux, use_distill = VARIANTS[base]
        report["variants"][label] = {
            "base": base,
            "overrides": overrides,
            "use_ema": use_ema,
            "use_cdr": use_cdr,
            "use_aux": use_aux,
            "use_distill": use_distill,
            "protocol": protocol_of(configs[label, seeds_by_label[label][0]]),
            "runs": [{k: v for k, v in r.items() if k != "config"} for r in runs],
            "summary": summarise(runs),
        }
    pairs = list(COMPARISONS) + [
        (f"{label} ({overrides_text(report['variants'][label])})", label, base)
        for label, (base, overrides) in plan.items()
        if overrides and base in plan and label != base
    ]
    report["comparisons"] = [
        c
        for name, a, b in pairs
        if a in plan and b in plan
        for c in [compare(name, records[a], records[b], a, b)]
        if c is not None
    ]
    first = next(iter(next(iter(records.values())).values()))
    report["num_test_examples"] = int(first["test"]["num_examples"])
    report["provenance"] = prov.finish()
    reporting.write_json(out_dir / "ablation.json", report)
    reporting.write_csv(out_dir / "ablation.csv", CSV_COLUMNS, csv_rows(report))
    (out_dir / "ablation.md").write_text(markdown(report))
    log.info("Wrote %s/ablation.{json,csv,md}", out_dir)
    return report


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_list(
        "variants", ["baseline", "ema", "cdr", "full"], "Variants to train.", flag_values=fv
    )
    flags.DEFINE_list(
        "seeds", ["0", "1", "2"], "Seeds (config.seed) of every variant.", flag_values=fv
    )
    flags.DEFINE_multi_string(
        "extra_variant",
        None,
        "Another variant: 'LABEL=BASE field=value ...', e.g. 'gated=full model.fusion=gated' or "
        "'ddpm=full model.cdr.sampler=ddpm'. Repeatable.",
        flag_values=fv,
    )
    flags.DEFINE_multi_string(
        "seeds_of",
        None,
        "Seeds of some variants instead of --seeds: 'VARIANT[,VARIANT...]=SEED[,SEED...]', e.g. "
        "'baseline,full=0,1,2,3,4'. Repeatable.",
        flag_values=fv,
    )


def _run_from_flags(f: flags.FlagValues) -> Path:
    run(
        f.config,
        f.workdir,
        variants=f.variants,
        seeds=common.parse_ints(f.seeds, "--seeds"),
        extra_variants=f.extra_variant or (),
        seeds_of=common.parse_ints_of(f.seeds_of or (), "--seeds_of"),
        command=common.command_line(),
    )
    return Path(f.workdir) / common.ABLATION / "ablation.md"


def main(argv: Sequence[str] | None = None) -> int:
    return common.study_cli(
        "evidence.ablation", _define_flags, _run_from_flags, argv, training=True, doc=__doc__
    )


if __name__ == "__main__":
    cli.run(main)
