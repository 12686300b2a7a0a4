"""Scale-out tests of the trainer: sharded runs match one device, FSDP shards, two processes, other meshes.

The in-process runs share three trainings (one device, data=8, data=2 x fsdp=4) through module fixtures.
They use a two-stage ResNet: BatchNorm, every head and FSDP are still exercised, and compiling the train
step, which dominates these runs on the CPU, is cheaper.
"""

import collections
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import tiny
from marnet_jax import main as cli
from marnet_jax.data import decoders
from marnet_jax.train import checkpoint, metrics, sharding, trainer
from marnet_jax.train.experiment import Experiment
from marnet_jax.train.steps import model_input

REPO = Path(__file__).resolve().parents[1]
NUM_STEPS = 4
STAGE_SIZES = (1, 1)
LR = 0.1
FSDP_MIN_SIZE = 1024  # the tiny model's larger kernels (3x3x8x16 and up) get sharded


def _config(data_dir, **mesh):
    config = tiny.get_config()
    config.data.data_dir = str(data_dir)
    config.model.backbone_kwargs.stage_sizes = STAGE_SIZES
    # SGD, not AdamW. With AdamW (the tiny config's ResNet-18) a few dozen of ~0.8M parameters differed
    # by up to ~lr between the 1-device and 8-device runs after the first non-zero update, although the
    # gradients agreed to 5e-6 relative (no sign flips) and SGD runs agree to ~1e-8: Adam divides each
    # entry by its own running magnitude, so where a gradient entry nearly cancels, the rounding
    # differences of two summation orders become steps of up to +-lr.
    # Without colour jitter: these runs check the trainer's sharding, and their tolerances assume no
    # activation sits at a kink (ReLU, clip) where two summation orders' last-place differences pick
    # different sides; with the jitter's inputs one did at step 4. The jitter itself is checked for
    # sharding invariance below (test_train_images_are_sharding_invariant).
    config.data.augment.color_jitter = False
    config.optim.name = "sgd"
    # Large enough that 3 updates (the first is warm-up's lr=0) move parameters far beyond the tolerance.
    config.optim.lr = LR
    config.train.num_steps = NUM_STEPS
    config.train.log_every = 1
    config.checkpoint.every_steps = NUM_STEPS // 2  # a run resumes from the middle on other meshes
    for key, value in mesh.items():
        config.mesh[key] = value
    return config


def _train(data_dir, workdir, **mesh):
    config = _config(data_dir, **mesh)
    results = trainer.train_and_evaluate(config, str(workdir))
    return workdir, config, results


@pytest.fixture(scope="module")
def reference_run(tiny_data_dir, tmp_path_factory):
    return _train(tiny_data_dir, tmp_path_factory.mktemp("one_device"), num_devices=1)


@pytest.fixture(scope="module")
def data_run(tiny_data_dir, tmp_path_factory):
    return _train(tiny_data_dir, tmp_path_factory.mktemp("data8"), data=8, fsdp=1)


@pytest.fixture(scope="module")
def fsdp_run(tiny_data_dir, tmp_path_factory):
    return _train(
        tiny_data_dir,
        tmp_path_factory.mktemp("data2_fsdp4"),
        data=2,
        fsdp=4,
        fsdp_min_size=FSDP_MIN_SIZE,
    )


def _restore(workdir, config, step=None):
    """The checkpointed train state, restored onto `config`'s mesh and shardings."""
    target = Experiment.build(config).restore_target()
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    step = manager.latest_step() if step is None else step
    state = checkpoint.restore(manager, step, target, None)
    manager.close()
    return state


def _assert_states_close(state, ref_state, names):
    """Leaf by leaf within the tolerance two summation orders of the same sums explain."""
    for name in names:
        for (path, got), want in zip(
            jax.tree_util.tree_leaves_with_path(getattr(state, name)),
            jax.tree.leaves(getattr(ref_state, name)),
            strict=True,
        ):
            np.testing.assert_allclose(
                got, want, rtol=1e-5, atol=1e-6, err_msg=name + jax.tree_util.keystr(path)
            )


def _metric_lines(workdir):
    return [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _train_lines(workdir):
    return {x["step"]: x for x in _metric_lines(workdir) if x["split"] == "train"}


# data=2 x fsdp=4 covers the pure data-parallel path too; data=8 alone is in the slow set.
@pytest.mark.parametrize("run", [pytest.param("data_run", marks=pytest.mark.slow), "fsdp_run"])
def test_sharded_run_matches_one_device(run, reference_run, request):
    workdir, config, results = request.getfixturevalue(run)
    ref_dir, ref_config, ref_results = reference_run
    ref_lines, lines = _train_lines(ref_dir), _train_lines(workdir)
    assert sorted(lines) == sorted(ref_lines) == list(range(1, NUM_STEPS + 1))
    for step, ref in ref_lines.items():
        for key in ("loss", "loss/ce", "loss/ema", "loss/mse", "loss/ce_cdr", "grad_norm"):
            np.testing.assert_allclose(
                lines[step][key], ref[key], rtol=2e-5, atol=1e-6, err_msg=f"{key} @ {step}"
            )
        assert lines[step]["accuracy"] == ref["accuracy"], step

    # Gradients are clipped to norm 1, so an update at the peak lr has a norm of about lr: ~1e-4 per
    # entry of the ~0.4M parameters, far above the tolerance below.
    assert max(x["update_norm"] for x in ref_lines.values()) > LR / 2

    ref_state = jax.device_get(_restore(ref_dir, ref_config))
    state = jax.device_get(_restore(workdir, config))
    assert int(state.step) == int(ref_state.step) == NUM_STEPS
    # Parameters, and BatchNorm running statistics: these are only equal when the batch statistics
    # are taken over the global batch (per-device statistics over 2 or 4 examples would differ).
    _assert_states_close(state, ref_state, ("params", "batch_stats"))
    assert jax.tree.leaves(ref_state.batch_stats), "the backbone should have BatchNorm"
    # Same parameters and the same noise for the global batch: the same predictions.
    for split in (config.data.eval_split, config.data.test_split):
        assert results[split] == pytest.approx(ref_results[split]), split


def _sharded_over_fsdp(sharding_) -> bool:
    return any(
        axis == "fsdp" or (isinstance(axis, tuple) and "fsdp" in axis) for axis in sharding_.spec
    )


def test_fsdp_shards_large_parameters(fsdp_run, caplog):
    workdir, config, _ = fsdp_run
    state = _restore(workdir, config)
    fsdp = 4
    sharded, expected = set(), set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        name = jax.tree_util.keystr(path)
        if leaf.size >= FSDP_MIN_SIZE and any(d % fsdp == 0 for d in leaf.shape):
            expected.add(name)
        if _sharded_over_fsdp(leaf.sharding):
            sharded.add(name)
            # Each device holds a quarter of the array (replicated over the 'data' axis).
            assert leaf.addressable_shards[0].data.size == leaf.size // fsdp, name
    assert sharded == expected
    assert any(name.startswith("['backbone']") and "kernel" in name for name in sharded)
    assert any(name.startswith("['text_encoder']") for name in sharded)
    # The optimizer state (SGD momentum) is sharded like its parameters.
    momentum = [x for x in jax.tree.leaves(state.opt_state) if hasattr(x, "sharding")]
    assert sum(_sharded_over_fsdp(x.sharding) for x in momentum) == len(sharded)

    with caplog.at_level(logging.INFO, logger="marnet_jax"):
        Experiment.build(config).log_layout()
    text = caplog.text
    assert "{'data': 2, 'fsdp': 4}" in text
    assert f"Sharded parameters ({len(sharded)}):" in text
    for name in sharded:
        assert name in text


def test_eval_on_other_device_counts_reproduces_accuracy(fsdp_run, tmp_path):
    """Trained on 8 devices with sharded parameters; evaluated from the checkpoint on 1 and on 4
    devices: the same accuracies."""
    workdir, config, results = fsdp_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)  # evaluate() writes into the workdir: keep the shared run intact
    for num_devices in (1, 4):
        eval_config = _config(config.data.data_dir, num_devices=num_devices)
        again = trainer.evaluate(eval_config, str(copy))
        for split in (config.data.eval_split, config.data.test_split):
            assert again[split] == pytest.approx(results[split]), (num_devices, split)


def _resumed_on(run, tmp_path, **mesh):
    """`run` resumed from its middle checkpoint on another mesh, to its end."""
    workdir, config, _ = run
    copy = tmp_path / "resumed"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "checkpoints" / str(NUM_STEPS))
    lines = [x for x in _metric_lines(copy) if x["step"] <= NUM_STEPS // 2]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    resumed_config = _config(config.data.data_dir, **mesh)
    trainer.train_and_evaluate(resumed_config, str(copy))
    return copy, resumed_config


# 8 -> 1 device runs by default; 8 -> 4 and 1 -> 8 in the slow set.
@pytest.mark.parametrize(
    "run, mesh",
    [
        ("fsdp_run", {"num_devices": 1}),
        pytest.param("fsdp_run", {"num_devices": 4, "data": 4, "fsdp": 1}, marks=pytest.mark.slow),
        pytest.param("reference_run", {"data": 2, "fsdp": 4}, marks=pytest.mark.slow),
    ],
)
def test_resume_on_another_device_count_continues_the_same_run(run, mesh, request, tmp_path):
    """A checkpoint written on one mesh resumes on another and ends where the uninterrupted run
    ends: the state within the tolerance of test_sharded_run_matches_one_device (two summation
    orders of the same sums), the input-iterator position exactly (one process: its state holds
    the global stream's position, whatever the devices), and the same batches (the same losses)."""
    straight_dir, straight_config, _ = request.getfixturevalue(run)
    resumed_dir, resumed_config = _resumed_on(request.getfixturevalue(run), tmp_path, **mesh)
    straight = jax.device_get(_restore(straight_dir, straight_config))
    resumed = jax.device_get(_restore(resumed_dir, resumed_config))
    assert int(resumed.step) == int(straight.step) == NUM_STEPS
    _assert_states_close(resumed, straight, ("params", "batch_stats", "opt_state"))
    position = f"checkpoints/{NUM_STEPS}/data_iter/process_0-of-1.json"
    assert json.loads((resumed_dir / position).read_text()) == json.loads(
        (straight_dir / position).read_text()
    )
    straight_lines, resumed_lines = _train_lines(straight_dir), _train_lines(resumed_dir)
    assert sorted(resumed_lines) == sorted(straight_lines)
    for step in range(NUM_STEPS // 2 + 1, NUM_STEPS + 1):
        np.testing.assert_allclose(
            resumed_lines[step]["loss"], straight_lines[step]["loss"], rtol=2e-5, err_msg=step
        )
        assert resumed_lines[step]["accuracy"] == straight_lines[step]["accuracy"], step


def test_diffusion_noise_is_sharding_invariant():
    """What the eval relies on: noise for a global batch is the same however the batch is sharded."""
    assert jax.config.jax_threefry_partitionable
    mesh = sharding.make_mesh(_config("unused", data=8).mesh)
    key = jax.random.PRNGKey(3)

    def draw(k):
        return jax.random.normal(k, (32, 24))

    sharded = jax.jit(draw, out_shardings=sharding.batch_sharding(mesh))(key)
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(jax.jit(draw)(key)))


@pytest.mark.parametrize("resize", [False, True])
def test_train_images_are_sharding_invariant(resize):
    """The train step's resize (data.decoder 'cpu_decode'), flip, jitter (with its per-image mean
    grey level) and normalisation give the model bit-identical input however the batch is split
    over devices."""
    config = _config("unused", data=2, fsdp=4)
    rng = np.random.default_rng(0)
    size = config.data.image_size
    side = decoders.canvas_size(size) if resize else size
    batch = {
        "image": rng.integers(0, 256, (16, side, side, 3), dtype=np.uint8),
        "jitter": rng.uniform(0.6, 1.4, (16, 3)).astype(np.float32),
        "flip": rng.random(16) < 0.5,
    }
    if resize:
        extent = rng.integers(size // 2, side + 1, (16, 2)).astype(np.int32)
        lo = rng.uniform(0, extent[:, ::-1] / 2)
        hi = rng.uniform(lo + 1, extent[:, ::-1])
        batch["box"] = np.concatenate([lo, hi], 1).astype(np.float32)  # left, top, right, bottom
        batch["extent"] = extent

    if resize:
        config.data.decoder = "cpu_decode"

    def prepare(b):
        return model_input(b, config.data)

    one = np.asarray(jax.jit(prepare)(batch))
    sharded = jax.jit(prepare)(sharding.global_batch(batch, sharding.make_mesh(config.mesh)))
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded), one)


# --- Two processes, then one ---------------------------------------------------------------------------

_CONFIG_FILE = """
from configs import tiny


def get_config():
    config = tiny.get_config()
    config.data.data_dir = {data_dir!r}
    config.model.backbone_kwargs.stage_sizes = {stage_sizes!r}
    # Without colour jitter: these runs check the trainer's sharding, and their tolerances assume no
    # activation sits at a kink (ReLU, clip) where two summation orders' last-place differences pick
    # different sides; with the jitter's inputs one did at step 4. The jitter itself is checked for
    # sharding invariance below (test_train_images_are_sharding_invariant).
    config.data.augment.color_jitter = False
    config.optim.name = "sgd"
    config.optim.lr = {lr}
    config.train.num_steps = {num_steps}
    config.checkpoint.every_steps = 2
    return config
"""


def _subprocess_env(num_cpu_devices=None):
    """This session's environment (XLA flags, compilation cache) for a CPU run, optionally N devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if num_cpu_devices is not None:
        flags_ = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
        flags_.append(f"--xla_force_host_platform_device_count={num_cpu_devices}")
        env["XLA_FLAGS"] = " ".join(flags_)
    return env


@pytest.mark.slow
def test_two_processes_then_resume_on_one(tiny_data_dir, tmp_path):
    """2 processes x 2 CPU devices train 4 steps into one workdir; 1 process x 8 devices resumes to 6.

    The input-iterator state is saved per process; the single process finds none for "process 0 of 1",
    says so and restarts the input pipeline from its first batch (the train state resumes exactly).
    """
    config_file = tmp_path / "scale_out_config.py"
    config_file.write_text(
        _CONFIG_FILE.format(
            data_dir=str(tiny_data_dir), stage_sizes=STAGE_SIZES, lr=LR, num_steps=NUM_STEPS
        )
    )
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    command = [sys.executable, "-m", "marnet_jax.main", f"--config={config_file}"]
    launch = subprocess.run(
        [
            "bash",
            str(REPO / "launch/local_multiprocess.sh"),
            "--num-processes=2",
            "--devices-per-process=2",
            "--timeout=420",
            "--init-timeout=120",
            f"--log-dir={logs}",
            "--",
            *command,
            f"--workdir={workdir}",
        ],
        cwd=REPO,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert launch.returncode == 0, launch.stderr[-3000:]
    log0, log1 = ((logs / f"process_{i}.log").read_text() for i in range(2))
    assert "Accuracy (%) after 4 steps" in log0 and "Accuracy (%)" not in log1
    # One metrics.jsonl, written by process 0 only: every (step, split) exactly once.
    first = [(x["step"], x["split"]) for x in _metric_lines(workdir)]
    assert sorted(first) == sorted([(2, "train"), (4, "train"), (4, "validation"), (4, "test")])
    for step in (2, 4):
        folder = workdir / f"checkpoints/{step}/data_iter"
        names = sorted(p.name for p in folder.iterdir() if p.name.startswith("process_"))
        assert names == ["process_0-of-2.json", "process_1-of-2.json"], names

    resume = subprocess.run(
        [*command, f"--workdir={workdir}", f"--config.train.num_steps={NUM_STEPS + 2}"],
        cwd=REPO,
        env=_subprocess_env(num_cpu_devices=8),
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert "Resumed from step 4" in resume.stderr
    assert "No input-iterator state for process 0 of 1 in checkpoint 4" in resume.stderr
    lines = _metric_lines(workdir)
    counts = collections.Counter((x["step"], x["split"]) for x in lines)
    assert max(counts.values()) == 1, counts
    assert {(6, "train"), (6, "validation"), (6, "test")} <= set(counts)
    last = {x["split"]: x for x in lines if x["step"] == NUM_STEPS + 2}
    assert all(np.isfinite(v) for v in last["train"].values() if isinstance(v, float))
    assert last["test"]["num_examples"] > 0 and 0 <= last["test"]["fused_top1"] <= 1

    config = _config(tiny_data_dir)
    state = _restore(workdir, config, step=NUM_STEPS + 2)
    assert int(state.step) == NUM_STEPS + 2
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))


# --- Metric files on object stores; the multi-host trigger ----------------------------------------------


@pytest.mark.parametrize("local", [True, False])
def test_metric_writer_appends_across_runs(local, tmp_path, monkeypatch):
    """Local files append; on object stores (no append) the whole file is rewritten, earlier lines kept."""
    monkeypatch.setattr(metrics, "_is_local", lambda path: local)
    for run, steps in enumerate(((1, 2), (3,))):
        writer = metrics.MetricWriter(tmp_path)
        for step in steps:
            writer.write(step, "train", {"loss": float(run)})
            got = [x["step"] for x in _metric_lines(tmp_path)]
            assert got == list(range(1, step + 1))  # visible at once, not only after close()
        writer.close()
    assert [x["loss"] for x in _metric_lines(tmp_path)] == [0.0, 0.0, 1.0]


def test_read_metrics_keeps_one_line_per_step_of_a_resumed_run(tmp_path):
    """A run killed after step 3 and resumed from its checkpoint at 2 logs 3 again; a kill during
    a write leaves a torn line. The reader gives each (step, split) once, the last logged."""
    lines = [(1, "train", 1.0), (2, "train", 2.0), (3, "train", 3.0), (3, "grad", 0.5)]
    lines += [(3, "train", 3.0), (3, "grad", 0.5), (4, "train", 4.0), (4, "test", 0.9)]
    text = "".join(json.dumps({"step": s, "split": k, "v": v}) + "\n" for s, k, v in lines[:4])
    text += '{"step": 4, "split": "tr\n'
    text += "".join(json.dumps({"step": s, "split": k, "v": v}) + "\n" for s, k, v in lines[4:])
    (tmp_path / "metrics.jsonl").write_text(text)
    got = [(x["step"], x["split"], x["v"]) for x in metrics.read_metrics(tmp_path)]
    assert got == [(1, "train", 1.0), (2, "train", 2.0), *lines[4:]]


def test_multihost_trigger(monkeypatch):
    monkeypatch.setattr(cli, "_on_cloud_tpu_vm", lambda: False)
    reason = cli.multihost_reason
    assert reason("auto", {}) is None  # plain single-host CPU/GPU run
    assert reason("auto", {"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert reason("auto", {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}) is not None
    assert reason("auto", {"SLURM_NTASKS": "4"}) is not None
    assert reason("auto", {"TPU_WORKER_HOSTNAMES": "w0,w1"}) is not None
    assert reason("on", {}) == "--multihost=on"
    assert reason(None, {"MARNET_MULTIHOST": "1"}) == "--multihost=on"
    assert reason(None, {"MARNET_MULTIHOST": "off", "SLURM_NTASKS": "4"}) is None
    assert reason("off", {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}) is None
    with pytest.raises(ValueError, match="MARNET_MULTIHOST"):
        reason(None, {"MARNET_MULTIHOST": "maybe"})
    # A Cloud TPU VM created by hand sets no worker list; JAX reads it from the metadata server.
    monkeypatch.setattr(cli, "_on_cloud_tpu_vm", lambda: True)
    assert reason("auto", {}) == "Cloud TPU VM"


def test_no_cloud_tpu_detected_on_this_machine():
    assert jax.default_backend() != "tpu"
    assert cli._on_cloud_tpu_vm() is False
