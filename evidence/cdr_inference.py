"""CDR inference: accuracy and latency of x_CDR against the reverse sampler and the averaged samples.

    python -m evidence.cdr_inference --config configs/default.py --workdir runs/evidence \
        [--variant full] [--seeds 0] [--ddim_steps 1,5,10,50] [--num_samples 1,4]

Reads a run of `evidence.ablation` (same --config and --workdir; default: the first seed of
'full') and evaluates its CDR head and fused classifier on the test split with x_CDR from each
setting: DDPM over the full chain (T = model.cdr.num_steps) and DDIM with each of --ddim_steps (those
<= T), each averaging each of --num_samples chains. The backbone runs once per image; only the chain
and the heads are rerun per setting, with the trainer's per-batch noise keys, so the setting the run
was trained with reproduces its test accuracy. Latency: the chain alone, jitted and warmed up, on one
device, median of --repeats calls ended by block_until_ready, at batch 1 and at the eval batch size;
the backbone's latency is given for scale.

Writes to `<workdir>/cdr_inference/`: cdr_inference.json (everything, with provenance),
cdr_inference.csv (one row per setting), cdr_inference.md (the fragment of docs/results.md).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import flags

from evidence import common
from marnet_jax import cli, reporting

log = logging.getLogger("marnet_jax")

STUDY = "cdr_inference"
FEATURES = ("x_v", "x_ema", "visual_logits")


def settings(
    num_train_steps: int,
    ddim_steps: Sequence[int],
    num_samples: Sequence[int],
    ddpm: bool,
    trained: tuple[str, int, int] | None = None,
) -> tuple[list[tuple[str, int, int]], list[int]]:
    """[(sampler, steps, samples)]: DDPM over all T steps first, then DDIM with each step count <= T
    (larger ones are returned separately as skipped), plus the `trained` setting if it is missing."""
    bad = [k for k in num_samples if k < 1] + [s for s in ddim_steps if s < 1]
    if bad or not num_samples or not (ddim_steps or ddpm):
        raise common.UsageError(
            f"--ddim_steps and --num_samples must be positive integers (and some setting given); got "
            f"ddim_steps={list(ddim_steps)}, num_samples={list(num_samples)}."
        )
    out = [("ddpm", num_train_steps, k) for k in num_samples] if ddpm else []
    out += [("ddim", s, k) for s in ddim_steps if s <= num_train_steps for k in num_samples]
    skipped = [s for s in ddim_steps if s > num_train_steps]
    if trained is not None and trained not in out:
        out.append(trained)
    return out, skipped


def _model_for(trained: Any, sampler: str, steps: int, samples: int):
    from marnet_jax.models import build_model

    cfg = copy.deepcopy(trained.config.model)
    cfg.cdr.sampler = sampler
    cfg.cdr.sample_steps = steps
    cfg.cdr.num_samples = samples
    return build_model(cfg, trained.facts.num_classes, trained.facts.num_ingredients)


def _chain_and_heads(module, feats):
    out = dict(feats)
    x_cdr = module.cdr_chain(out)
    res = module.classify(out, x_cdr, False)
    return {"logits": res["logits"], "cdr_logits": res["cdr_logits"]}


def _chain_only(module, feats):
    return module.cdr_chain(dict(feats))


def _batches(feats: Mapping[str, np.ndarray], batch_size: int):
    """Full batches of the feature arrays; the last one padded by repeating its first row."""
    n = len(next(iter(feats.values())))
    for start in range(0, n, batch_size):
        part = {k: v[start : start + batch_size] for k, v in feats.items()}
        m = len(next(iter(part.values())))
        if m < batch_size:
            part = {
                k: np.concatenate([v, np.repeat(v[:1], batch_size - m, 0)]) for k, v in part.items()
            }
        yield part, m


def evaluate_setting(trained: Any, model: Any, feats: Mapping[str, np.ndarray], labels: np.ndarray):
    """Top-1/top-5 of the fused and CDR heads with x_CDR from `model`'s configured chain."""
    import jax

    from marnet_jax.train import sharding

    mesh = trained.mesh
    fn = jax.jit(
        lambda v, f, r: model.apply(v, f, rngs={"diffusion": r}, method=_chain_and_heads),
        in_shardings=(None, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
    )
    rng = jax.random.PRNGKey(trained.config.seed)
    parts = []
    for i, (batch, m) in enumerate(_batches(feats, trained.config.train.eval_batch_size)):
        out = jax.device_get(
            fn(trained.variables, sharding.global_batch(batch, mesh), jax.random.fold_in(rng, i))
        )
        parts.append({k: np.asarray(v)[:m] for k, v in out.items()})
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} | {"label": labels}
    acc = common.head_accuracies(out)
    return {k: v for k, v in acc.items() if k.startswith(("fused", "cdr"))}


def median_latency_s(fn: Callable[[], Any], repeats: int, budget_s: float = 10.0) -> float:
    """Median wall time of `fn()` (which must block until its result is ready) after one warm-up
    call: `repeats` timed calls, fewer (but at least min(3, repeats)) once they took `budget_s`."""
    fn()
    times: list[float] = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def chain_latency(
    trained: Any, model: Any, feats: Mapping[str, np.ndarray], batch: int, repeats: int
) -> float:
    """Median seconds of the chain alone (jitted, warm, one device) on `batch` feature rows."""
    import jax

    device = jax.devices()[0]
    variables = jax.device_put(trained.variables, device)
    x = jax.device_put({k: v[:batch] for k, v in feats.items() if k != "visual_logits"}, device)
    key = jax.device_put(jax.random.PRNGKey(0), device)
    fn = jax.jit(lambda v, f, r: model.apply(v, f, rngs={"diffusion": r}, method=_chain_only))
    return median_latency_s(lambda: fn(variables, x, key).block_until_ready(), repeats)


def backbone_latency(trained: Any, images: np.ndarray, repeats: int) -> float:
    """Median seconds of the visual path (backbone, + g_v with EMA) on `images`, as chain_latency."""
    import jax

    from marnet_jax.models.marnet import MARNet

    device = jax.devices()[0]
    variables = jax.device_put(trained.variables, device)
    x = jax.device_put(images, device)
    fn = jax.jit(
        lambda v, im: trained.model.apply(v, im, False, method=MARNet.visual_features)["x_v"]
    )
    return median_latency_s(lambda: fn(variables, x).block_until_ready(), repeats)


# --------------------------------------------------------------------------------------------------
# Outputs.


def _label(r: Mapping[str, Any]) -> str:
    if r["sampler"] == "ddpm":
        return f"DDPM, full chain ({r['steps']} steps)"
    return f"DDIM, {r['steps']} step" + ("s" if r["steps"] > 1 else "")


def cheapest(rows: Sequence[Mapping[str, Any]], metric: str, tolerance: float, cost: str):
    """The lowest-`cost` row whose mean `metric` is within `tolerance` of the best row's."""
    best = max(r[metric][0] for r in rows)
    ok = [r for r in rows if r[metric][0] >= best - tolerance]
    return min(ok, key=lambda r: r[cost]), best


def markdown(report: Mapping[str, Any]) -> str:
    rows = report["rows"]
    batches = report["latency_batch_sizes"]
    seeds = ", ".join(str(s) for s in report["seeds"])
    lines = [
        f"{report['variant']} model, seeds {seeds}, {report['num_examples']} test images. Top-1 (%) of "
        "the CDR head (reads x_CDR alone) and of the fused classifier (reads x_EMA and x_CDR); "
        "mean ± std over seeds. Latency: the chain alone, jitted, warm, one device, median of "
        f"up to {report['repeats']} calls (at least 3; fewer once they took 10 s), in ms per "
        "image at batch "
        + " and ".join(str(b) for b in batches)
        + f". Trained with: {report['trained_setting']} (with model.cdr_wiring.train_estimate='chain' the "
        "fused classifier was trained on that chain's x_CDR: other settings change its input).",
        "",
    ]
    header = ["x_CDR from", "samples", "CDR head top-1", "fused top-1", "CDR head top-5"]
    header += [f"ms/image @ batch {b}" for b in batches]
    table = []
    for r in rows:
        trained = " (trained)" if r["is_trained_setting"] else ""
        table.append(
            [
                _label(r) + trained,
                r["num_samples"],
                reporting.pct_pm(*r["cdr_top1"]),
                reporting.pct_pm(*r["fused_top1"]),
                reporting.pct_pm(*r["cdr_top5"]),
                *[f"{1e3 * r['latency_s'][str(b)] / b:.3g}" for b in batches],
            ]
        )
    lines += [reporting.markdown_table(header, table), ""]
    bb = report["backbone_latency_s"]
    lines.append(
        "For scale, the visual path (backbone) takes "
        + " and ".join(f"{1e3 * bb[str(b)] / b:.3g} ms/image at batch {b}" for b in batches)
        + "."
    )
    if report["skipped_ddim_steps"]:
        lines.append(
            f"DDIM with {report['skipped_ddim_steps']} steps skipped: more than the "
            f"{report['num_train_steps']} training steps of the chain."
        )
    lines.append("")
    for c in report["recommendations"]:
        lines.append(
            f"- Cheapest setting within {c['tolerance_points']} points of the best "
            f"{'fused classifier' if c['head'] == 'fused' else 'CDR head'} "
            f"top-1 ({reporting.pct(c['best'])} %): **{c['setting']}** at "
            f"{reporting.pct(c['accuracy'])} %, {c['ms_per_image']:.3g} ms/image at batch {c['batch']}."
        )
    return "\n".join(lines) + "\n"


CSV_COLUMNS = [
    "sampler",
    "steps",
    "num_samples",
    "is_trained_setting",
    "cdr_top1_mean",
    "cdr_top1_std",
    "cdr_top5_mean",
    "fused_top1_mean",
    "fused_top1_std",
    "fused_top5_mean",
]


def csv_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in report["rows"]:
        row = {k: r[k] for k in ("sampler", "steps", "num_samples", "is_trained_setting")}
        for m in ("cdr_top1", "cdr_top5", "fused_top1", "fused_top5"):
            row[f"{m}_mean"], row[f"{m}_std"] = r[m]
        for b, s in r["latency_s"].items():
            row[f"ms_per_image_batch_{b}"] = 1e3 * s / int(b)
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------------
# The study.


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    variant: str = "full",
    seeds: Sequence[int] | None = None,
    ddim_steps: Sequence[int] = (1, 5, 10, 50),
    num_samples: Sequence[int] = (1, 4),
    ddpm: bool = True,
    num_examples: int = 0,
    repeats: int = 20,
    latency_batch_sizes: Sequence[int] | None = None,
    tolerance: float = 0.005,
    command: str = "",
) -> dict[str, Any]:
    """Evaluates every chain setting on the selected runs; writes the study files."""

    workdir = Path(workdir)
    out_dir = workdir / STUDY
    if repeats < 1:
        raise common.UsageError(f"--repeats must be >= 1, got {repeats}.")
    index = common.run_index(workdir)
    if seeds is None and variant in index:
        seeds = [min(index[variant])]
    runs = common.select_runs(index, [variant], seeds)[variant]
    split = common.split_with_limit(config.data, config.data.test_split, num_examples)
    prov = common.Provenance(
        command, common.first_run_config({variant: runs}, config), sorted(runs)
    )

    per_seed: dict[int, dict[str, Any]] = {}
    for s, run_dir in sorted(runs.items()):
        cfg = common.run_config(run_dir, config)
        if not cfg.model.use_cdr:
            raise common.UsageError(f"Variant {variant!r} ({run_dir}) has no CDR to study.")
        trained = common.load_run(run_dir, cfg)
        cdr = cfg.model.cdr
        steps = cdr.num_steps if cdr.sampler == "ddpm" else cdr.sample_steps
        own = (cdr.sampler, steps, cdr.num_samples)
        grid, skipped = settings(cdr.num_steps, ddim_steps, num_samples, ddpm, own)
        feats_out = common.predict(trained, common.predict_fn(trained, FEATURES), split)
        labels = feats_out.pop("label")
        feats = {k: v for k, v in feats_out.items() if k in ("x_v", "x_ema")}
        batch_sizes = sorted(
            set(latency_batch_sizes or (1, min(cfg.train.eval_batch_size, len(labels))))
        )
        if batch_sizes[0] < 1 or batch_sizes[-1] > len(labels):
            raise common.UsageError(
                f"--latency_batch_sizes must be in 1..{len(labels)} (the test images), got "
                f"{batch_sizes}."
            )
        first_images = common.first_batch(trained.config, split)["image"]
        result: dict[str, Any] = {
            "settings": [],
            "backbone_latency_s": {
                str(b): backbone_latency(trained, first_images[:b], repeats) for b in batch_sizes
            },
        }
        for sampler, steps, k in grid:
            model = _model_for(trained, sampler, steps, k)
            acc = evaluate_setting(trained, model, feats, labels)
            latency = {
                str(b): chain_latency(trained, model, feats, b, repeats) for b in batch_sizes
            }
            trained_setting = (sampler, steps, k) == own
            result["settings"].append(
                {
                    "sampler": sampler,
                    "steps": steps,
                    "num_samples": k,
                    "is_trained_setting": trained_setting,
                    "latency_s": latency,
                    **acc,
                }
            )
            log.info("CDR inference seed %d %s-%d x%d: %s %s", s, sampler, steps, k, acc, latency)
        per_seed[s] = result
        num_train_steps, trained_with = (
            cdr.num_steps,
            (
                f"{cdr.sampler} {cdr.sample_steps if cdr.sampler == 'ddim' else cdr.num_steps} steps x "
                f"{cdr.num_samples} samples"
            ),
        )

    seeds_sorted = sorted(per_seed)
    rows = []
    for i, row in enumerate(per_seed[seeds_sorted[0]]["settings"]):
        merged = {k: row[k] for k in ("sampler", "steps", "num_samples", "is_trained_setting")}
        for m in ("cdr_top1", "cdr_top5", "fused_top1", "fused_top5"):
            merged[m] = common.mean_std([per_seed[s]["settings"][i][m] for s in seeds_sorted])
        merged["latency_s"] = {
            b: float(np.median([per_seed[s]["settings"][i]["latency_s"][b] for s in seeds_sorted]))
            for b in row["latency_s"]
        }
        rows.append(merged)
    big = str(batch_sizes[-1])
    for r in rows:
        r["cost"] = r["latency_s"][big]
    recommendations = []
    for head in ("fused", "cdr"):
        best_row, best = cheapest(rows, f"{head}_top1", tolerance, "cost")
        recommendations.append(
            {
                "head": head,
                "tolerance_points": round(100 * tolerance, 2),
                "best": best,
                "setting": f"{_label(best_row)} x {best_row['num_samples']} sample(s)",
                "accuracy": best_row[f"{head}_top1"][0],
                "ms_per_image": 1e3 * best_row["cost"] / int(big),
                "batch": int(big),
            }
        )
    report = {
        "study": STUDY,
        "variant": variant,
        "seeds": seeds_sorted,
        "split": split,
        "num_examples": len(labels),
        "num_train_steps": num_train_steps,
        "trained_setting": trained_with,
        "skipped_ddim_steps": skipped,
        "latency_batch_sizes": batch_sizes,
        "repeats": repeats,
        "rows": rows,
        "backbone_latency_s": {
            b: float(np.median([per_seed[s]["backbone_latency_s"][b] for s in seeds_sorted]))
            for b in per_seed[seeds_sorted[0]]["backbone_latency_s"]
        },
        "recommendations": recommendations,
        "per_seed": per_seed,
        "runs": {s: str(p) for s, p in runs.items()},
    }
    report["provenance"] = prov.finish()
    reporting.write_json(out_dir / "cdr_inference.json", report)
    columns = CSV_COLUMNS + [f"ms_per_image_batch_{b}" for b in batch_sizes]
    reporting.write_csv(out_dir / "cdr_inference.csv", columns, csv_rows(report))
    (out_dir / "cdr_inference.md").write_text(markdown(report))
    log.info("Wrote %s/cdr_inference.{json,csv,md}", out_dir)
    return report


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "variant", "full", "Ablation variant to study (must have CDR).", flag_values=fv
    )
    flags.DEFINE_list(
        "seeds", [], "Seeds (default: the first seed the ablation trained).", flag_values=fv
    )
    flags.DEFINE_list(
        "ddim_steps", ["1", "5", "10", "50"], "DDIM step counts (<= T are used).", flag_values=fv
    )
    flags.DEFINE_list("num_samples", ["1", "4"], "Chains averaged per image.", flag_values=fv)
    flags.DEFINE_boolean(
        "ddpm", True, "Also the ancestral DDPM chain over all T steps.", flag_values=fv
    )
    flags.DEFINE_integer(
        "num_examples", 0, "First N test images (0: the whole split).", flag_values=fv
    )
    flags.DEFINE_integer(
        "repeats",
        20,
        "Timed calls per latency (median; fewer, but >= 3, once they took 10 s).",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "latency_batch_sizes",
        [],
        "Batch sizes of the latency (default: 1 and the eval batch).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "tolerance", 0.5, "Accuracy (points) a cheaper setting may lose.", flag_values=fv
    )


def _run_from_flags(f: flags.FlagValues) -> Path:
    run(
        f.config,
        f.workdir,
        variant=f.variant,
        seeds=common.parse_ints(f.seeds, "--seeds") if f.seeds else None,
        ddim_steps=common.parse_ints(f.ddim_steps, "--ddim_steps"),
        num_samples=common.parse_ints(f.num_samples, "--num_samples"),
        ddpm=f.ddpm,
        num_examples=f.num_examples,
        repeats=f.repeats,
        latency_batch_sizes=common.parse_ints(f.latency_batch_sizes, "--latency_batch_sizes")
        or None,
        tolerance=f.tolerance / 100,
        command=common.command_line(),
    )
    return Path(f.workdir) / STUDY / "cdr_inference.md"


def main(argv: Sequence[str] | None = None) -> int:
    return common.study_cli(
        "evidence.cdr_inference", _define_flags, _run_from_flags, argv, doc=__doc__
    )


if __name__ == "__main__":
    cli.run(main)
