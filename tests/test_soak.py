"""The kill-and-resume soak (benchmarks.soak): its comparisons catch what they exist for, its kill
schedule reproduces from a seed, and the tiny config killed at random moments and resumed ends
bit-identical to an uninterrupted run (one process and two processes: the slow set)."""

import json
import random

import numpy as np
import pytest

from benchmarks import soak


def _write_metrics(path, lines, torn=""):
    path.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(x) + "\n" for x in lines) + torn
    (path / "metrics.jsonl").write_text(text)


def test_metric_comparison_catches_changed_missing_and_torn_lines(tmp_path):
    ref = [
        {"step": 2, "split": "train", "loss": 1.5, "step_time_s": 0.1},
        {"step": 4, "split": "train", "loss": 1.25, "step_time_s": 0.1},
        {"step": 4, "split": "test", "fused_top1": 0.5},
    ]
    _write_metrics(tmp_path / "ref", ref)
    # Repeated after a resume, with other timings: identical.
    again = [ref[0], {**ref[0], "step_time_s": 9.0}, ref[1], ref[2]]
    _write_metrics(tmp_path / "same", again)
    assert soak.compare_metrics(tmp_path / "ref", tmp_path / "same") == ([], 1)

    changed = [ref[0], {**ref[1], "loss": 1.2500001}, ref[2]]
    _write_metrics(tmp_path / "changed", changed, torn='{"step": 6, "spl')
    diffs, _ = soak.compare_metrics(tmp_path / "ref", tmp_path / "changed")
    assert any("unreadable" in d for d in diffs)
    assert "step 4 train: loss differ" in diffs

    _write_metrics(tmp_path / "short", ref[:2])
    diffs, _ = soak.compare_metrics(tmp_path / "ref", tmp_path / "short")
    assert diffs == ["step 4 test: missing"]


def test_kill_schedule_reproduces_from_its_seed_and_spreads_over_the_run():
    def schedule(seed):
        rng = random.Random(seed)
        return [
            soak.draw_moment(rng, 0.4, done, 100, 5.0, 10 - i)
            for i, done in enumerate(range(0, 100, 10))
        ]

    assert schedule(3) == schedule(3) and schedule(3) != schedule(4)
    kinds = [m.kind for s in range(20) for m in schedule(s)]
    assert {"start-up", "training", "in checkpoint write"} <= set(kinds)
    for i, done in enumerate(range(0, 100, 10)):
        rng = random.Random(i)
        for _ in range(50):
            m = soak.draw_moment(rng, 0.0, done, 100, 5.0, 10 - i)
            if m.kind == "training":  # within the next share of the steps left
                assert done < m.step <= done + max(1, (100 - done) // (10 - i))
            assert m.kind != "final evaluation" or i == 9


def _main_args(data_dir, num_steps=12):
    return [
        "--config",
        "configs/tiny.py",
        f"--config.data.data_dir={data_dir}",
        f"--config.train.num_steps={num_steps}",
        "--config.checkpoint.every_steps=3",
        "--config.mesh.num_devices=1",
    ]


@pytest.mark.slow  # four launches of the main job: over a minute
def test_killed_and_resumed_run_ends_identical_to_an_uninterrupted_one(tiny_data_dir, tmp_path):
    report = soak.soak(tmp_path, _main_args(tiny_data_dir), kills=2, seed=1, timeout_s=300)
    assert report["kills"] == 2, report["trials"]
    assert report["identical"], report["differences"]
    assert report["trials"][-1]["exit_codes"] == [0]
    # The comparison reads the real state: two checkpoints of one run differ.
    steps = soak.committed_steps(tmp_path / "reference" / "checkpoints")
    a, b = (soak.checkpoint_leaves(tmp_path / "reference", s) for s in steps[-2:])
    assert any("params" in k for k in a) and any("opt_state" in k for k in a)
    assert set(a) == set(b) and any(not np.array_equal(a[k], b[k]) for k in a)
    assert "identical to the uninterrupted run" in soak.table(report)


@pytest.mark.slow
def test_two_processes_killed_one_or_all_resume_exactly(tiny_data_dir, tmp_path):
    """2 processes x 2 CPU devices; a killed process's peers are stopped by the launcher (no hang),
    and every restart resumes from the newest checkpoint both processes committed."""
    report = soak.soak(
        tmp_path,
        _main_args(tiny_data_dir, num_steps=24)[:-1],
        kills=5,
        seed=0,
        processes=2,
        devices_per_process=2,
        timeout_s=400,
    )
    assert report["kills"] == 5, report["trials"]
    assert report["identical"], report["differences"]
    assert all(124 not in t["exit_codes"] for t in report["trials"])  # nothing hung
    assert {t["target"] for t in report["trials"][:-1]} == {"one process", "all"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--kills=2"], "after '--'"),
        (["--signals=SIGHUP", "--", "--config", "configs/tiny.py"], "SIGHUP"),
        (["--kills=0", "--", "--config", "configs/tiny.py"], "--kills"),
    ],
)
def test_command_line_mistakes_are_one_line_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        soak.main([f"--workdir={tmp_path}", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
