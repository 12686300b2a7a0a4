"""The paper's Figures 3 and 4, checked with numbers: feature clustering and prediction confidence.

    python -m evidence.figures --config configs/default.py --workdir runs/evidence \
        [--variant full] [--compare baseline] [--num_examples 1500] [--grid 12]

Reads the runs of `evidence.ablation` (same --config and --workdir). For every seed of
--variant (and of --compare, for its x_v), on the first --num_examples test images:
- cluster quality of each feature space (x_v, x_EMA when the variant has EMA, x_CDR): silhouette
  score (cosine) and leave-one-out k-nearest-neighbour accuracy (cosine), so "x_CDR is better
  clustered by class than x_v" is a paired comparison over seeds, not a picture;
- confidence of each head (fused, visual probe, CDR head): accuracy and mean top-1 probability of its
  correct and of its wrong predictions.
Figures from the first seed: tsne.png (t-SNE of each space, coloured by class: Figure 3) and
case_study.png (--grid test images drawn at random with --grid_seed, with the top-3 classes and
probabilities of the visual probe and the CDR head: Figure 4).

Writes to `<workdir>/figures/`: figures.json (scores, confidences, verdicts, provenance),
figures.md (the fragment of docs/results.md), tsne.png, case_study.png.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import flags

from evidence import common
from evidence.robustness import config_name
from marnet_jax import cli, reporting

log = logging.getLogger("marnet_jax")

STUDY = "figures"
OUTPUTS = ("logits", "visual_logits", "cdr_logits", "x_v", "x_ema", "x_cdr")
SPACES = {"x_v": "x_v (backbone)", "x_ema": "x_EMA (aligned)", "x_cdr": "x_CDR (diffusion)"}
HEAD_NAMES = {"fused": "fused classifier", "visual": "visual probe", "cdr": "CDR head"}


# --------------------------------------------------------------------------------------------------
# Scores.


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_accuracy(features: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Leave-one-out k-NN accuracy under cosine similarity (majority vote; ties: nearest wins)."""
    n = len(labels)
    if not 1 <= k < n:
        raise common.UsageError(f"k-NN needs 1 <= k < number of examples, got k={k}, n={n}.")
    z = _unit(features)
    sims = z @ z.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    neighbour_labels = labels[nearest]  # [n, k], nearest first
    num_classes = int(labels.max()) + 1
    votes = np.zeros((n, num_classes))
    np.add.at(votes, (np.arange(n)[:, None], neighbour_labels), 1.0)
    # Tie-break towards the class of the nearer neighbours: a small bonus decreasing with rank.
    np.add.at(votes, (np.arange(n)[:, None], neighbour_labels), 1e-3 / (1 + np.arange(k)))
    return float(np.mean(np.argmax(votes, axis=1) == labels))


def cluster_scores(features: np.ndarray, labels: np.ndarray, k: int) -> dict[str, float]:
    """Silhouette (cosine; -1..1, higher = tighter, better separated classes) and k-NN accuracy."""
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2:
        raise common.UsageError("Cluster scores need test images of at least two classes.")
    return {
        "silhouette": float(silhouette_score(_unit(features), labels, metric="cosine")),
        "knn_accuracy": knn_accuracy(features, labels, k),
    }


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confidence(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, mean top-1 probability of correct and of wrong predictions, mean p(true class)."""
    p = _softmax(np.asarray(logits, np.float64))
    top = p.argmax(1)
    conf = p.max(1)
    correct = top == labels
    return {
        "accuracy": float(correct.mean()),
        "mean_confidence_correct": float(conf[correct].mean()) if correct.any() else math.nan,
        "mean_confidence_wrong": float(conf[~correct].mean()) if (~correct).any() else math.nan,
        "mean_true_class_probability": float(p[np.arange(len(labels)), labels].mean()),
        "num_correct": int(correct.sum()),
    }


def analyse(out: Mapping[str, np.ndarray], k: int) -> dict[str, Any]:
    """Scores of every feature space and confidences of every head present in `out`."""
    labels = out["label"]
    return {
        "cluster": {s: cluster_scores(out[s], labels, k) for s in SPACES if s in out},
        "confidence": {
            h: confidence(out[key], labels) for h, key in common.HEADS.items() if key in out
        },
    }


# --------------------------------------------------------------------------------------------------
# Figures.


def _class_colours(num_classes: int):
    import matplotlib

    if num_classes <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(num_classes)]
    if num_classes <= 40:
        cmap = [matplotlib.colormaps["tab20"], matplotlib.colormaps["tab20b"]]
        return [cmap[i // 20](i % 20) for i in range(num_classes)]
    return None  # a continuous map and a colour bar


def plot_tsne(
    out: Mapping[str, np.ndarray],
    scores: Mapping[str, Mapping[str, float]],
    class_names: Sequence[str],
    *,
    perplexity: float,
    max_iter: int = 1000,
    seed: int,
    title: str,
    path: Path,
) -> None:
    """One t-SNE panel per feature space, points coloured by true class, scores in the titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    spaces = [s for s in SPACES if s in out]
    labels = out["label"]
    n = len(labels)
    num_classes = len(class_names)
    colours = _class_colours(num_classes)
    legend_cols = max(1, math.ceil(num_classes / 24))
    name_len = max(len(_short(c)) for c in class_names)
    legend_w = legend_cols * (0.45 + 0.065 * name_len) if colours is not None else 1.0
    panels_w = 5.0 * len(spaces)
    fig, axes = plt.subplots(1, len(spaces), figsize=(panels_w + legend_w, 5.6), squeeze=False)
    size = float(np.clip(6000 / n, 4, 30))
    for ax, space in zip(axes[0], spaces):
        emb = TSNE(
            n_components=2,
            perplexity=min(perplexity, (n - 1) / 3),
            init="pca",
            learning_rate="auto",
            max_iter=max_iter,
            random_state=seed,
        ).fit_transform(_unit(out[space]))
        if colours is not None:
            for c in range(num_classes):
                m = labels == c
                if m.any():
                    ax.scatter(
                        *emb[m].T, s=size, color=colours[c], label=_short(class_names[c]), lw=0
                    )
        else:
            sc = ax.scatter(*emb.T, s=size, c=labels, cmap="turbo", vmin=0, vmax=num_classes - 1)
        sc_ = scores[space]
        ax.set_title(
            f"{SPACES[space]}\nsilhouette {sc_['silhouette']:.3f}, "
            f"k-NN accuracy {100 * sc_['knn_accuracy']:.1f}%",
            fontsize=10,
        )
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.set_xticks([])
        ax.set_yticks([])
    right = panels_w / (panels_w + legend_w)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, right, 0.95))
    if colours is not None:
        handles, names = axes[0, 0].get_legend_handles_labels()
        fig.legend(
            handles,
            names,
            loc="center left",
            bbox_to_anchor=(right, 0.5),
            ncol=legend_cols,
            fontsize=7,
            markerscale=max(1.0, 5 / math.sqrt(size)),
            title="class",
            title_fontsize=8,
            frameon=False,
        )
    else:
        cbar = fig.colorbar(sc, ax=axes[0].tolist(), fraction=0.02)
        cbar.set_label("class index (names in figures.json)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def plot_case_study(
    images: Sequence[np.ndarray],
    labels: np.ndarray,
    heads: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    *,
    title: str,
    path: Path,
) -> None:
    """A grid of test images, each with its true class and the top-3 classes and probabilities of
    each head in `heads` ({display name: logits [K, C]}); a head's line is green when its top-1 is
    right, red when wrong."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(images)
    cols = min(4, k)
    rows = math.ceil(k / cols)
    lines = 1 + 4 * len(heads)  # per head: its name and its top 3
    img_h, text_h, line_h = 2.2, 0.15 * lines + 0.1, 0.15
    fig = plt.figure(figsize=(2.7 * cols, (img_h + text_h) * rows + 0.8))
    width = max(len(_short(n)) for n in class_names)
    grid = fig.add_gridspec(
        2 * rows,
        cols,
        height_ratios=[img_h, text_h] * rows,
        left=0.02,
        right=0.98,
        bottom=0.01,
        top=1 - 0.8 / fig.get_figheight(),
        wspace=0.08,
        hspace=0.15,
    )
    probs = {h: _softmax(np.asarray(lg, np.float64)) for h, lg in heads.items()}
    for i in range(k):
        r, c = divmod(i, cols)
        ax = fig.add_subplot(grid[2 * r, c])
        ax.imshow(images[i], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"true: {_short(class_names[labels[i]])}", fontsize=9, fontweight="bold")
        tx = fig.add_subplot(grid[2 * r + 1, c])
        tx.axis("off")
        y = 1.0
        step = line_h / text_h
        for head, p in probs.items():
            top = np.argsort(-p[i])[:3]
            colour = "tab:green" if top[0] == labels[i] else "tab:red"
            verdict = "right" if top[0] == labels[i] else "wrong"
            tx.text(
                0.08,
                y,
                f"{head} ({verdict})",
                va="top",
                fontsize=8,
                color=colour,
                fontweight="bold",
            )
            y -= step
            for cls in top:
                mark = " ✓" if cls == labels[i] else ""
                tx.text(
                    0.12,
                    y,
                    f"{_short(class_names[cls]):<{width}}  {p[i, cls]:.2f}{mark}",
                    va="top",
                    fontsize=7.5,
                    family="monospace",
                    color=colour if cls == top[0] else "black",
                )
                y -= step
    fig.suptitle(title, fontsize=11, y=1 - 0.25 / fig.get_figheight())
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_images(config: ml_collections.ConfigDict, split: str, indices: Sequence[int]):
    """Test images number `indices` of `split` (the order of the predictions), as the model saw
    them: decoded, resized and centre-cropped, uint8."""
    from marnet_jax.data import datasets, pipeline

    src = datasets.source(config.data, split)
    resize = pipeline.ResizeCentreCrop(
        config.data.image_size, config.data.eval_crop_ratio, config.data.interpolation
    )
    decode = pipeline.DecodeImage()
    return [resize.map(decode.map(dict(src[int(i)])))["image"] for i in indices]


# --------------------------------------------------------------------------------------------------
# Verdicts and markdown.


def _paired(per_seed: Mapping[int, Mapping[str, Any]], get_a, get_b, better, worse):
    """'a' and 'b': mean and std over seeds of get_a and get_b; the verdict on a - b per seed."""
    seeds = sorted(per_seed)
    a = [get_a(per_seed[s]) for s in seeds]
    b = [get_b(per_seed[s]) for s in seeds]
    return {
        "seeds": seeds,
        "a": common.mean_std(a),
        "b": common.mean_std(b),
        "verdict": common.paired_verdict([x - y for x, y in zip(a, b)], better, worse),
    }


METRIC_NAMES = {
    "silhouette": "silhouette",
    "knn_accuracy": "k-NN accuracy",
    "mean_confidence_correct": "confidence when correct",
    "accuracy": "top-1",
}


def claims(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The paper's two claims about x_CDR (Figures 3 and 4), per metric, paired over seeds; plus the
    variant's x_v against the comparison variant's x_v."""
    per_seed = report["per_seed"][report["variant"]]
    out = []
    first = per_seed[min(per_seed)]
    if "x_cdr" in first["cluster"]:
        for metric in ("silhouette", "knn_accuracy"):
            c = _paired(
                per_seed,
                lambda r, m=metric: r["cluster"]["x_cdr"][m],
                lambda r, m=metric: r["cluster"]["x_v"][m],
                "x_CDR better clustered",
                "x_CDR less well clustered",
            )
            claim = f"x_CDR is better clustered by class than x_v ({METRIC_NAMES[metric]})"
            out.append(
                {"claim": claim, "metric": metric, "subject": "x_cdr", "reference": "x_v", **c}
            )
        for metric in ("mean_confidence_correct", "accuracy"):
            c = _paired(
                per_seed,
                lambda r, m=metric: r["confidence"]["cdr"][m],
                lambda r, m=metric: r["confidence"]["visual"][m],
                f"CDR head higher {METRIC_NAMES[metric]}",
                f"CDR head lower {METRIC_NAMES[metric]}",
            )
            claim = (
                "the CDR head is more confident in its correct predictions than the visual probe"
                if metric == "mean_confidence_correct"
                else "the CDR head is more accurate than the visual probe"
            )
            claim += f" ({METRIC_NAMES[metric]})"
            out.append(
                {"claim": claim, "metric": metric, "subject": "cdr", "reference": "visual", **c}
            )
    compare = report.get("compare")
    if compare and compare in report["per_seed"]:
        theirs = report["per_seed"][compare]
        seeds = sorted(set(per_seed) & set(theirs))
        if seeds:
            joint = {s: {"ours": per_seed[s], "theirs": theirs[s]} for s in seeds}
            for metric in ("silhouette", "knn_accuracy"):
                c = _paired(
                    joint,
                    lambda r, m=metric: r["ours"]["cluster"]["x_v"][m],
                    lambda r, m=metric: r["theirs"]["cluster"]["x_v"][m],
                    f"{report['variant']} x_v better clustered",
                    f"{report['variant']} x_v less well clustered",
                )
                claim = (
                    f"x_v of {report['variant']} is better clustered by class than x_v of "
                    f"{compare} ({METRIC_NAMES[metric]})"
                )
                out.append(
                    {
                        "claim": claim,
                        "metric": metric,
                        "subject": report["variant"],
                        "reference": compare,
                        **c,
                    }
                )
    return out


def _fmt(metric: str, ms: Sequence[float]) -> str:
    mean, std = ms
    if metric == "silhouette":
        return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None and math.isfinite(std) else "")
    return reporting.pct_pm(mean, std)


def markdown(report: Mapping[str, Any]) -> str:
    n = report["num_examples"]
    seeds = ", ".join(str(s) for s in report["seeds"])
    lines = [
        f"Feature spaces on {n} test images, mean ± std over seeds {seeds}. Silhouette: cosine, "
        f"-1..1, higher means tighter and better separated classes. k-NN: leave-one-out "
        f"{report['knn_k']}-nearest-neighbour accuracy (%), cosine.",
        "",
    ]
    rows = []
    for label, summary in report["summary"].items():
        for space, m in summary["cluster"].items():
            rows.append(
                [
                    label,
                    SPACES[space],
                    _fmt("silhouette", m["silhouette"]),
                    _fmt("knn", m["knn_accuracy"]),
                ]
            )
    lines += [
        reporting.markdown_table(["variant", "space", "silhouette", "k-NN accuracy"], rows),
        "",
    ]
    rows = []
    for label, summary in report["summary"].items():
        for head, m in summary["confidence"].items():
            rows.append(
                [
                    label,
                    HEAD_NAMES[head],
                    reporting.pct_pm(*m["accuracy"]),
                    _fmt("conf", m["mean_confidence_correct"]),
                    _fmt("conf", m["mean_confidence_wrong"]),
                ]
            )
    lines += [
        "Confidence (%): mean top-1 softmax probability of the correct and of the wrong predictions.",
        "",
        reporting.markdown_table(
            ["variant", "head", "top-1", "confidence when correct", "confidence when wrong"], rows
        ),
        "",
    ]
    if report["claims"]:
        lines += ["Paired by seed:", ""]
        for c in report["claims"]:
            metric = c["metric"]
            lines.append(
                f"- {c['claim']}: {_fmt(metric, c['a'])} vs {_fmt(metric, c['b'])}: "
                f"**{c['verdict']}**."
            )
        lines.append("")
    lines += [
        f"![t-SNE of the feature spaces (seed {report['figure_seed']})](tsne.png)",
        "",
        f"![case study: top-3 of the visual probe and the CDR head (seed {report['figure_seed']})]"
        "(case_study.png)",
    ]
    return "\n".join(lines) + "\n"


def _summarise(per_seed: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    return {
        "cluster": {
            space: {
                m: common.mean_std([per_seed[s]["cluster"][space][m] for s in seeds])
                for m in first["cluster"][space]
            }
            for space in first["cluster"]
        },
        "confidence": {
            head: {
                m: common.mean_std([per_seed[s]["confidence"][head][m] for s in seeds])
                for m in ("accuracy", "mean_confidence_correct", "mean_confidence_wrong")
            }
            for head in first["confidence"]
        },
    }


# --------------------------------------------------------------------------------------------------
# The study.


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    variant: str = "full",
    compare: str | None = "baseline",
    seeds: Sequence[int] | None = None,
    num_examples: int = 1500,
    grid: int = 12,
    grid_seed: int = 0,
    perplexity: float = 30.0,
    tsne_max_iter: int = 1000,
    knn_k: int = 10,
    command: str = "",
) -> dict[str, Any]:
    """Scores every selected run, draws the figures from the first seed, writes the study files."""

    workdir = Path(workdir)
    out_dir = workdir / STUDY
    out_dir.mkdir(parents=True, exist_ok=True)
    index = common.run_index(workdir)
    labels = [variant] + ([compare] if compare and compare in index and compare != variant else [])
    runs = common.select_runs(index, [variant], seeds)
    if len(labels) > 1:
        available = sorted(set(index[compare]) & set(runs[variant]))
        runs |= common.select_runs(index, [compare], available)
    split = common.split_with_limit(config.data, config.data.test_split, num_examples)
    if grid < 1:
        raise common.UsageError(f"--grid must be >= 1, got {grid}.")
    prov = common.Provenance(command, common.first_run_config(runs, config), sorted(runs[variant]))

    per_seed: dict[str, dict[int, Any]] = {label: {} for label in runs}
    figure_seed = min(runs[variant])
    for label, by_seed in runs.items():
        for s, run_dir in sorted(by_seed.items()):
            trained = common.load_run(run_dir, common.run_config(run_dir, config))
            out = common.predict(trained, common.predict_fn(trained, OUTPUTS), split)
            if label != variant:  # only the comparison's backbone feature and heads
                out = {k: v for k, v in out.items() if k not in ("x_ema", "x_cdr")}
            per_seed[label][s] = analyse(out, knn_k)
            log.info("Figures: %s seed %d: %s", label, s, per_seed[label][s]["cluster"])
            if label == variant and s == figure_seed:
                class_names = trained.facts.class_names
                fig_out, fig_trained = out, trained
    n = len(fig_out["label"])
    cfg = prov.config
    base_title = f"{config_name(command)} ({cfg['dataset']}, {cfg['train_steps']} steps), {variant}"
    plot_tsne(
        fig_out,
        per_seed[variant][figure_seed]["cluster"],
        class_names,
        perplexity=perplexity,
        max_iter=tsne_max_iter,
        seed=figure_seed,
        title=f"t-SNE of {n} test images by class: {base_title}, seed {figure_seed}",
        path=out_dir / "tsne.png",
    )
    rng = np.random.default_rng(grid_seed)
    picked = np.sort(rng.choice(n, size=min(grid, n), replace=False))
    heads = {"visual probe": fig_out["visual_logits"][picked]}
    if "cdr_logits" in fig_out:
        heads["CDR head"] = fig_out["cdr_logits"][picked]
    plot_case_study(
        load_images(fig_trained.config, split, picked),
        fig_out["label"][picked],
        heads,
        class_names,
        title=f"Case study, {len(picked)} random test images (seed {grid_seed}): {base_title}, "
        f"seed {figure_seed}",
        path=out_dir / "case_study.png",
    )
    report: dict[str, Any] = {
        "study": STUDY,
        "variant": variant,
        "compare": compare if len(labels) > 1 else None,
        "split": split,
        "num_examples": n,
        "seeds": sorted(runs[variant]),
        "figure_seed": figure_seed,
        "knn_k": knn_k,
        "tsne_perplexity": min(perplexity, (n - 1) / 3),
        "tsne_max_iter": tsne_max_iter,
        "case_study": {
            "indices": picked,
            "labels": fig_out["label"][picked],
            "grid_seed": grid_seed,
        },
        "class_names": list(class_names),
        "runs": {label: {s: str(p) for s, p in r.items()} for label, r in runs.items()},
        "per_seed": per_seed,
        "summary": {label: _summarise(r) for label, r in per_seed.items()},
    }
    report["claims"] = claims(report)
    report["provenance"] = prov.finish()
    reporting.write_json(out_dir / "figures.json", report)
    (out_dir / "figures.md").write_text(markdown(report))
    log.info("Wrote %s/figures.{json,md}, tsne.png, case_study.png", out_dir)
    return report


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "variant", "full", "Ablation variant whose features are drawn.", flag_values=fv
    )
    flags.DEFINE_string(
        "compare",
        "baseline",
        "Variant whose x_v is scored for comparison ('' for none).",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "seeds", [], "Seeds (default: every seed the ablation trained).", flag_values=fv
    )
    flags.DEFINE_integer(
        "num_examples", 1500, "First N test images (0: the whole split).", flag_values=fv
    )
    flags.DEFINE_integer("grid", 12, "Test images in the case-study grid.", flag_values=fv)
    flags.DEFINE_integer(
        "grid_seed", 0, "Seed of the random choice of case-study images.", flag_values=fv
    )
    flags.DEFINE_float(
        "perplexity", 30.0, "t-SNE perplexity (capped at (N - 1) / 3).", flag_values=fv
    )
    flags.DEFINE_integer(
        "tsne_max_iter", 1000, "t-SNE optimisation steps (>= 250).", flag_values=fv
    )
    flags.DEFINE_integer("knn_k", 10, "k of the k-NN accuracy.", flag_values=fv)


def _run_from_flags(f: flags.FlagValues) -> Path:
    run(
        f.config,
        f.workdir,
        variant=f.variant,
        compare=f.compare or None,
        seeds=common.parse_ints(f.seeds, "--seeds") if f.seeds else None,
        num_examples=f.num_examples,
        grid=f.grid,
        grid_seed=f.grid_seed,
        perplexity=f.perplexity,
        tsne_max_iter=f.tsne_max_iter,
        knn_k=f.knn_k,
        command=common.command_line(),
    )
    return Path(f.workdir) / STUDY / "figures.md"


def main(argv: Sequence[str] | None = None) -> int:
    return common.study_cli("evidence.figures", _define_flags, _run_from_flags, argv, doc=__doc__)


if __name__ == "__main__":
    cli.run(main)
