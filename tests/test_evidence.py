"""Evidence studies on the tiny config: corruptions, ablation, robustness, figures, CDR inference,
results page. One tiny ablation (baseline and full, one seed, 2 steps) is shared by the study tests."""

import csv
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import default, tiny
from evidence import (
    ablation,
    cdr_inference,
    common,
    convergence,
    corruptions,
    figures,
    gradients,
    low_data,
    results,
    robustness,
)
from marnet_jax.config import apply_variant
from marnet_jax.data import pipeline
from marnet_jax.train import trainer

REPO = Path(__file__).resolve().parents[1]
COMMAND = "python -m evidence.ablation --config configs/tiny.py --workdir W"


def _config(data_dir):
    config = tiny.get_config()
    config.data.data_dir = str(data_dir)
    config.mesh.num_devices = 1
    config.train.num_steps = 2
    return config


def _csv_header(path):
    with path.open() as f:
        return next(csv.reader(f))


def _png_ok(path):
    assert path.exists() and path.stat().st_size > 10_000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# Corruptions (pure).


def _images(n=4, size=32):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        base = np.stack([yy, xx, 1 - yy * xx], -1) * rng.uniform(80, 200, 3)
        base[size // 4 : size // 2, size // 3 : 2 * size // 3] = rng.uniform(0, 255, 3)
        out.append(np.clip(base + 20, 0, 255).astype(np.uint8))
    return out


@pytest.mark.parametrize("name", corruptions.NAMES)
def test_corruption_identity_shape_monotone_deterministic(name):
    images = _images()
    for image in images:
        assert corruptions.corrupt(image, name, 0, np.random.default_rng(0)) is image
    distances = []
    for s in range(1, corruptions.MAX_SEVERITY + 1):
        d = []
        for i, image in enumerate(images):
            out = corruptions.corrupt(image, name, s, np.random.default_rng(i))
            assert out.shape == image.shape and out.dtype == np.uint8
            again = corruptions.corrupt(image, name, s, np.random.default_rng(i))
            np.testing.assert_array_equal(out, again)
            d.append(np.abs(out.astype(float) - image).mean())
        distances.append(np.mean(d))
    assert distances[0] > 0, name
    assert all(b > a for a, b in itertools.pairwise(distances)), (name, distances)


def test_corruption_randomness_follows_the_seed():
    image = _images(1)[0]
    for name in ("colour_cast", "rotation", "crop_scale", "gaussian_noise", "occlusion"):
        outs = [corruptions.corrupt(image, name, 3, np.random.default_rng(k)) for k in range(8)]
        assert any(not np.array_equal(outs[0], o) for o in outs[1:]), name


def test_corruption_bad_input_is_a_clear_error():
    image = _images(1)[0]
    with pytest.raises(ValueError, match="Unknown corruption 'fog'"):
        corruptions.Corrupt("fog", 1)
    with pytest.raises(ValueError, match=r"severity must be an int in 0\.\.5"):
        corruptions.corrupt(image, "blur", 6, np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        corruptions.corrupt(image.astype(np.float32), "blur", 1, np.random.default_rng(0))


def test_corruptions_in_the_eval_pipeline_are_seeded(tiny_data_dir):
    data = _config(tiny_data_dir).data

    def images(transforms, seed):
        batches = pipeline.eval_batches(
            data, "test", batch_size=32, shard_index=0, shard_count=1,
            extra_transforms=transforms, seed=seed,
        )  # fmt: skip
        return np.concatenate([b["image"] for b in batches])

    clean = images([], 0)
    noisy = images([corruptions.Corrupt("gaussian_noise", 3)], 0)
    np.testing.assert_array_equal(noisy, images([corruptions.Corrupt("gaussian_noise", 3)], 0))
    assert not np.array_equal(noisy, images([corruptions.Corrupt("gaussian_noise", 3)], 1))
    assert not np.allclose(noisy, clean)
    np.testing.assert_array_equal(images([corruptions.Corrupt("gaussian_noise", 0)], 0), clean)


# --------------------------------------------------------------------------------------------------
# Ablation helpers (pure).


def _record(seed, fused, wall=10.0):
    test = {"fused_top1": fused, "fused_top5": 0.9, "visual_top1": fused - 0.01, "visual_top5": 0.9}
    return {"seed": seed, "test": test, "train_wall_s": wall, "train_cpu_s": 2 * wall}


def test_ablation_summary_and_paired_verdicts():
    base = {s: _record(s, f) for s, f in zip((0, 1, 2), (0.40, 0.42, 0.44))}
    better = {s: _record(s, f) for s, f in zip((0, 1, 2), (0.45, 0.43, 0.50))}
    worse = {s: _record(s, f) for s, f in zip((0, 1, 2), (0.30, 0.31, 0.32))}
    mixed = {s: _record(s, f) for s, f in zip((0, 1, 2), (0.45, 0.40, 0.46))}
    summary = ablation.summarise(list(base.values()))
    assert summary["fused_top1_mean"] == pytest.approx(0.42)
    assert summary["fused_top1_std"] == pytest.approx(0.02)
    assert summary["train_wall_s_mean"] == pytest.approx(10.0)
    assert "cdr_top1_mean" not in summary
    c = ablation.compare("x", better, base, "a", "b")
    assert c["verdict"] == "helps" and c["delta_mean"] == pytest.approx(0.04)
    assert ablation.compare("x", worse, base, "a", "b")["verdict"].startswith("does not help")
    assert "no consistent effect (2 of 3" in ablation.compare("x", mixed, base, "a", "b")["verdict"]
    one = ablation.compare("x", {0: better[0]}, {0: base[0]}, "a", "b")
    assert one["verdict"] == "one seed only: no verdict"


def test_extra_variant_specs():
    assert ablation.parse_extra_variant("gated=full model.fusion=gated cdr_w=1.5") == (
        "gated",
        "full",
        {"model.fusion": "gated", "cdr_w": 1.5},
    )
    # A variant's own name labels that variant with settings of its own (its tuned settings).
    assert ablation.parse_extra_variant("full=full loss.w_mse=0.3") == (
        "full",
        "full",
        {"loss.w_mse": 0.3},
    )
    for bad in (
        "gated",
        "gated=nope",
        "full=full",
        "ema=full loss.w_mse=0.3",
        "x=full model.fusion",
    ):
        with pytest.raises(ValueError, match="--extra_variant"):
            ablation.parse_extra_variant(bad)
    config = tiny.get_config()
    with pytest.raises(ValueError, match=r"model\.fusionn"):
        ablation.variant_config(config, "full", {"model.fusionn": "sum"}, 0)
    cfg = ablation.variant_config(config, "cdr", {"model.fusion": "sum"}, 3)
    assert (cfg.model.use_ema, cfg.model.use_cdr, cfg.model.fusion, cfg.seed) == (
        False,
        True,
        "sum",
        3,
    )
    assert config.model.fusion == "concat"  # the base config is left alone


def test_cdr_settings_grid():
    grid, skipped = cdr_inference.settings(20, (1, 5, 50), (1, 4), True, ("ddim", 4, 1))
    assert grid[:2] == [("ddpm", 20, 1), ("ddpm", 20, 4)]
    assert ("ddim", 5, 4) in grid and grid[-1] == ("ddim", 4, 1) and skipped == [50]
    with pytest.raises(ValueError, match="positive"):
        cdr_inference.settings(20, (0,), (1,), True)


def test_cluster_scores_separate_clustered_from_random_features():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 25)
    centres = rng.normal(size=(4, 16)) * 5
    clustered = centres[labels] + rng.normal(size=(100, 16))
    good = figures.cluster_scores(clustered, labels, 5)
    bad = figures.cluster_scores(rng.normal(size=(100, 16)), labels, 5)
    assert good["knn_accuracy"] == 1.0 and good["silhouette"] > 0.5
    assert bad["knn_accuracy"] < 0.6 and bad["silhouette"] < 0.1
    conf = figures.confidence(np.array([[5.0, 0.0], [0.0, 1.0], [2.0, 0.0]]), np.array([0, 1, 1]))
    assert conf["accuracy"] == pytest.approx(2 / 3) and conf["num_correct"] == 2
    sigmoid = lambda x: 1 / (1 + np.exp(-x))
    assert conf["mean_confidence_correct"] == pytest.approx((sigmoid(5) + sigmoid(1)) / 2)
    assert conf["mean_confidence_wrong"] == pytest.approx(sigmoid(2))
    assert conf["mean_true_class_probability"] == pytest.approx(
        (sigmoid(5) + sigmoid(1) + sigmoid(-2)) / 3
    )


# --------------------------------------------------------------------------------------------------
# The studies on one tiny ablation.


@pytest.fixture(scope="module")
def evidence(tiny_data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("evidence")
    config = _config(tiny_data_dir)
    report = ablation.run(
        config, workdir, variants=("baseline", "full"), seeds=(0,), command=COMMAND
    )
    return workdir, config, report


def test_ablation_writes_its_tables(evidence):
    workdir, _, _ = evidence
    out = workdir / "ablation"
    assert _csv_header(out / "ablation.csv") == ablation.CSV_COLUMNS
    data = json.loads((out / "ablation.json").read_text())
    assert set(data["variants"]) == {"baseline", "full"}
    assert {"command", "config", "seeds", "machine", "wall_s"} <= set(data["provenance"])
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True)
    if head.returncode == 0:  # the studies record the commit of the code that ran them
        assert data["provenance"]["git_commit"].startswith(head.stdout.decode().strip())
    assert data["provenance"]["config"]["train_steps"] == 2
    full = data["variants"]["full"]
    assert full["use_ema"] and full["use_cdr"] and full["summary"]["cdr_top1_mean"] >= 0
    run = full["runs"][0]
    assert run["train_wall_s"] > 0 and run["test"]["num_examples"] == 64
    assert (out / run["dir"] / ablation.MARKER).exists()
    assert [c["name"] for c in data["comparisons"]] == ["EMA + CDR (full MARNet)"]
    md = (out / "ablation.md").read_text()
    assert "| baseline | no | no | no | no | - | 0 |" in md and "one seed only" in md


def test_ablation_rerun_skips_finished_runs_and_refuses_a_changed_config(evidence, monkeypatch):
    workdir, config, report = evidence

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(trainer, "train_and_evaluate", no_training)
    again = ablation.run(config, workdir, variants=("baseline", "full"), seeds=(0,))
    assert again["variants"]["full"]["runs"] == report["variants"]["full"]["runs"]
    changed = _config(config.data.data_dir)
    changed.train.num_steps = 3
    with pytest.raises(common.UsageError, match=r"train.num_steps: 2 -> 3"):
        ablation.run(changed, workdir, variants=("baseline",), seeds=(0,))


def test_a_run_of_the_earlier_config_layout_is_compared_field_by_field(tiny_data_dir, tmp_path):
    """A run directory whose config.json has the earlier model layout (cdr.head_input, ...) is read
    as the trainer reads it: a moved field that differs is still a difference."""
    config = apply_variant(_config(tiny_data_dir), "full")
    old = json.loads(config.to_json_best_effort())
    old["model"]["cdr"]["head_input"] = "one_step"
    del old["model"]["cdr_wiring"]["head_input"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(old))
    with pytest.raises(
        common.UsageError, match=r"model.cdr_wiring.head_input: 'one_step' -> 'chain'"
    ):
        ablation.train_run(config, run_dir)


def test_the_studies_read_every_finished_run_of_an_ablation_run_in_parts(evidence, tmp_path):
    workdir, config, _ = evidence
    shutil.copytree(workdir / "ablation", tmp_path / "ablation")
    ablation.run(config, tmp_path, variants=("baseline",), seeds=(0,))  # rewrites ablation.json
    assert list(json.loads((tmp_path / "ablation/ablation.json").read_text())["variants"]) == [
        "baseline"
    ]
    index = common.run_index(tmp_path)
    assert index == {
        "baseline": {0: tmp_path / "ablation/runs/baseline/seed_0"},
        "full": {0: tmp_path / "ablation/runs/full/seed_0"},
    }
    with pytest.raises(common.UsageError, match="No finished ablation runs"):
        common.run_index(tmp_path / "empty")


def test_ablation_gives_some_variants_more_seeds_and_pairs_on_shared_seeds(
    tiny_data_dir, tmp_path, monkeypatch
):
    def fake_training(config, workdir):  # accuracy = 0.5 + seed / 100 (+ 0.1 for full)
        acc = 0.5 + config.seed / 100 + 0.1 * (config.variant == "full")
        split = {"fused_top1": acc, "fused_top5": 1.0, "num_examples": 64.0}
        return {config.data.eval_split: split, config.data.test_split: split}

    monkeypatch.setattr(trainer, "train_and_evaluate", fake_training)
    seeds_of = common.parse_ints_of(["baseline,full=0,1,2,3"], "--seeds_of")
    assert seeds_of == {"baseline": [0, 1, 2, 3], "full": [0, 1, 2, 3]}
    config = _config(tiny_data_dir)
    report = ablation.run(
        config, tmp_path, variants=("baseline", "ema", "full"), seeds=(0, 1), seeds_of=seeds_of
    )
    runs = {k: [r["seed"] for r in v["runs"]] for k, v in report["variants"].items()}
    assert runs == {"baseline": [0, 1, 2, 3], "ema": [0, 1], "full": [0, 1, 2, 3]}
    by_name = {c["name"]: c for c in report["comparisons"]}
    assert by_name["EMA + CDR (full MARNet)"]["seeds"] == [0, 1, 2, 3]
    assert by_name["EMA + CDR (full MARNet)"]["delta_mean"] == pytest.approx(0.1)
    assert by_name["EMA alone"]["seeds"] == [0, 1]
    assert report["provenance"]["seeds"] == [0, 1, 2, 3]
    assert (
        "| ema | yes | no | no | no | joint | 0, 1 |"
        in (tmp_path / "ablation/ablation.md").read_text()
    )
    with pytest.raises(common.UsageError, match=r"'aux'.*not trained here"):
        ablation.run(config, tmp_path, variants=("baseline",), seeds=(0,), seeds_of={"aux": [0]})
    with pytest.raises(common.UsageError, match="expected 'VARIANT"):
        common.parse_ints_of(["baseline:0,1"], "--seeds_of")


def test_ablation_compares_variants_with_settings_of_their_own_under_their_names(
    tiny_data_dir, tmp_path, monkeypatch
):
    """Each variant trained with its own tuned settings is still 'baseline', 'full', ...: the
    paper's comparisons pair them, and the report records each one's settings."""

    def fake_training(config, workdir):  # accuracy = 0.5 + 0.1 for full + the label smoothing
        acc = 0.5 + 0.1 * (config.variant == "full") + config.loss.label_smoothing
        split = {"fused_top1": acc, "fused_top5": 1.0, "num_examples": 64.0}
        return {config.data.eval_split: split, config.data.test_split: split}

    monkeypatch.setattr(trainer, "train_and_evaluate", fake_training)
    config = _config(tiny_data_dir)
    tuned = ("baseline=baseline loss.label_smoothing=0.05", "full=full loss.w_mse=0.3")
    report = ablation.run(config, tmp_path, variants=("ema",), seeds=(0, 1), extra_variants=tuned)
    assert report["variants"]["baseline"]["overrides"] == {"loss.label_smoothing": 0.05}
    assert report["variants"]["full"]["base"] == "full"
    by_name = {c["name"]: c for c in report["comparisons"]}
    assert set(by_name) == {"EMA alone", "EMA + CDR (full MARNet)", "CDR on top of EMA"}
    assert by_name["EMA + CDR (full MARNet)"]["delta_mean"] == pytest.approx(0.05)
    with pytest.raises(common.UsageError, match="'baseline' given twice"):
        ablation.run(config, tmp_path, variants=("baseline",), seeds=(0,), extra_variants=tuned)


def test_a_study_resumes_in_another_workdir_from_the_published_run_records(
    tiny_data_dir, tmp_path, monkeypatch
):
    """A study run in parts over several sessions: the records of the runs one part finished are
    published next to the page and restored into a fresh workdir, where they are not trained again
    (and, holding no weights, are not offered as models to the studies that read one)."""

    def fake_training(config, workdir):
        split = {"fused_top1": 0.5 + config.seed / 100, "fused_top5": 1.0, "num_examples": 64.0}
        return {config.data.eval_split: split, config.data.test_split: split}

    monkeypatch.setattr(trainer, "train_and_evaluate", fake_training)
    config, first, second = _config(tiny_data_dir), tmp_path / "a", tmp_path / "b"
    ablation.run(config, first / "protocol", variants=("baseline",), seeds=(0, 1))
    results.publish(first, tmp_path / "docs")
    assert "2 run records" in results.restore(tmp_path / "docs", second)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(trainer, "train_and_evaluate", no_training)
    again = ablation.run(config, second / "protocol", variants=("baseline",), seeds=(0, 1))
    assert [r["validation"]["fused_top1"] for r in again["variants"]["baseline"]["runs"]] == [
        0.5,
        0.51,
    ]
    with pytest.raises(common.UsageError, match="hold no weights"):
        common.run_index(second / "protocol")
    changed = _config(tiny_data_dir)
    changed.train.num_steps = 3  # a restored record still guards its run's config
    with pytest.raises(common.UsageError, match=r"train.num_steps: 2 -> 3"):
        ablation.run(changed, second / "protocol", variants=("baseline",), seeds=(0,))


def test_ablation_stops_on_preemption_without_marking_the_run_done(
    tiny_data_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(trainer, "train_and_evaluate", lambda config, wd: {"preempted_at_step": 1})
    with pytest.raises(ablation.Preempted, match="run the same command again"):
        ablation.run(_config(tiny_data_dir), tmp_path, variants=("baseline",), seeds=(0,))
    assert not list(tmp_path.rglob(ablation.MARKER))


@pytest.fixture(scope="module")
def robustness_report(evidence):
    workdir, config, _ = evidence
    return robustness.run(
        config,
        workdir,
        names=("brightness", "occlusion"),
        severities=(1, 5),
        command="python -m evidence.robustness --config configs/tiny.py --workdir W",
    )


def test_robustness_writes_tables_and_plot(evidence, robustness_report):
    workdir, _, ablation_report = evidence
    out = workdir / "robustness"
    assert _csv_header(out / "robustness.csv") == robustness.CSV_COLUMNS
    rows = list(csv.DictReader((out / "robustness.csv").open()))
    assert {(r["model"], r["head"]) for r in rows} == {
        ("baseline", "fused"),
        ("baseline", "visual"),
        ("full", "fused"),
        ("full", "visual"),
        ("full", "cdr"),
    }
    assert {r["severity"] for r in rows} == {"0", "1", "5"}
    data = json.loads((out / "robustness.json").read_text())
    fused = data["models"]["full"]["heads"]["fused"]
    assert set(fused["groups"]) == {"all", "lighting", "clutter"}
    assert set(fused["curves"]) == {"brightness", "occlusion"}
    # Clean accuracy is the trainer's test accuracy of the same checkpoint, exactly.
    for label in ("baseline", "full"):
        trained_test = ablation_report["variants"][label]["runs"][0]["test"]
        clean = data["per_seed"][label]["0"]["clean"]
        for key, value in clean.items():
            assert value == pytest.approx(trained_test[key]), (label, key)
    assert {c["group"] for c in data["comparisons"]} == {"all", "lighting", "clutter"}
    _png_ok(out / "robustness.png")
    _png_ok(out / "corruptions.png")
    assert (
        "![fused top-1 against corruption severity](robustness.png)"
        in (out / "robustness.md").read_text()
    )


def test_robustness_reuses_cached_runs(evidence, robustness_report, monkeypatch):
    workdir, config, _ = evidence

    def no_prediction(*args, **kwargs):
        raise AssertionError("cached results were recomputed")

    monkeypatch.setattr(common, "predict", no_prediction)
    again = robustness.run(config, workdir, names=("brightness", "occlusion"), severities=(1, 5))
    assert again["per_seed"] == robustness_report["per_seed"]
    with pytest.raises(common.UsageError, match="Unknown corruption 'fog'"):
        robustness.run(config, workdir, names=("fog",))


@pytest.fixture(scope="module")
def figures_report(evidence):
    workdir, config, _ = evidence
    return figures.run(config, workdir, grid=4, tsne_max_iter=250, knn_k=5)


def test_figures_writes_scores_and_pngs(evidence, figures_report):
    workdir, _, _ = evidence
    out = workdir / "figures"
    data = json.loads((out / "figures.json").read_text())
    cluster = data["per_seed"]["full"]["0"]["cluster"]
    assert set(cluster) == {"x_v", "x_ema", "x_cdr"}
    assert set(data["per_seed"]["baseline"]["0"]["cluster"]) == {"x_v"}
    for scores in cluster.values():
        assert -1 <= scores["silhouette"] <= 1 and 0 <= scores["knn_accuracy"] <= 1
    confidence = data["per_seed"]["full"]["0"]["confidence"]
    assert set(confidence) == {"fused", "visual", "cdr"}
    assert {"accuracy", "mean_confidence_correct", "mean_confidence_wrong"} <= set(
        confidence["cdr"]
    )
    claims = {(c["subject"], c["reference"], c["metric"]) for c in data["claims"]}
    assert claims == {
        ("x_cdr", "x_v", "silhouette"),
        ("x_cdr", "x_v", "knn_accuracy"),
        ("cdr", "visual", "mean_confidence_correct"),
        ("cdr", "visual", "accuracy"),
        ("full", "baseline", "silhouette"),
        ("full", "baseline", "knn_accuracy"),
    }
    assert len(data["case_study"]["indices"]) == 4 and data["num_examples"] == 64
    _png_ok(out / "tsne.png")
    _png_ok(out / "case_study.png")


@pytest.fixture(scope="module")
def cdr_report(evidence):
    workdir, config, _ = evidence
    return cdr_inference.run(
        config,
        workdir,
        ddim_steps=(1,),
        num_samples=(2,),
        ddpm=False,
        repeats=2,
        latency_batch_sizes=(8,),
    )


def test_cdr_inference_table_and_trained_setting_reproduces_the_run(evidence, cdr_report):
    workdir, _, ablation_report = evidence
    out = workdir / "cdr_inference"
    header = _csv_header(out / "cdr_inference.csv")
    assert header[: len(cdr_inference.CSV_COLUMNS)] == cdr_inference.CSV_COLUMNS
    assert header[len(cdr_inference.CSV_COLUMNS) :] == ["ms_per_image_batch_8"]
    rows = cdr_report["rows"]
    assert [(r["sampler"], r["steps"], r["num_samples"]) for r in rows] == [
        ("ddim", 1, 2),
        ("ddim", 4, 1),  # the tiny config's own chain, added to the grid
    ]
    own = rows[-1]
    assert own["is_trained_setting"]
    trained_test = ablation_report["variants"]["full"]["runs"][0]["test"]
    for key in ("cdr_top1", "cdr_top5", "fused_top1", "fused_top5"):
        assert own[key][0] == pytest.approx(trained_test[key]), key
    for r in rows:
        assert all(v > 0 for v in r["latency_s"].values())
    assert {r["head"] for r in cdr_report["recommendations"]} == {"fused", "cdr"}
    assert "(trained)" in (out / "cdr_inference.md").read_text()


def test_results_page_from_every_study(
    evidence, robustness_report, figures_report, cdr_report, tmp_path
):
    workdir, _, _ = evidence
    out = tmp_path / "docs" / "results.md"
    proc = subprocess.run(
        [sys.executable, "-m", "evidence.results", f"--workdir={workdir}",
         f"--output={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = out.read_text()
    for title in results.STUDIES.values():
        assert f"## {title}" in page
    assert page.count("- Command: `") == 4 and page.count("- Machine: ") == 4
    assert "EMA + CDR" in page and "one seed only" in page
    assert "- Privileged text with little data: not measured" in page
    for png in ("robustness_robustness.png", "figures_tsne.png", "figures_case_study.png"):
        assert f"](results/{png})" in page
        _png_ok(out.parent / "results" / png)


def _with_seeds(report, variant_values):
    """`report` with each variant's one run repeated as seeds 0, 1, 2 at the given test top-1s."""
    report = json.loads(json.dumps(report))
    for variant, values in variant_values.items():
        run = report["variants"][variant]["runs"][0]
        runs = [
            run | {"seed": s, "test": run["test"] | {"fused_top1": f}} for s, f in enumerate(values)
        ]
        report["variants"][variant]["runs"] = runs
        report["variants"][variant]["summary"] = ablation.summarise(runs)
    return report


def test_pretrained_section_pairs_imagenet_with_scratch_by_seed(evidence, tmp_path):
    """The ImageNet-weights study: one ablation call per initialisation under pretrained/, one
    table, ImageNet against scratch per variant and MARNet against the baseline per init, paired by
    seed, and its claims in the summary."""
    workdir, _, _ = evidence
    report = json.loads((workdir / "ablation" / "ablation.json").read_text())
    reports = {
        "scratch": _with_seeds(
            report, {"baseline": [0.50, 0.52, 0.51], "full": [0.49, 0.50, 0.53]}
        ),
        "imagenet": _with_seeds(
            report, {"baseline": [0.60, 0.61, 0.62], "full": [0.58, 0.66, 0.52]}
        ),
    }
    for init, r in reports.items():
        out = tmp_path / "pretrained" / init / "ablation"
        out.mkdir(parents=True)
        (out / "ablation.json").write_text(json.dumps(r))
    studies = results.load_studies(tmp_path)
    md = studies[results.PRETRAINED]["md"]
    assert md.count("| ImageNet-1k weights |") == 2 and md.count("| from scratch |") == 2
    names = [(c["name"], c["verdict"]) for c in results.pretrained_comparisons(reports)]
    assert names == [
        ("ImageNet weights, baseline", "helps"),
        ("ImageNet weights, full", "no consistent effect (2 of 3 seeds better)"),
        ("Full MARNet, from scratch", "no consistent effect (1 of 3 seeds better)"),
        ("Full MARNet, ImageNet-1k weights", "no consistent effect (1 of 3 seeds better)"),
    ]
    claims = results._pretrained_claims(reports)
    assert len(claims) == 4 and "**helps** (61.0 vs 51.0 %" in claims[0]
    assert claims[2].startswith("- Full MARNet, from scratch (scratch full vs scratch baseline)")
    page = results.page(tmp_path, tmp_path / "results.md", "cmd")
    assert f"## {results.STUDIES[results.PRETRAINED]}" in page and md.strip() in page
    assert results._pretrained_claims(None)[0].endswith("not measured (run the pretrained study).")


def test_chosen_protocol_pretrained_section_round_trips_on_its_own(evidence, tmp_path):
    """Section 16: the ImageNet pair of the chosen protocol, under protocol/pretrained/, next to
    section 7's and published and restored as protocol_pretrained_<init>."""
    workdir, _, _ = evidence
    report = json.loads((workdir / "ablation" / "ablation.json").read_text())
    report = _with_seeds(report, {"baseline": [0.20, 0.18, 0.19], "full": [0.30, 0.28, 0.31]})
    out = tmp_path / "w" / "protocol" / "pretrained" / "imagenet" / "ablation"
    out.mkdir(parents=True)
    (out / "ablation.json").write_text(json.dumps(report))
    studies = results.load_studies(tmp_path / "w")
    assert set(studies) == {results.PROTOCOL_PRETRAINED}
    md = studies[results.PROTOCOL_PRETRAINED]["md"]
    assert "a thousandth of the heads' learning rate" in md and "| from scratch |" not in md
    (claim,) = [c for c in results.summary(studies) if "encoder lr x0.001" in c]
    assert claim.startswith(
        "- Full MARNet, ImageNet-1k weights (chosen protocol, encoder lr x0.001) "
        "(imagenet full vs imagenet baseline): **helps** (29.7 vs 19.0 %"
    )
    page = results.run(tmp_path / "w", tmp_path / "out/results.md").read_text()
    assert f"## {results.STUDIES[results.PROTOCOL_PRETRAINED]}" in page and md.strip() in page
    assert (tmp_path / "out/results/protocol_pretrained_imagenet.json").exists()
    assert "protocol_pretrained_imagenet" in results.restore(
        tmp_path / "out/results", tmp_path / "again"
    )
    restored = tmp_path / "again/protocol/pretrained/imagenet/ablation/ablation.json"
    assert json.loads(restored.read_text()) == report


def test_search_page_states_the_seed_spread_of_the_chosen_protocol_study():
    def setting(*vals):
        return {"runs": [{"validation": {"fused_top1": v}} for v in vals]}

    report = {
        "variants": {
            "a": setting(0.80, 0.82, 0.81),
            "b": setting(0.7, 0.7, 0.7, 0.7),
            "c": setting(0.9),
        },
        "provenance": {"config": {"train_steps": 6400}},
    }
    (note,) = results.seed_spread_note(report)[1:]
    assert "standard deviation of 0.0 to 1.0 points" in note
    assert "2 settings, 3-4 seeds each, 6400 steps" in note
    assert results.seed_spread_note(None) == []
    assert results.seed_spread_note({"variants": {"c": setting(0.9)}}) == []


def test_robustness_claims_name_the_chosen_protocol_study():
    c = {
        "group": "lighting",
        "model": "full",
        "drop_verdict": "no consistent effect",
        "mca_verdict": "hurts",
        "relative_drop": (0.2, 0.01),
        "reference_relative_drop": (0.21, 0.02),
        "mca": (0.6, 0.01),
        "reference_mca": (0.62, 0.01),
    }
    report = {
        "comparisons": [c, c | {"group": "camera"}],
        "provenance": {"config": {"train_steps": 6400}},
    }
    (line,) = results._robustness_claims(report, chosen=True)
    assert line.startswith(
        "- Claim: MARNet (full) resists lighting corruptions better than the baseline (chosen "
        "protocol, 6400 steps): **no consistent effect** (relative drop 20.0 ± 1.0 % vs 21.0 ± 2.0 %)"
    )
    assert "(chosen" not in results._robustness_claims(report)[0]
    assert results._robustness_claims(None, chosen=True) == []
    figures_report = {
        "claims": [
            {
                "claim": "x_CDR is better clustered than x_v",
                "verdict": "hurts",
                "seeds": [0, 1],
                "metric": "knn",
                "a": (0.6, 0.01),
                "b": (0.65, None),
            }
        ],
        "provenance": {"config": {"train_steps": 6400}},
    }
    (line,) = results._figures_claims(figures_report, chosen=True)
    assert line == (
        "- Claim: x_CDR is better clustered than x_v (chosen protocol, 6400 steps): **hurts** "
        "(60.0 ± 1.0 % vs 65.0 %, seeds 0, 1)."
    )


def test_low_data_claims_of_the_summary():
    c = dict(variant="full", fraction=0.1, seeds=[0, 1, 2], variant_mean=0.582)
    c |= dict(reference_mean=0.571, delta_mean=0.011, delta_std=0.006, verdict="helps")
    report = {
        "comparisons": [
            c | {"reference": "baseline"},
            c | {"variant": "aux", "reference": "baseline"},  # not MARNet's: no line
            c | {"reference": "aux", "fraction": 0.3, "verdict": "does not help (hurts)"},
        ]
    }
    assert results._low_data_claims(report) == [
        "- With 10 % of the training data, MARNet beats the baseline: **helps** (58.2 vs 57.1 %, "
        "difference 1.1 ± 0.6 points, seeds 0, 1, 2).",
        "- With 30 % of the training data, MARNet beats the ingredient head: **does not help: it "
        "lowers accuracy** (58.2 vs 57.1 %, difference 1.1 ± 0.6 points, seeds 0, 1, 2).",
    ]
    # The chosen protocol's study: every comparison, each at its fraction's budget.
    report["rows"] = [{"fraction": 0.1, "steps": 1600}, {"fraction": 0.3, "steps": 3200}]
    report["comparisons"].append(c | {"fraction": 1.0})  # section 11's runs: claimed there
    lines = results._low_data_claims(report, chosen=True)
    assert len(lines) == 3
    assert lines[1] == (
        "- With 10 % of the training data (chosen protocol, 1600 steps), the ingredient head beats "
        "the baseline: **helps** (58.2 vs 57.1 %, difference 1.1 ± 0.6 points, seeds 0, 1, 2)."
    )
    assert lines[2].startswith("- With 30 % of the training data (chosen protocol, 3200 steps)")
    assert results._low_data_claims(None, chosen=True) == []


def test_low_data_study_trains_subsets_and_shares_full_data_runs_with_the_ablation(
    evidence, tmp_path, monkeypatch
):
    source, config, _ = evidence
    # The ablation's finished baseline run is the full-data run: only the 50 % run trains.
    shutil.copytree(source / "ablation/runs/baseline", tmp_path / "ablation/runs/baseline")
    calls = []
    train = trainer.train_and_evaluate
    monkeypatch.setattr(
        trainer, "train_and_evaluate", lambda cfg, d: calls.append(d) or train(cfg, d)
    )
    report = low_data.run(
        config, tmp_path, fractions=(0.5, 1.0), variants=("baseline",), seeds=(0,)
    )
    assert calls == [str(tmp_path / "low_data/runs/baseline/frac_0.5/seed_0")]
    rows = {r["fraction"]: r for r in report["rows"]}
    assert set(rows) == {0.5, 1.0} and rows[0.5]["num_train"] == 100
    marker = tmp_path / "low_data/runs/baseline/frac_0.5/seed_0" / ablation.MARKER
    assert json.loads(marker.read_text())["config"]["data"]["train_fraction"] == 0.5
    out = tmp_path / "low_data"
    assert _csv_header(out / "low_data.csv") == low_data.CSV_COLUMNS
    _png_ok(out / "low_data.png")
    md = (out / "low_data.md").read_text()
    assert "| baseline | 50 % (100) | 1 |" in md and f"| {config.train.num_steps} | - |" in md

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(trainer, "train_and_evaluate", no_training)
    again = low_data.run(config, tmp_path, fractions=(0.5, 1.0), variants=("baseline",), seeds=(0,))
    assert again["rows"] == report["rows"]
    with pytest.raises(common.UsageError, match="fractions"):
        low_data._parse_fractions(["0.1", "2"])
    # A variant with settings of its own: that run is another config, so it cannot pass for the
    # ablation's run of the same name.
    with pytest.raises(common.UsageError, match=r"loss.label_smoothing: 0.0 -> 0.1"):
        low_data.run(config, tmp_path, fractions=(1.0,), variants=(), seeds=(0,),
                     extra_variants=("baseline=baseline loss.label_smoothing=0.1",))  # fmt: skip


def test_low_data_plan_takes_a_setting_and_seeds_per_fraction(tiny_data_dir):
    """The setting chosen on one share of the data trains at that share only; a fraction may have
    more seeds than the others."""
    config = apply_variant(_config(tiny_data_dir), "full,teacher")
    plan = low_data.plan_runs(
        config,
        fractions=(0.1, 1.0),
        variants=("baseline",),
        seeds=(0, 1),
        extra_variants=("full=full loss.w_mse=0.1",),
        at=low_data.AtFraction(
            settings=low_data.parse_setting_at(["0.1:full=full loss.w_mse=0.3 loss.w_cdr=0.3"]),
            seeds=low_data.parse_at(["0.1=0,1,2"], "--seeds_at"),
            steps=low_data.parse_steps_at(["0.1=6"]),
        ),
    )
    assert sorted(plan) == sorted(
        [(v, 0.1, s) for v in ("baseline", "full") for s in (0, 1, 2)]
        + [(v, 1.0, s) for v in ("baseline", "full") for s in (0, 1)]
    )
    overrides, cfg = plan[("full", 0.1, 2)]
    assert overrides == {"loss.w_mse": 0.3, "loss.w_cdr": 0.3}
    assert (cfg.loss.w_mse, cfg.loss.w_cdr, cfg.data.train_fraction, cfg.seed) == (0.3, 0.3, 0.1, 2)
    assert cfg.train.num_steps == 6
    assert plan[("baseline", 1.0, 0)][1].train.num_steps == config.train.num_steps
    overrides, cfg = plan[("full", 1.0, 1)]
    assert overrides == {"loss.w_mse": 0.1}
    assert (cfg.loss.w_mse, cfg.loss.w_cdr, cfg.protocol) == (0.1, 1.0, "teacher")
    assert plan[("baseline", 0.1, 0)][0] == {}
    with pytest.raises(common.UsageError, match=r"--setting_at 0.1:aux=aux"):
        aux_setting = low_data.parse_setting_at(["0.1:aux=aux loss.w_aux=3"])
        low_data.plan_runs(
            config, (0.1,), ("baseline",), (0,), at=low_data.AtFraction(settings=aux_setting)
        )
    with pytest.raises(common.UsageError, match=r"--seeds_at names \[0.3\]"):
        low_data.plan_runs(
            config, (0.1,), ("baseline",), (0,), at=low_data.AtFraction(seeds={0.3: [0]})
        )
    with pytest.raises(common.UsageError, match="one positive number of steps"):
        low_data.parse_steps_at(["0.1=1600,3200"])
    with pytest.raises(common.UsageError, match="FRACTION:LABEL"):
        low_data.parse_setting_at(["full=full loss.w_mse=0.3"])


def test_convergence_trains_each_budget_as_its_own_run_and_finds_where_it_converged(
    tiny_data_dir, tmp_path, monkeypatch
):
    def fake_training(config, workdir):  # validation rises with the budget, then levels off
        n = config.train.num_steps
        acc = {1: 0.5, 2: 0.7, 4: 0.745, 8: 0.75}[n] - 0.2 * (config.protocol == "joint")
        split = {"fused_top1": acc, "fused_top5": 1.0, "num_examples": 64.0}
        return {config.data.eval_split: split, config.data.test_split: split}

    monkeypatch.setattr(trainer, "train_and_evaluate", fake_training)
    config = apply_variant(_config(tiny_data_dir), "full,teacher")
    report = convergence.run(
        config,
        tmp_path,
        budgets=(8, 1, 2, 4),
        variants=("baseline",),
        seeds=(0, 1),
        extra_variants=("full_joint=full protocol=joint",),
        budgets_of={"full_joint": [2, 4, 8]},
    )
    steps = [(r["variant"], r["steps"], r["protocol"]) for r in report["rows"]]
    assert steps[:4] == [("baseline", n, "-") for n in (1, 2, 4, 8)]
    assert steps[4:] == [("full_joint", n, "joint") for n in (2, 4, 8)]
    # within 1 point of the best (75 %): 4 steps (74.5 %), not 2 (70 %)
    assert report["variants"] == {
        "baseline": {"converged_at": 4},
        "full_joint": {"converged_at": 4},
    }
    rising = [{"steps": 2, "val_mean": 0.6}, {"steps": 4, "val_mean": 0.7}]
    assert convergence.converged_at(rising, 0.01) is None  # still rising at its largest budget
    assert convergence.converged_at(rising[:1], 0.01) is None  # one budget tells nothing
    marker = tmp_path / "convergence/runs/full_joint/steps_2/seed_1" / ablation.MARKER
    recorded = json.loads(marker.read_text())["config"]
    assert recorded["train"]["num_steps"] == 2 and recorded["protocol"] == "joint"
    out = tmp_path / "convergence"
    assert _csv_header(out / "convergence.csv") == convergence.CSV_COLUMNS
    _png_ok(out / "convergence.png")
    md = (out / "convergence.md").read_text()
    assert "| baseline | - | 4 | 0, 1 | 74.5 ± 0.0 |" in md
    assert "- full_joint: from 4 steps." in md

    # The gradient figure reads the diagnostics those runs logged.
    with pytest.raises(common.UsageError, match="grad_diag_every"):
        gradients.run(tmp_path, 8)
    lines = [
        {
            "step": s,
            "split": "grad",
            "grad/ce_norm": 2.0,
            "grad/ema_norm": 1.0 + s,
            "grad/ema_cos_ce": 0.5 - s / 10,
            "grad/total_norm": 3.0,
        }
        for s in range(8)
    ]
    run_dir = convergence.run_dir(tmp_path, "full_joint", 8, 0)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = gradients.run(tmp_path, 8)
    assert list(report["variants"]) == ["full_joint"]
    (row,) = report["variants"]["full_joint"]["summary"]
    assert row["term"] == "ema" and row["ratio_early"] == pytest.approx(0.5)  # step 0 only
    assert row["cos_late"] == pytest.approx(np.mean([0.5 - s / 10 for s in (4, 5, 6, 7)]))
    _png_ok(tmp_path / "gradients/gradients.png")
    assert (
        "| full_joint | joint | ema | 0.50 |" in (tmp_path / "gradients/gradients.md").read_text()
    )


def test_summary_says_where_each_learning_curve_stands_against_the_baseline():
    def row(variant, steps, val, test, protocol="-", overrides=None):
        return {
            "variant": variant,
            "steps": steps,
            "val_mean": val,
            "test_mean": test,
            "seeds": [0],
            "protocol": protocol,
            "overrides": overrides or {},
        }

    report = {
        "tolerance": 0.01,
        "variants": {"baseline": {"converged_at": 4}, "fx": {"converged_at": None}},
        "rows": [
            row("baseline", 2, 0.70, 0.69),
            row("baseline", 4, 0.80, 0.79),
            row("fx", 2, 0.60, 0.61, "teacher", {"model.classifier_input": "x_v"}),
            row("fx", 4, 0.81, 0.78, "teacher", {"model.classifier_input": "x_v"}),
        ],
    }
    base, fx = results._convergence_claims(report)
    assert base == (
        "- Learning curve of baseline: converged (validation within 1 point(s) of its best) "
        "from 4 steps."
    )
    assert fx == (
        "- Learning curve of fx (teacher protocol, model.classifier_input=x_v): still learning "
        "at 4 steps; at 4 steps 81.0 against the baseline's 80.0 % validation top-1 (test 78.0 "
        "against 79.0 %; seeds 0)."
    )
    report["rows"] = report["rows"][:2] + report["rows"][3:]
    assert "one budget only (4 steps)" in results._convergence_claims(report)[1]


def test_results_page_regenerates_from_the_committed_summaries(tmp_path):
    """docs/results/ holds what the page needs: restored into a workdir, it gives the same page
    (and the summaries back), so a later session can add its studies without the earlier runs."""
    workdir = tmp_path / "w"
    restored = results.restore(REPO / "docs/results", workdir)
    assert {"ablation", "low_data", "robustness", "figures", "cdr_inference"} <= set(restored)
    assert "pretrained_scratch" in restored and "tuning_baseline_lr_wd" in restored
    assert (workdir / "figures/tsne.png").exists()
    assert results.restore(REPO / "docs/results", workdir) == []  # nothing is overwritten
    page = results.run(workdir, tmp_path / "out/results.md").read_text()
    committed = (REPO / "docs/results.md").read_text()
    for title in list(results.STUDIES.values())[:7]:
        assert f"## {title}" in page and f"## {title}" in committed
    assert "| full | yes | yes | no | no | joint | 0, 1, 2, 3, 4 | 65.3 ± 1.8 |" in page
    assert "| baseline | no | no | no | no | - | 0, 1, 2, 3, 4 | 72.8 ± 0.9 |" in page
    assert "- Learning curve of baseline: converged (validation within 1 point(s)" in page
    for name in ("ablation.json", "pretrained_scratch.json", "tuning_baseline_lr_wd.json"):
        assert (tmp_path / "out/results" / name).read_bytes() == (
            REPO / "docs/results" / name
        ).read_bytes()

    # A study of the chosen protocol lives in <workdir>/protocol/ and round-trips the same way.
    report = json.loads((workdir / "ablation/ablation.json").read_text())
    (workdir / "protocol/ablation").mkdir(parents=True, exist_ok=True)  # holds restored run records
    (workdir / "protocol/ablation/ablation.json").write_text(json.dumps(report))
    (workdir / "protocol/ablation/ablation.md").write_text(ablation.markdown(report))
    page = results.run(workdir, tmp_path / "out/results.md").read_text()
    assert f"## {results.STUDIES['protocol/ablation']}" in page
    assert "- EMA + CDR (full MARNet) (joint protocol, 1600 steps): **does not help" in page
    again = tmp_path / "again"
    assert "protocol_ablation" in results.restore(tmp_path / "out/results", again)
    assert json.loads((again / "protocol/ablation/ablation.json").read_text()) == report


def test_a_study_run_in_parts_shows_which_runs_have_finished(tmp_path):
    """Until one command has trained all its runs there is no report; the page gives the command
    and names the runs already finished, so the next part knows where the study stands."""
    study = tmp_path / "protocol/ablation"
    assert results.not_run_yet(study, "CMD") == "Not run yet: `CMD`."
    for label, seed in [("full", 10), ("baseline", 0), ("full", 2)]:
        run_dir = study / "ablation/runs" / label / f"seed_{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / common.RUN_MARKER).write_text("{}")
    (study / "ablation/runs/aux/seed_0").mkdir(parents=True)  # started, not finished
    line = results.not_run_yet(study, "CMD")
    assert line.startswith("In progress: `CMD`. Finished so far, 3 run(s): ")
    assert "baseline seed 0; full seed 2, 10." in line and "aux" not in line


def test_results_without_studies_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No study results"):
        results.run(tmp_path, tmp_path / "results.md")


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "evidence.robustness", "--config",
         str(REPO / "configs/tiny.py"), f"--workdir={tmp_path}", "--config.train.num_stepz=3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [x for x in proc.stderr.strip().splitlines() if x]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "evidence.robustness" in lines[0] and "config.train.num_stepz" in lines[0]


def test_studies_without_an_ablation_say_so(tiny_data_dir, tmp_path):
    def study():
        figures.run(_config(tiny_data_dir), tmp_path)

    with pytest.raises(
        SystemExit,
        match=r"prog: No finished ablation runs with their checkpoints in .*: run `python -m",
    ):
        common.run_cli("prog", study)


@pytest.mark.slow
def test_every_command_line_end_to_end(tiny_data_dir, tmp_path):
    """The five commands as a user types them, on the tiny config (4.5 min on 2 shared cores)."""
    common_args = [
        "--config",
        str(REPO / "configs/tiny.py"),
        f"--workdir={tmp_path / 'w'}",
        f"--config.data.data_dir={tiny_data_dir}",
        "--config.mesh.num_devices=1",
    ]
    commands = [
        ["ablation", *common_args, "--config.train.num_steps=2", "--seeds=0,1"],
        ["robustness", *common_args, "--corruptions=contrast,rotation", "--severities=2,4"],
        ["figures", *common_args, "--grid=3", "--tsne_max_iter=250"],
        ["cdr_inference", *common_args, "--ddim_steps=2", "--num_samples=1", "--repeats=2"],
        ["results", f"--workdir={tmp_path / 'w'}", f"--output={tmp_path / 'docs/results.md'}"],
    ]
    for study, *args in commands:
        proc = subprocess.run(
            [sys.executable, "-m", f"evidence.{study}", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, (study, proc.stderr[-3000:])
    page = (tmp_path / "docs/results.md").read_text()
    assert "Not run yet" not in page and page.count("- Command: `python -m evidence.") == 4
    assert "seeds 0, 1" in page


def test_search_table_groups_settings_by_variant_and_bolds_each_variants_best():
    """Searches split over several workdirs read as one search per variant and share of the
    training data, each setting with the CPU it was trained on (another CPU model is another
    trajectory); the summary names each variant's best at each share."""
    config = dict(dataset="d", image_size=8, backbone="r", backbone_kwargs={}, embed_dim=4,
                  fusion="concat", train_steps=10, batch_size=2, lr=0.1, cdr_test_chain="c")  # fmt: skip

    def report(settings, cpu, fraction=None):
        variants = {
            label: dict(base=base, overrides={"optim.lr": lr}, protocol="-",
                        runs=[dict(seed=0, validation={"fused_top1": acc, "visual_top1": acc},
                                   machine={"cpu": cpu})])
            for label, base, lr, acc in settings
        }  # fmt: skip
        fraction_field = {} if fraction is None else {"train_fraction": fraction}
        return dict(
            variants=variants, provenance=dict(command="cmd", config=config | fraction_field)
        )

    reports = [
        report([("b3", "baseline", 0.3, 0.50), ("b4", "baseline", 0.4, 0.45)], "AMD EPYC", 0.1),
        report([("b1", "baseline", 0.1, 0.70), ("d1", "distill", 0.1, 0.60)], "AMD EPYC"),
        report([("b2", "baseline", 0.2, 0.75), ("d2", "distill", 0.2, 0.55)], "Intel(R) Xeon(R)"),
    ]
    page = results.tuning_markdown(reports)
    full, tenth = page.split("with 100 % of the training data:")[1].split("with 10 % of the")
    rows = [line.split(" | ") for line in full.splitlines() if line.startswith("| ")]
    assert [r[0].strip("| ") for r in rows[1:]] == ["b1", "**b2**", "**d1**", "d2"]
    assert [r[5] for r in rows[1:]] == ["AMD EPYC", "Intel Xeon", "AMD EPYC", "Intel Xeon"]
    rows = [line.split(" | ") for line in tenth.splitlines() if line.startswith("| ")]
    assert [r[0].strip("| ") for r in rows[1:]] == ["**b3**", "b4"]
    assert "10 % of the training data; " in page  # the 10 % search's base line says so
    claim, low = results._search_claims(reports)
    assert "with 100 % of the training data" in claim
    assert "baseline: b2 (optim.lr=0.2), 75.0 % (best of 2)" in claim
    assert "distill: d1 (optim.lr=0.1), 60.0 % (best of 2)" in claim
    assert "with 10 % of the training data" in low and "baseline: b3 (optim.lr=0.3), 50.0 %" in low


def test_config_line_names_smaller_training_crops():
    config = tiny.get_config()
    line = results._config_line(common.config_summary(config))
    assert line.startswith("synthetic_food/tiny (32 px); resnet")
    config.data.train_image_size = 24
    line = results._config_line(common.config_summary(config))
    assert line.startswith("synthetic_food/tiny (32 px, trained on 24 px crops); resnet")
    assert line.endswith("; joint protocol")


def test_recorded_commands_of_the_default_config_name_the_protocol_they_trained():
    def shown(command, config):
        return results._command({"command": command, "config": config})

    old = {"dataset": "synthetic_food/default"}  # reports from before the tuned default
    assert shown("python -m evidence.ablation --config configs/default.py --workdir W", old) == (
        "python -m evidence.ablation --config configs/default.py:full,joint --workdir W"
    )
    assert shown("x --config=configs/default.py:baseline", old) == (
        "x --config=configs/default.py:baseline,joint"
    )
    for kept in (
        "x --config configs/default.py:full,teacher --seeds 0",
        "x --config configs/tiny.py",
    ):
        assert shown(kept, old) == kept
    new = common.config_summary(default.get_config())
    assert new["protocol"] == "teacher"
    # A field that moved is shown, and read, under its name now.
    moved = "x --extra_variant 'm=full model.cdr_chain_grad=last_step model.cdr.sampler=ddpm'"
    assert shown(moved, new) == (
        "x --extra_variant 'm=full model.cdr_wiring.chain_grad=last_step model.cdr.sampler=ddpm'"
    )
    assert ablation.parse_extra_variant("m=full model.cdr_chain_grad=last_step") == (
        "m",
        "full",
        {"model.cdr_wiring.chain_grad": "last_step"},
    )
    assert (
        shown("x --config configs/default.py --seeds 0", new)
        == "x --config configs/default.py --seeds 0"
    )
