"""Pod preflight: the tiny config compiled for abstract TPU slices on this CPU machine (libtpu), with the
trainer's own setup; the failures a user would otherwise meet on the pod end with one line."""

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import tiny
from marnet_jax import preflight
from marnet_jax.data import datasets, decoders
from marnet_jax.train import sharding
from marnet_jax.train.experiment import Experiment

REPO = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    __import__("importlib").util.find_spec("libtpu") is None,
    reason="the TPU runtime library (libtpu, requirements.txt) is not installed",
)


GIB = 2**30


def _config(variant="baseline", **train):
    config = tiny.get_config(variant)
    config.model.backbone = (
        "resnet10"  # the smallest backbone: TPU compiles take seconds, not minutes
    )
    for k, v in train.items():
        config.train[k] = v
    return config


def test_topology_names_and_accelerator_types():
    assert preflight.topology_name("v5e:2x2") == "v5e:2x2"
    assert preflight.topology_name("v5litepod-8") == "v5e:2x4"
    assert preflight.topology_name("v4-32") == "v4:2x2x4"  # v4 types count TensorCores
    assert preflight.topology_name("v5p-16") == "v5p:2x2x2"
    assert preflight.topology_name("v6e-256") == "v6e:16x16"
    for bad in ("v9:2x2", "v5e-3", "v5e:2", "h100"):
        with pytest.raises(preflight.PreflightError, match="--topology"):
            preflight.topology_name(bad)


class _FakeCompiled:
    """A compiled step whose memory grows linearly with the per-chip batch."""

    def __init__(self, per_chip: int):
        self.per_chip = per_chip

    def memory_analysis(self):
        return types.SimpleNamespace(
            argument_size_in_bytes=GIB,
            output_size_in_bytes=0,
            alias_size_in_bytes=0,
            temp_size_in_bytes=self.per_chip * 100 * 2**20,
            generated_code_size_in_bytes=0,
            peak_memory_in_bytes=0,
        )


@pytest.mark.parametrize(
    "start,fits_up_to,compiles",
    [(8, 151, 6), (8, 140, 7), (8, 5, 5), (4, 9, 8), (64, 600, 14)],  # 600: the line's guess 4x low
)
def test_max_batch_finds_the_largest_fitting_batch_in_few_compiles(
    monkeypatch, start, fits_up_to, compiles
):
    tried = []

    def fake_compile(config, devices, topology, usable_bytes=None):
        per_chip = config.train.batch_size // len(devices)
        tried.append(per_chip)
        if per_chip > fits_up_to:
            raise preflight.HbmOverflow(f"{topology}: the train step does not fit in HBM")
        return _FakeCompiled(per_chip), 0.0, None, None

    monkeypatch.setattr(preflight, "compile_train", fake_compile)
    # The line's guess assumes all of HBM; XLA stops earlier (fits_up_to): the search corrects it.
    hbm = GIB + 160 * 100 * 2**20
    found = preflight.max_batch(_config(batch_size=4 * start), [object()] * 4, "v5e:2x2", hbm)
    granularity = 8 if fits_up_to >= 8 else 1
    assert found <= fits_up_to < found + granularity
    assert len(set(tried)) == len(tried) <= compiles, tried


def test_errors_before_compiling_name_the_field():
    devices = [object()] * 4
    with pytest.raises(
        preflight.PreflightError, match=r"config.train.batch_size=18 .* multiple of 4"
    ):
        preflight.compile_steps(_config(batch_size=18), devices, "v5e:2x2")
    config = _config()
    config.mesh.data = 3
    with pytest.raises(preflight.PreflightError, match=r"config.mesh.data=3"):
        preflight.compile_steps(config, jax.devices("cpu")[:1] * 4, "v5e:2x2")


@needs_libtpu
@pytest.mark.parametrize(
    "variant",
    ["baseline", pytest.param("full", marks=pytest.mark.slow)],  # full: a minute more
)
def test_tiny_config_compiles_for_v5e_with_the_trainers_parameters(variant):
    config = _config(variant)
    record = preflight.run(config, "v5e:2x2")
    assert record["chips"] == 4 and record["mesh"] == {"data": 4, "fsdp": 1}
    assert record["chip"] == "TPU v5 lite" and record["per_chip_batch"] == 4
    abstract = Experiment.build(config, datasets.shape_facts(config.data)).abstract
    assert record["parameters"] == sum(math.prod(p.shape) for p in jax.tree.leaves(abstract.params))
    memory = record["train_memory"]
    assert 0 < memory["arguments"] < memory["peak"] < record["hbm_bytes_per_chip"]
    assert record["train_flops_per_chip"] > 0
    assert record["images_per_s_at_50_mfu"] == pytest.approx(record["images_per_s_at_100_mfu"] / 2)
    assert "| train step memory per chip | peak 0.0" in preflight.table(record)


def test_cpu_decode_train_batch_is_canvases_boxes_and_extents():
    """With data.decoder 'cpu_decode' the train step is compiled for what the host ships: uint8
    canvases, boxes and extents, split over the batch axes like the rest of the batch (the
    trainer's test trains on them)."""
    config = _config()
    config.data.decoder = "cpu_decode"
    facts = datasets.shape_facts(config.data)
    mesh = sharding.make_mesh(config.mesh)
    specs = preflight.batch_specs(config, facts, mesh, 8, eval_=False)
    canvas = decoders.canvas_size(config.data.image_size)
    assert specs["image"].shape == (8, canvas, canvas, 3) and specs["image"].dtype == np.uint8
    assert specs["box"].shape == (8, 4) and specs["box"].dtype == np.float32
    assert specs["extent"].shape == (8, 2) and specs["extent"].dtype == np.int32
    assert specs["box"].sharding == specs["extent"].sharding == specs["label"].sharding
    config.data.decoder = "cpu"
    plain = preflight.batch_specs(config, facts, mesh, 8, eval_=False)
    assert plain["image"].shape == (8, 32, 32, 3) and "box" not in plain


@needs_libtpu
def test_v4_with_a_data_x_fsdp_mesh_shards_parameters():
    config = _config()
    config.mesh.data, config.mesh.fsdp, config.mesh.fsdp_min_size = 2, 2, 2**10
    record = preflight.run(config, "v4:2x2x1")
    assert record["chip"] == "TPU v4" and record["mesh"] == {"data": 2, "fsdp": 2}
    assert record["fsdp_sharded_arrays"] > 0 and record["eval_memory"]["peak"] > 0


@needs_libtpu
def test_a_batch_too_large_for_a_v5e_chip_is_one_clear_error():
    config = _config(batch_size=4 * 32768)
    config.data.image_size = 64
    with pytest.raises(preflight.PreflightError, match=r"does not fit in a chip's HBM at config"):
        preflight.run(config, "v5e:2x2")


def test_command_line_error_is_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "marnet_jax.preflight", "--config", "configs/tiny.py",
         "--topology", "v5e:2x2", "--config.train.batch_size=18"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("marnet_jax.preflight: ") and "config.train.batch_size=18" in last


@needs_libtpu
def test_describing_a_tpu_topology_off_a_tpu_vm_prints_nothing():
    """libtpu, loaded to describe a topology, would print errors about the host it cannot look up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "ALLOW_MULTIPLE"))}
    script = "from marnet_jax import preflight; print(len(preflight.tpu_devices('v5e:2x2')[1]))"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["4"] and proc.stderr == "", proc.stderr[-2000:]


def _has_cuda_plugin() -> bool:
    try:
        return __import__("importlib").util.find_spec("jax_plugins.xla_cuda13") is not None
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False


has_cuda_plugin = _has_cuda_plugin()
needs_cuda_plugin = pytest.mark.skipif(
    not has_cuda_plugin,
    reason="GPU topologies need the CUDA plugin (jax-cuda13-plugin, jax-cuda13-pjrt)",
)


def test_gpu_node_specs_are_checked_first():
    for bad in ("h100x12", "h100x0", "h300x8"):
        with pytest.raises(preflight.PreflightError, match="expected GPUxN"):
            preflight.gpu_devices(bad)
    with pytest.raises(preflight.PreflightError, match="--num_slices is for TPU"):
        preflight.run(_config(), "h100x8", num_slices=2)
    with pytest.raises(preflight.PreflightError, match=r"batch_size=16 .* 3 chips"):
        preflight.run(_config(), "h200x3")


@pytest.mark.skipif(has_cuda_plugin, reason="the CUDA plugin is installed")
def test_gpu_topology_without_the_plugin_says_what_to_install():
    with pytest.raises(preflight.PreflightError, match="pip install jax-cuda13-plugin"):
        preflight.gpu_devices("h100x8")


@needs_cuda_plugin
def test_tiny_config_compiles_for_an_h100_node_and_gpu_memory_is_checked_here():
    record = preflight.run(_config(), "h100x8")
    assert record["chips"] == 8 and record["mesh"] == {"data": 8, "fsdp": 1}
    assert record["usable_bytes_per_chip"] == int(0.75 * 81_559 * 2**20)
    assert record["train_flops_per_chip"] > 0
    # XLA's GPU compiler accepts this; the preflight's own check refuses it.
    with pytest.raises(preflight.HbmOverflow, match=r"config\.train\.batch_size=2097152 .*usable"):
        preflight.run(_config(batch_size=2**21), "h100x8")
