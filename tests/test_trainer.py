"""End-to-end trainer tests on the tiny synthetic dataset: train, resume, eval mode, NaN stop, SIGTERM."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import tiny
from marnet_jax.config import apply_variant
from marnet_jax.train import checkpoint, loop, trainer
from marnet_jax.train.experiment import Experiment

REPO = Path(__file__).resolve().parents[1]


def _config(data_dir, **train):
    config = tiny.get_config()
    config.data.data_dir = str(data_dir)
    config.mesh.num_devices = 1  # the sharded runs are compared with this one in test_scale_out.py
    for k, v in train.items():
        section, field = k.split("__")
        config[section][field] = v
    return config


def _params(workdir, config):
    target = Experiment.build(config).restore_target()
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    state = checkpoint.restore(manager, manager.latest_step(), target, None)
    manager.close()
    return jax.device_get(state.params), int(state.step)


@pytest.fixture(scope="module")
def straight_run(tiny_data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    config = _config(tiny_data_dir)
    results = trainer.train_and_evaluate(config, str(workdir))
    return workdir, config, results


def test_train_writes_metrics_and_results(straight_run):
    workdir, config, results = straight_run
    test = results[config.data.test_split]
    assert test["num_examples"] > 0
    for head in ("fused", "visual", "cdr"):
        assert 0.0 <= test[f"{head}_top1"] <= test[f"{head}_top5"] <= 1.0
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["split"] == "train"]
    assert train_lines[-1]["step"] == config.train.num_steps
    for key in ("loss", "loss/ce", "loss/ema", "loss/mse", "loss/ce_cdr", "lr", "grad_norm"):
        assert np.isfinite(train_lines[-1][key]), key
    assert train_lines[-1]["examples_per_s"] > 0
    assert any(p.name.startswith("events") for p in (workdir / "tensorboard").iterdir())


def test_aux_variant_on_a_training_subset_trains_end_to_end(tiny_data_dir, tmp_path):
    """The 'aux' reference (ingredient head, BCE) trains for real on 30 % of the training split."""
    config = _config(tiny_data_dir, train__num_steps=4, train__log_every=1)
    config = apply_variant(config, "aux")
    config.data.train_fraction = 0.3
    results = trainer.train_and_evaluate(config, str(tmp_path))
    assert set(results[config.data.test_split]) >= {"fused_top1", "visual_top1"}
    assert "cdr_top1" not in results[config.data.test_split]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    aux = [x["loss/aux"] for x in lines if x["split"] == "train"]
    assert len(aux) == 4 and all(np.isfinite(aux)) and aux[0] > 0.1
    assert all(
        x["loss/ema"] == 0.0 and x["loss/mse"] == 0.0 for x in lines if x["split"] == "train"
    )
    params, _ = _params(tmp_path, config)
    assert "aux_head" in params and "text_encoder" not in params


def test_cpu_decode_and_smaller_training_crops_train_end_to_end(tiny_data_dir, tmp_path):
    """data.decoder 'cpu_decode': the host ships decoded boxes in canvases and the train step
    resizes them; the trainer runs on it as on 'cpu' crops, here with training crops smaller
    than the evaluation's (data.train_image_size)."""
    config = apply_variant(
        _config(tiny_data_dir, train__num_steps=3, train__log_every=1), "baseline"
    )
    config.data.decoder = "cpu_decode"
    config.data.train_image_size = config.data.image_size - 8
    results = trainer.train_and_evaluate(config, str(tmp_path))
    assert 0.0 <= results[config.data.test_split]["visual_top1"] <= 1.0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["split"] == "train"]
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_smaller_training_crops_refuse_a_vit_with_learned_position_embeddings():
    config = tiny.get_config()
    config.model.backbone = "vit_ti16"
    config.data.train_image_size = 16
    with pytest.raises(ValueError, match=r"data\.train_image_size=16 .*posemb='sincos2d'"):
        Experiment.build(config)


# Slow: the default run checks the same equality through resume_step
# (test_damaged_newest_checkpoint_names_itself_and_resume_step_recovers).
@pytest.mark.slow
def test_resume_matches_uninterrupted_run(straight_run, tiny_data_dir, tmp_path, monkeypatch):
    workdir, config, _ = straight_run
    expected, _ = _params(workdir, config)
    stop_at = config.train.num_steps // 2
    # Interrupt the same run half-way (as a preemption would), then restart it from the workdir.
    monkeypatch.setattr(loop.StopFlag, "should_stop", lambda self, step, every: step == stop_at)
    out = trainer.train_and_evaluate(_config(tiny_data_dir), str(tmp_path))
    assert out == {"preempted_at_step": stop_at}
    monkeypatch.undo()
    trainer.train_and_evaluate(_config(tiny_data_dir), str(tmp_path))
    resumed, step = _params(tmp_path, config)
    assert step == config.train.num_steps
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), resumed, expected
    )


def test_eval_mode_reproduces_final_test_accuracy(straight_run):
    workdir, config, results = straight_run
    again = trainer.evaluate(config, str(workdir))
    split = config.data.test_split
    assert again[split] == pytest.approx(results[split])
    assert (workdir / f"eval_step_{config.train.num_steps}.json").exists()


def test_eval_mode_without_checkpoint_is_a_clear_error(tiny_data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        trainer.evaluate(_config(tiny_data_dir), str(tmp_path))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(straight_run, tiny_data_dir, tmp_path):
    workdir, config, _ = straight_run
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)  # keep the shared run intact
    last = config.train.num_steps
    bad = _config(tiny_data_dir)
    bad.train.num_steps = last + 4
    bad.optim.lr = float("nan")
    with pytest.raises(loop.NonFiniteLossError, match=rf"step {last + 1}.*checkpoint: step {last}"):
        trainer.train_and_evaluate(bad, str(tmp_path))
    params, step = _params(tmp_path, config)
    assert step == last
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_missing_iterator_position_is_an_error_naming_the_file(
    straight_run, tiny_data_dir, tmp_path
):
    """A checkpoint without this process's input position must not silently restart the data."""
    workdir, config, _ = straight_run
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    last = config.train.num_steps
    position = tmp_path / "checkpoints" / str(last) / "data_iter" / "process_0-of-1.json"
    position.unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"process_0-of-1\.json is missing") as e:
        trainer.train_and_evaluate(_config(tiny_data_dir), str(tmp_path))
    assert f"resume_step={last - config.checkpoint.every_steps}" in str(e.value)


# orbax leaves its reads unawaited after a failed restore; Python reports them (see pyproject.toml).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_newest_checkpoint_names_itself_and_resume_step_recovers(
    straight_run, tiny_data_dir, tmp_path
):
    """A truncated array file in the newest checkpoint: a clear error, then resume_step resumes
    from the previous checkpoint and ends where the uninterrupted run ended."""
    workdir, config, _ = straight_run
    expected, _ = _params(workdir, config)
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    # As marnet_jax.main does: orbax's unfinished reads would be logged by asyncio at exit.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    last, previous = config.train.num_steps, config.train.num_steps - config.checkpoint.every_steps
    arrays = [p for p in (tmp_path / "checkpoints" / str(last) / "state").rglob("*") if p.is_file()]
    biggest = max(arrays, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.raises(
        checkpoint.CheckpointError, match=rf"checkpoints/{last} cannot be read"
    ) as e:
        trainer.train_and_evaluate(_config(tiny_data_dir), str(tmp_path))
    assert f"--config.checkpoint.resume_step={previous}" in str(e.value)

    trainer.train_and_evaluate(
        _config(tiny_data_dir, checkpoint__resume_step=previous), str(tmp_path)
    )
    assert (tmp_path / checkpoint.SET_ASIDE / str(last)).is_dir()
    resumed, step = _params(tmp_path, config)
    assert step == last
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), resumed, expected
    )
    # The same flag again (a restart of the same command) resumes from the newest checkpoint.
    manager = checkpoint.make_manager(tmp_path, config.checkpoint)
    assert checkpoint.resume_step(manager, tmp_path, previous) == last
    assert sorted(manager.all_steps()) == [previous, last]
    manager.close()


def _main(*args, env=None, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "marnet_jax.main", "--config", str(REPO / "configs/tiny.py"), *args],
        cwd=REPO,
        env={k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_mistyped_override_is_a_one_line_error(tmp_path):
    proc = _main("--workdir", str(tmp_path), "--config.train.num_stepz=3")
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = [x for x in err.strip().splitlines() if x]
    assert len(lines) == 1, err
    assert "config.train.num_stepz" in lines[0] and "num_steps" in lines[0]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_data_dir, tmp_path):
    """Also the command a user runs on a machine without a TPU, as they run it: no JAX_PLATFORMS,
    and no other jax process holding the TPU runtime's machine-wide lock (which hides its output)."""
    proc = _main(
        "--workdir",
        str(tmp_path),
        f"--config.data.data_dir={tiny_data_dir}",
        "--config.train.num_steps=100000",
        "--config.train.log_every=1",
        "--config.checkpoint.every_steps=0",
        "--config.mesh.num_devices=1",
        env={"JAX_PLATFORMS": None, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"},
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and 2 <= steps[-1] < 100000
    assert "SIGTERM" in err
    runtime_noise = [x for x in err.splitlines() if re.search(r"libtpu|TPU|InitGoogle", x)]
    assert not runtime_noise, runtime_noise
