"""benchmarks.fingerprint: the hash of the state after a few steps is a pure function of the
machine's arithmetic (the same twice), sees a last-bit change, and the portable switch reaches XLA."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from benchmarks import fingerprint
from marnet_jax import cpu

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two builds and compiles of the tiny train step
def test_same_steps_give_the_same_fingerprint():
    a = fingerprint.fingerprint("tiny", steps=2)
    b = fingerprint.fingerprint("tiny", steps=2)
    assert a["fingerprint"] == b["fingerprint"] and a["losses"] == b["losses"]
    assert len(a["fingerprint"]) == 16 and len(a["losses"]) == 2


def test_state_hash_sees_one_ulp():
    x = {"w": jnp.ones((3,), jnp.float32)}
    y = {"w": x["w"].at[1].set(jnp.nextafter(jnp.float32(1), jnp.float32(2)))}
    assert fingerprint.state_hash(x) != fingerprint.state_hash(y)
    assert fingerprint.state_hash(x) == fingerprint.state_hash({"w": jnp.ones((3,), jnp.float32)})


def test_portable_switches_are_added_once_and_respect_the_users_flags(monkeypatch):
    assert cpu.with_portable_flags("") == " ".join(cpu.PORTABLE_XLA_FLAGS)
    mine = "--xla_cpu_max_isa=SSE4_2"
    got = cpu.with_portable_flags(mine).split()
    assert mine in got and "--xla_cpu_max_isa=AVX2" not in got
    assert "--xla_cpu_enable_platform_dependent_math=false" in got
    monkeypatch.setenv(cpu.PORTABLE_ENV, "0")
    assert not cpu.portable_requested()
    monkeypatch.setenv(cpu.PORTABLE_ENV, "1")
    assert cpu.portable_requested()


@pytest.mark.slow
def test_command_prints_the_fingerprint_of_the_portable_code(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.fingerprint", "--portable", "--steps=1",
         f"--json={tmp_path / 'f.json'}"],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "portable CPU code" in out.stdout and out.stdout.startswith("fingerprint ")
    record = json.loads((tmp_path / "f.json").read_text())
    assert record["portable"] is True
    for flag in cpu.PORTABLE_XLA_FLAGS:
        assert flag in record["xla_flags"]
