"""Kill-and-resume soak: a run killed at random moments and resumed ends where an uninterrupted one does.

    python -m benchmarks.soak --workdir /tmp/soak --kills 10 --seed 0 -- \
        --config configs/tiny.py --config.train.num_steps=60 --config.checkpoint.every_steps=5

Trains the main job (`python -m marnet_jax.main` with the arguments after `--`) once without
interruption in <workdir>/reference (kept and reused by a later soak with the same arguments), then
afresh in <workdir>/soaked while killing it `--kills` times and resuming each time. Each kill's
signal (SIGKILL or SIGTERM, from `--signals`) and moment come from `--seed`: at a random time, or
while an asynchronous checkpoint write is under way (its temporary directory exists; a share
`--in_checkpoint` of the kills). Then it compares the two runs' newest checkpoints (joint stage and
text teacher) leaf by leaf, bitwise, their input-iterator positions, and every line of metrics.jsonl
(the timing fields aside): a resumed run must repeat a logged line exactly and lose none. Prints a
table (trial, signal, moment, phase and step at the kill, where the next launch resumed from) and
writes <workdir>/soak.json; exit status 1 when anything differs.

With `--processes N` every launch is N cooperating processes on this machine
(launch/local_multiprocess.sh, `--devices_per_process` fake CPU devices each), and each kill hits one
process or all of them (`--kill_scope`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from marnet_jax import cli, reporting
from marnet_jax.train import metrics

PROG = "benchmarks.soak"
REPO = Path(__file__).resolve().parents[1]
TMP_MARK = ".orbax-checkpoint-tmp"
TIMING_FIELDS = ("step_time_s", "examples_per_s")
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM}
POLL_S = 0.002


@dataclasses.dataclass
class Trial:
    """One launch of the soaked run and how it ended."""

    trial: int
    signal: str  # the signal sent, or '-' for the launch that ran to the end
    moment: str  # the Moment's kind it was aimed at, or '-'
    target: str  # which processes the signal hit: 'all' | 'process i' | '-'
    phase: str  # what the run was doing when the signal came
    logged_step: int | None  # newest train step in metrics.jsonl at the kill
    committed_step: int | None  # newest finished checkpoint at the kill
    resumed_from: str  # what this launch started from: 'fresh' or 'step N' (and 'teacher step N')
    exit_codes: list[int]
    wall_s: float


# --------------------------------------------------------------------------------------------------
# What a workdir holds.


def committed_steps(ckpt_dir: Path) -> list[int]:
    """Finished checkpoints (orbax renames a step's temporary directory only once it is complete)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def checkpoint_writes(workdir: Path) -> set[str]:
    """Checkpoint writes under way or torn (joint stage and teacher): their temporary directories."""
    out = set()
    for d in (workdir / "checkpoints", workdir / "teacher" / "checkpoints"):
        if d.is_dir():
            out |= {str(p) for p in d.iterdir() if TMP_MARK in p.name}
    return out


def metric_lines(workdir: Path) -> tuple[list[dict[str, Any]], int]:
    """metrics.jsonl's lines as logged, and how many could not be read (a torn write)."""
    return metrics.read_lines(workdir)


def finished(workdir: Path, num_steps: int) -> bool:
    """Whether the run logged its final test accuracy."""
    lines, _ = metric_lines(workdir)
    return any(x["split"] == "test" and x["step"] == num_steps for x in lines)


def phase_of(
    workdir: Path, lines_at_launch: int, num_steps: int, torn: set[str]
) -> tuple[str, int | None]:
    """What the run was doing (from its files) and its newest logged train step; `torn`: the
    temporary checkpoint directories an earlier kill left (not this launch's writes)."""
    lines, _ = metric_lines(workdir)
    train = [x["step"] for x in lines if x["split"] == "train"]
    logged = max(train) if train else None
    if checkpoint_writes(workdir) - torn:
        return "checkpoint write", logged
    if len(lines) <= lines_at_launch:
        return "start-up", logged
    newest = lines[-1]
    if newest["split"] == "teacher":
        return "teacher", logged
    if logged == num_steps:
        return "final evaluation", logged
    return "training", logged


# --------------------------------------------------------------------------------------------------
# Launching and killing.


@dataclasses.dataclass(frozen=True)
class Launcher:
    main_args: tuple[str, ...]
    processes: int
    devices_per_process: int
    timeout_s: float

    def command(self, workdir: Path, log_dir: Path) -> list[str]:
        main = [sys.executable, "-m", "marnet_jax.main", *self.main_args, f"--workdir={workdir}"]
        if self.processes == 1:
            return main
        return [
            "bash",
            str(REPO / "launch" / "local_multiprocess.sh"),
            f"--num-processes={self.processes}",
            f"--devices-per-process={self.devices_per_process}",
            f"--timeout={int(self.timeout_s)}",
            f"--log-dir={log_dir}",
            "--",
            *main,
            "--config.data.build_on_all_processes=True",
        ]

    def start(self, workdir: Path, log_dir: Path) -> subprocess.Popen:
        log_dir.mkdir(parents=True, exist_ok=True)
        out = (log_dir / "launcher.log").open("w")
        env = dict(os.environ)
        env.setdefault("JAX_PLATFORMS", "cpu")
        return subprocess.Popen(
            self.command(workdir, log_dir),
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a signal to the job never reaches this process
        )


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def job_pids(proc: subprocess.Popen, processes: int) -> list[int]:
    """The training processes of a launch: the launch itself, or the `python -m marnet_jax.main`
    processes among the launcher's descendants (it starts each in a session of its own)."""
    if processes == 1:
        return [proc.pid]
    found, todo = [], _children(proc.pid)
    while todo:
        pid = todo.pop()
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:3] == [b"-m", b"marnet_jax.main"]:
            found.append(pid)
        else:
            todo += _children(pid)
    return sorted(found)


def wait(proc: subprocess.Popen, timeout_s: float) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return 124


def resumed_from(log_dir: Path, had_checkpoint: bool) -> str:
    """What a launch started from, read from its log(s)."""
    text = "".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("*.log")))
    parts = [f"teacher step {s}" for s in re.findall(r"Teacher: resumed from step (\d+)", text)]
    parts += [f"step {s}" for s in re.findall(r"Resumed from step (\d+)", text)]
    if not parts:
        parts = ["killed before resuming" if had_checkpoint else "fresh"]
    return ", ".join(dict.fromkeys(parts))  # every process logs the same resume


def run_to_end(launcher: Launcher, workdir: Path, log_dir: Path) -> tuple[int, float, float]:
    """Runs a launch to its end: (exit status, wall seconds, seconds until its first train line)."""
    t0 = time.perf_counter()
    proc = launcher.start(workdir, log_dir)
    first_line = None
    while proc.poll() is None and time.perf_counter() - t0 < launcher.timeout_s:
        if first_line is None and any(x["split"] == "train" for x in metric_lines(workdir)[0]):
            first_line = time.perf_counter() - t0
        time.sleep(0.05)
    code = wait(proc, max(1.0, launcher.timeout_s - (time.perf_counter() - t0)))
    wall = time.perf_counter() - t0
    return code, wall, wall if first_line is None else first_line


@dataclasses.dataclass(frozen=True)
class Moment:
    """When to send a kill: a kind and its draw."""

    kind: str  # 'start-up' | 'training' | 'in checkpoint write' | 'final evaluation'
    delay_s: float = 0.0  # start-up: after the launch; otherwise after the condition holds
    step: int = 0  # training: once the run logged this train step


MOMENT_KINDS = ("start-up", "training", "final evaluation")
MOMENT_WEIGHTS = (0.2, 0.6, 0.2)


def draw_moment(
    rng: random.Random,
    in_checkpoint: float,
    done: int,
    num_steps: int,
    startup_s: float,
    kills_left: int,
) -> Moment:
    """A kill moment for a launch that resumes from step `done` (seeded: trials reproduce). A
    training moment falls within the next 1/kills_left of the steps left and the final evaluation
    is kept for the last kill, so that the kills spread over the whole run instead of ending it."""
    if done < num_steps and rng.random() < in_checkpoint:
        return Moment("in checkpoint write", delay_s=rng.uniform(0.0, 0.02))
    kind = rng.choices(MOMENT_KINDS, MOMENT_WEIGHTS)[0]
    if kind == "final evaluation" and kills_left > 1 and done < num_steps:
        kind = "training"  # a kill in the final evaluation may end the run: keep it for the last
    if kind == "start-up":
        return Moment(kind, delay_s=rng.uniform(0.0, startup_s))
    if kind == "training" and done < num_steps:
        last = done + max(1, (num_steps - done) // max(1, kills_left))
        return Moment(kind, delay_s=rng.uniform(0.0, 0.2), step=rng.randint(done + 1, last))
    return Moment("final evaluation", delay_s=rng.uniform(0.0, 0.5))


def _reached(
    moment: Moment, workdir: Path, num_steps: int, lines_at_launch: int, torn: set[str]
) -> bool:
    """Whether `moment`'s condition holds, judged by what this launch wrote."""
    if moment.kind == "in checkpoint write":
        return bool(checkpoint_writes(workdir) - torn)
    train = [x["step"] for x in metric_lines(workdir)[0][lines_at_launch:] if x["split"] == "train"]
    if moment.kind == "training":
        return bool(train) and max(train) >= moment.step
    return num_steps in train  # final evaluation: the last train line is written


def killed_launch(
    launcher: Launcher,
    workdir: Path,
    log_dir: Path,
    *,
    rng: random.Random,
    sig: str,
    moment: Moment,
    scope: str,
    num_steps: int,
) -> tuple[Trial | None, subprocess.Popen, float, float | None]:
    """Starts a launch and sends `sig` at `moment`; the trial (None when the run ended first), the
    process, its start time and how long it took to log a train line (None if it did not)."""
    lines_at_launch = len(metric_lines(workdir)[0])
    torn = checkpoint_writes(workdir)
    t0 = time.perf_counter()
    proc = launcher.start(workdir, log_dir)
    first_line = None
    reached = moment.kind == "start-up"
    while proc.poll() is None and time.perf_counter() - t0 < launcher.timeout_s:
        if first_line is None and len(metric_lines(workdir)[0]) > lines_at_launch:
            first_line = time.perf_counter() - t0
        if reached or _reached(moment, workdir, num_steps, lines_at_launch, torn):
            break
        time.sleep(POLL_S if moment.kind == "in checkpoint write" else 0.02)
    time.sleep(moment.delay_s)
    if proc.poll() is not None:
        return None, proc, t0, first_line
    phase, logged = phase_of(workdir, lines_at_launch, num_steps, torn)
    committed = committed_steps(workdir / "checkpoints")
    pids = job_pids(proc, launcher.processes)
    if scope == "one" and len(pids) > 1:
        pids = [rng.choice(pids)]
        target = "one process"
    else:
        target = "all" if len(pids) > 1 else "the process"
    for pid in pids:
        try:
            os.kill(pid, SIGNALS[sig])
        except ProcessLookupError:
            pass
    trial = Trial(
        trial=0,
        signal=sig,
        moment=moment.kind,
        target=target,
        phase=phase,
        logged_step=logged,
        committed_step=committed[-1] if committed else None,
        resumed_from="",
        exit_codes=[],
        wall_s=0.0,
    )
    return trial, proc, t0, first_line


# --------------------------------------------------------------------------------------------------
# Comparing the two runs.


def checkpoint_leaves(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    """Every array of the train state in checkpoint `step` under `run_dir`, by path, on the host."""
    import jax

    from marnet_jax.train import checkpoint, experiment, sharding

    config = experiment.read_config(
        run_dir if (run_dir / "config.json").exists() else run_dir.parent
    )
    manager = checkpoint.make_manager(run_dir, config.checkpoint)
    try:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), sharding.MESH_AXES)
        state = checkpoint.restore_as_saved(manager, step, mesh, config.mesh)
    finally:
        manager.close()
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state))
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def compare_checkpoints(ref_dir: Path, soak_dir: Path) -> list[str]:
    """Differences between the newest checkpoints of two runs (or two teacher stages), [] when
    identical: every array bitwise, and each process's input-iterator position."""
    ref_steps = committed_steps(ref_dir / "checkpoints")
    soak_steps = committed_steps(soak_dir / "checkpoints")
    if not ref_steps:
        return []
    if not soak_steps or soak_steps[-1] != ref_steps[-1]:
        return [f"{soak_dir}: newest checkpoint {soak_steps[-1:]} instead of {ref_steps[-1]}"]
    step = ref_steps[-1]
    ref, soak = checkpoint_leaves(ref_dir, step), checkpoint_leaves(soak_dir, step)
    where = f"{soak_dir}/checkpoints/{step}"
    diffs = [f"{where}: {k} missing" for k in sorted(set(ref) - set(soak))]
    diffs += [f"{where}: {k} not in the reference" for k in sorted(set(soak) - set(ref))]
    for k in sorted(set(ref) & set(soak)):
        a, b = ref[k], soak[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            diffs.append(f"{where}: {k} {b.shape} {b.dtype} vs {a.shape} {a.dtype}")
        elif not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
            diffs.append(f"{where}: {k} differs (max |diff| {_max_diff(a, b)})")
    ref_iter = ref_dir / "checkpoints" / str(step) / "data_iter"
    for p in sorted(ref_iter.glob("process_*.json")) if ref_iter.is_dir() else []:
        q = Path(where) / "data_iter" / p.name
        if not q.exists() or json.loads(q.read_text()) != json.loads(p.read_text()):
            diffs.append(f"{q}: input-iterator position differs from the reference")
    return diffs


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.dtype.kind not in "fc":
        return float(np.max(a != b))
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def _without_timing(line: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in line.items() if k not in TIMING_FIELDS}


def compare_metrics(ref_dir: Path, soak_dir: Path) -> tuple[list[str], int]:
    """Differences between two runs' metrics.jsonl: every (step, split) the reference logged must be
    in the soaked run, each time it appears with the same values. Also returns the repeated lines."""
    ref, _ = metric_lines(ref_dir)
    soak, torn = metric_lines(soak_dir)
    diffs = [f"{soak_dir}/metrics.jsonl: {torn} unreadable line(s)"] if torn else []
    expected = {(x["step"], x["split"]): _without_timing(x) for x in ref}
    seen: dict[tuple[int, str], int] = {}
    for x in soak:
        key = (x["step"], x["split"])
        seen[key] = seen.get(key, 0) + 1
        if key not in expected:
            diffs.append(f"step {key[0]} {key[1]}: logged by the soaked run only")
        elif _without_timing(x) != expected[key]:
            fields = sorted(k for k, v in _without_timing(x).items() if expected[key].get(k) != v)
            diffs.append(f"step {key[0]} {key[1]}: {', '.join(fields)} differ")
    diffs += [f"step {k[0]} {k[1]}: missing" for k in expected if k not in seen]
    return diffs, sum(n - 1 for n in seen.values())


# --------------------------------------------------------------------------------------------------
# The soak.


def num_steps_of(workdir: Path) -> int:
    if not (workdir / "config.json").exists():
        return -1
    return int(json.loads((workdir / "config.json").read_text())["train"]["num_steps"])


def soak(
    workdir: Path,
    main_args: Sequence[str],
    *,
    kills: int,
    seed: int,
    signals: Sequence[str] = ("SIGKILL", "SIGTERM"),
    in_checkpoint: float = 0.4,
    processes: int = 1,
    devices_per_process: int = 1,
    kill_scope: str = "both",
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Runs the reference and the soaked run, compares them; returns the report (see module doc)."""
    launcher = Launcher(tuple(main_args), processes, devices_per_process, timeout_s)
    ref, soaked = workdir / "reference", workdir / "soaked"
    args_file = workdir / "main_args.json"
    if args_file.exists() and json.loads(args_file.read_text()) != [*main_args, processes]:
        shutil.rmtree(ref, ignore_errors=True)  # another job: its reference does not apply
    workdir.mkdir(parents=True, exist_ok=True)
    args_file.write_text(json.dumps([*main_args, processes]))
    timing_file = workdir / "reference_timing.json"
    if not timing_file.exists() or not finished(ref, num_steps_of(ref)):
        shutil.rmtree(ref, ignore_errors=True)
        code, wall, startup = run_to_end(launcher, ref, workdir / "logs" / "reference")
        if code != 0:
            raise RuntimeError(f"The uninterrupted run failed (exit {code}): {workdir}/logs.")
        timing_file.write_text(json.dumps({"wall_s": wall, "startup_s": startup}))
    timing = json.loads(timing_file.read_text())
    num_steps = num_steps_of(ref)

    shutil.rmtree(soaked, ignore_errors=True)
    rng = random.Random(seed)
    trials: list[Trial] = []
    launch = 0
    startup_s = timing["startup_s"]  # shrinks once the compilation cache is warm
    while len(trials) < kills and launch < 3 * kills:
        launch += 1
        log_dir = workdir / "logs" / f"soaked_{launch:02d}"
        sig = rng.choice(list(signals))
        scope = kill_scope if kill_scope != "both" else rng.choice(["one", "all"])
        committed = committed_steps(soaked / "checkpoints")
        done = committed[-1] if committed else 0
        moment = draw_moment(rng, in_checkpoint, done, num_steps, startup_s, kills - len(trials))
        trial, proc, t0, first_line = killed_launch(
            launcher,
            soaked,
            log_dir,
            rng=rng,
            sig=sig,
            moment=moment,
            scope=scope,
            num_steps=num_steps,
        )
        if first_line is not None:
            startup_s = min(startup_s, first_line)
        code = wait(proc, timeout_s)
        if trial is None:  # the run ended before the moment came
            if finished(soaked, num_steps):
                break
            continue
        trial.trial = len(trials) + 1
        trial.exit_codes = [code]
        trial.wall_s = round(time.perf_counter() - t0, 1)
        trial.resumed_from = resumed_from(log_dir, bool(committed))
        trials.append(trial)
    if not finished(soaked, num_steps):
        committed = committed_steps(soaked / "checkpoints")
        log_dir = workdir / "logs" / "soaked_final"
        code, wall, _ = run_to_end(launcher, soaked, log_dir)
        trials.append(
            Trial(
                len(trials) + 1,
                "-",
                "-",
                "-",
                "ran to the end",
                None,
                None,
                resumed_from(log_dir, bool(committed)),
                [code],
                round(wall, 1),
            )
        )
    diffs = compare_checkpoints(ref / "checkpoints", soaked / "checkpoints")
    diffs += compare_checkpoints(
        ref / "teacher" / "checkpoints", soaked / "teacher" / "checkpoints"
    )
    metric_diffs, repeated = compare_metrics(ref, soaked)
    diffs += metric_diffs
    diffs += [
        f"{p}: a torn checkpoint write left behind" for p in sorted(checkpoint_writes(soaked))
    ]
    kills_done = [t for t in trials if t.signal != "-"]
    return {
        "benchmark": "soak",
        "main_args": list(main_args),
        "processes": processes,
        "devices_per_process": devices_per_process,
        "seed": seed,
        "num_steps": num_steps,
        "kills": len(kills_done),
        "kills_in_checkpoint_write": sum(t.phase == "checkpoint write" for t in kills_done),
        "reference_wall_s": round(timing["wall_s"], 1),
        "trials": [dataclasses.asdict(t) for t in trials],
        "repeated_metric_lines": repeated,
        "identical": not diffs,
        "differences": diffs[:50],
        "machine": reporting.machine(),
    }


def table(report: Mapping[str, Any]) -> str:
    header = [
        "trial",
        "signal",
        "moment",
        "hit",
        "phase",
        "logged step",
        "checkpoint",
        "this launch",
        "exit",
    ]
    rows = [
        [
            t["trial"],
            t["signal"],
            t["moment"],
            t["target"],
            t["phase"],
            "-" if t["logged_step"] is None else t["logged_step"],
            "-" if t["committed_step"] is None else t["committed_step"],
            t["resumed_from"],
            ",".join(map(str, t["exit_codes"])),
        ]
        for t in report["trials"]
    ]
    verdict = "identical" if report["identical"] else "DIFFERENT"
    return (
        reporting.markdown_table(header, rows)
        + f"\n\n{report['kills']} kills ({report['kills_in_checkpoint_write']} inside a checkpoint "
        f"write), {report['processes']} process(es), {report['num_steps']} steps: final state, "
        f"input positions and metrics {verdict} to the uninterrupted run."
    )


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "workdir",
        None,
        "Where the two runs, their logs and soak.json go.",
        flag_values=fv,
        required=True,
    )
    flags.DEFINE_integer("kills", 10, "How many times to kill the soaked run.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the kill schedule.", flag_values=fv)
    flags.DEFINE_list("signals", ["SIGKILL", "SIGTERM"], "Signals to draw from.", flag_values=fv)
    flags.DEFINE_float(
        "in_checkpoint", 0.4, "Share of kills timed inside a checkpoint write.", flag_values=fv
    )
    flags.DEFINE_integer("processes", 1, "Processes per launch.", flag_values=fv)
    flags.DEFINE_integer(
        "devices_per_process", 1, "Fake CPU devices per process (processes > 1).", flag_values=fv
    )
    flags.DEFINE_enum(
        "kill_scope",
        "both",
        ["one", "all", "both"],
        "With several processes: kill one, all, or draw per kill.",
        flag_values=fv,
    )
    flags.DEFINE_float("timeout_s", 3600.0, "Longest a launch may take.", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    main_args = args[args.index("--") + 1 :] if "--" in args else []
    own = args[: args.index("--")] if "--" in args else args
    fv, rest = cli.parse_flags(PROG, _define, own, "[flags] -- MAIN_ARGS", __doc__)
    if rest or not any(a.startswith("--config") for a in main_args):
        cli.usage_error(
            PROG, "give the main job's arguments after '--', e.g. -- --config configs/tiny.py"
        )
    unknown = sorted(set(fv.signals) - set(SIGNALS))
    if unknown:
        cli.usage_error(PROG, f"--signals {unknown}: expected some of {sorted(SIGNALS)}.")
    if fv.kills < 1 or fv.processes < 1:
        cli.usage_error(PROG, "--kills and --processes must be >= 1.")
    workdir = Path(fv.workdir)
    report = soak(
        workdir,
        main_args,
        kills=fv.kills,
        seed=fv.seed,
        signals=fv.signals,
        in_checkpoint=fv.in_checkpoint,
        processes=fv.processes,
        devices_per_process=fv.devices_per_process,
        kill_scope=fv.kill_scope,
        timeout_s=fv.timeout_s,
    )
    print(table(report))
    for d in report["differences"]:
        print(f"  {d}")
    reporting.write_json(workdir / "soak.json", report)
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
