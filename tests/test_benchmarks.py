"""Benchmarks: each smallest preset runs and writes valid JSON; the speed options they measure (device
prefetch position, asynchronous NaN checks, backbone remat) keep training exact."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import cdr_sampler, cpu_levers, end_to_end, train_step
from configs import default
from marnet_jax.data import datasets, decoders
from marnet_jax.models import build_model, resnet
from marnet_jax.models.backbones import build_backbone
from marnet_jax.train import loop, sharding
from marnet_jax.train.sharding import make_mesh

# One device like test_trainer.py's runs: the same tiny train step, so the persistent compilation
# cache (tests/conftest.py) serves it. Without --compile_cache a benchmark turns the cache off.
FAST = ["--devices", "1", "--compile_cache"]


def _json(path):
    return json.loads(path.read_text())


@pytest.mark.slow  # the same tiny step is compiled and run by test_end_to_end_tiny_preset
def test_train_step_tiny_preset(tmp_path):
    out = train_step.main(["--preset", "tiny", "--json", str(tmp_path / "t.json"), *FAST])
    assert _json(tmp_path / "t.json") == json.loads(json.dumps(out))
    (row,) = out["rows"]
    assert row["status"] == "measured" and row["batch"] == 16 and row["devices"] == 1
    s = row["step"]
    assert 0 < s["min_s"] <= s["p25_s"] <= s["median_s"] <= s["p75_s"] <= s["max_s"]
    assert row["images_per_s"] == pytest.approx(16 / s["median_s"], rel=1e-2)
    assert row["compile_s"] > 0 and row["lower_s"] > 0
    assert row["gflop_per_step"] > 0 and row["compiled_gflop_per_step"] > 0
    assert out["matmul_flops_per_s"]["float32"] > 0


def test_train_step_gpu_preset_is_pending_on_cpu(tmp_path):
    cases = "resnet50 224px full,vit_b16 224px full"
    args = ["--preset", "gpu", "--cases", cases, "--no_flops", "--json", str(tmp_path / "g.json")]
    out = train_step.main(args + FAST)
    assert _json(tmp_path / "g.json")["rows"] == out["rows"]
    pending = [r for r in out["rows"] if r["status"].startswith("pending")]
    assert len(pending) == 9 and all("GPU" in r["status"] for r in pending)
    cases = {(r["name"], r["batch"], r["dtype"]) for r in pending}
    assert ("resnet50 224px full", 256, "bfloat16") in cases
    assert ("vit_b16 224px full", 128, "bfloat16") in cases
    # One row by its key, for a GPU session with little device time.
    one = train_step.main(["--preset", "gpu", "--cases", "resnet50 224px full b256 bfloat16 remat",
                           "--no_flops", "--json", str(tmp_path / "one.json"), *FAST])  # fmt: skip
    assert [(r["batch"], r["remat"]) for r in one["rows"]] == [(256, True)]
    with pytest.raises(SystemExit, match="matches no case"):
        train_step.main(["--preset", "gpu", "--cases", "resnet50 b7", *FAST])


@pytest.mark.slow  # compiles the tiny step twice
def test_cpu_levers_tiny_preset(tmp_path):
    out = cpu_levers.main(
        ["--preset", "tiny", "--json", str(tmp_path / "l.json"), "--compile_cache"]
    )
    assert _json(tmp_path / "l.json")["rows"] == out["rows"]
    ref, lever = out["rows"]
    assert (
        ref["lever"] == cpu_levers.REFERENCE and ref["param_drift"] == 0.0 and ref["same_program"]
    )
    assert lever["compiler_options"] == {"xla_cpu_use_onednn": True}
    assert ref["speed"]["median"] == 1.0 and lever["step"]["median_s"] > 0


def test_cpu_levers_param_drift_is_the_relative_l2_distance_of_all_parameters():
    class State:
        def __init__(self, params):
            self.params = params

    ref = State({"a": np.array([3.0, -4.0]), "b": np.array([0.0])})
    assert cpu_levers.param_drift(State(dict(ref.params)), ref) == 0.0
    changed = State({"a": np.array([3.0, -4.0]), "b": np.array([0.5])})
    assert cpu_levers.param_drift(changed, ref) == pytest.approx(0.1)


def test_cpu_levers_refuses_an_unknown_lever(capsys):
    with pytest.raises(SystemExit):
        cpu_levers.main(["--levers", "warp drive"])
    assert "warp drive" in capsys.readouterr().err


@pytest.mark.slow  # keeps the default run under 10 minutes; the sampler is tested in test_diffusion
def test_cdr_sampler_tiny_preset(tmp_path):
    out = cdr_sampler.main(["--preset", "tiny", "--json", str(tmp_path / "c.json"), *FAST[2:]])
    assert _json(tmp_path / "c.json")["status"] == "measured"
    ddim, ddpm = out["chains"]
    assert (ddim["sampler"], ddim["steps"], ddpm["steps"]) == ("ddim", 10, 1000)
    assert ddpm["gflop_per_call"] == pytest.approx(100 * ddim["gflop_per_call"], rel=1e-3)
    assert all(r["samples_per_s"] > 0 for r in out["chains"])
    ema, full = out["predict"]
    assert (ema["chain"], full["chain"]) == ("-", "ddim-4")
    assert "cdr_overhead" in full


def test_end_to_end_tiny_preset(tmp_path):
    out = end_to_end.main(["--preset", "tiny", "--json", str(tmp_path / "e.json"), *FAST])
    rows = _json(tmp_path / "e.json")["rows"]
    assert rows == out["rows"] and [r["decoded_once"] for r in rows] == [False, True]
    for row in rows:
        for key in ("data_images_per_s", "model_images_per_s", "both_images_per_s"):
            assert row[key] > 0
        assert row["bottleneck"] in ("data", "model")


@pytest.mark.slow  # compiles ResNet-50 MARNet at 224 px on the CPU
def test_end_to_end_paper_preset_on_jpegs(tmp_path, monkeypatch):
    """The paper-scale preset (for GPU hosts) runs its JPEG pipeline into the ResNet-50 step."""
    import dataclasses

    small = dataclasses.replace(end_to_end.PRESETS["paper"], num_train=8, warmup=1, steps=1)
    monkeypatch.setitem(end_to_end.PRESETS, "paper", small)
    args = ["--preset", "paper", "--workers", "0", "--batch", "2", "--decoders", "cpu,dali", *FAST]
    out = end_to_end.main([*args, "--json", str(tmp_path / "e.json")])
    row, gpu_row = out["rows"]
    assert row["decoder"] == "cpu" and row["status"] == "measured"
    assert row["image_size"] == 224 and row["batch"] == 2 and row["workers"] == 0
    assert row["data_images_per_s"] > 0 and row["model_images_per_s"] > 0
    assert gpu_row["decoder"] == "dali"
    if end_to_end.dali_unavailable():  # on a GPU host with DALI the GPU decode is measured
        assert gpu_row["status"].startswith("not run: ")


def test_torch_side_by_side_tiny_preset(tmp_path):
    pytest.importorskip("torch")
    from benchmarks import torch_marnet

    # The JAX rows run benchmarks.train_step.run_case (tested above); the torch model of the
    # baseline variant is checked by the parameter-count test.
    args = [
        "--preset",
        "tiny",
        "--variants",
        "full",
        "--frameworks",
        "torch",
        "--torch_threads",
        "1",
    ]
    out = torch_marnet.main([*args, "--json", str(tmp_path / "p.json"), *FAST])
    (row,) = _json(tmp_path / "p.json")["rows"]
    assert row == json.loads(json.dumps(out["rows"][0]))
    assert (row["variant"], row["framework"].split()[0]) == ("full", "torch")
    assert row["batch"] == 16 and row["image_size"] == 32
    assert row["step"]["median_s"] > 0 and row["images_per_s"] > 0


def test_side_by_side_takes_turns_and_pairs_rounds(monkeypatch):
    import types

    from benchmarks import _common, torch_marnet

    # A virtual clock: each step advances it by its cost, so the timings do not depend on the load.
    clock = [0.0]
    fake_time = types.SimpleNamespace(
        perf_counter=lambda: clock[0], process_time=lambda: clock[0], sleep=lambda s: None
    )
    monkeypatch.setattr(_common, "time", fake_time)
    calls = []

    def sleeper(name, seconds):
        def step():
            calls.append(name)
            clock[0] += seconds

        return step

    contenders = [
        (dict(framework="torch x", batch=8), sleeper("torch", 0.004)),
        (dict(framework="jax y", batch=8), sleeper("jax", 0.008)),
    ]
    rows = torch_marnet._race(contenders, warmup=1, rounds=3, per_round=2)
    # Warm-up, then turns of two steps whose order rotates from round to round.
    assert calls == ["torch", "jax"] + ["torch"] * 2 + ["jax"] * 4 + ["torch"] * 4 + ["jax"] * 2
    assert [r["step"]["iters"] for r in rows] == [6, 6]
    assert rows[0]["speed_vs_torch"]["median"] == 1.0
    assert rows[1]["speed_vs_torch"]["median"] == 0.5  # half torch's speed
    assert rows[1]["step"]["median_s"] > rows[0]["step"]["median_s"]
    assert rows[0]["images_per_s"] == 2000.0


def test_conv_layers_tiny_preset(tmp_path):
    pytest.importorskip("torch")
    from benchmarks import conv_layers

    out = conv_layers.main(
        ["--preset", "tiny", "--torch_threads", "1", "--json", str(tmp_path / "c.json")]
    )
    data = _json(tmp_path / "c.json")
    assert data["rows"] == json.loads(json.dumps(out["rows"]))
    assert sum(r["count"] for r in data["rows"]) == 20  # configs/tiny.py: a ResNet-18
    assert set(data["per_step_ms"]) == {
        f"{f} {p}" for f in ("jax", "torch") for p in ("fwd", "dk", "dx")
    }
    assert all(v > 0 for v in data["per_step_ms"].values())


def test_conv_layers_reads_every_convolution_of_the_default_resnet():
    from benchmarks import conv_layers

    config = default.get_config()
    config.model.backbone = "resnet18"
    convs = conv_layers.backbone_convs(config)
    # ResNet-18: stem, 8 blocks of two 3x3 convs, 3 downsampling 1x1 convs; 64 px, stem /2.
    assert sum(convs.values()) == 20
    config.model.backbone = "resnet10"  # the default: one block per stage
    assert sum(conv_layers.backbone_convs(config).values()) == 12
    stem = next(iter(convs))
    assert (stem.stem, stem.size, stem.cin, stem.k, stem.stride) == (True, 64, 3, 3, 2)
    assert [c for c in convs if c.stem] == [stem]
    widths = default.get_config().model.backbone_kwargs.width * np.array([64, 64, 128, 256, 512])
    assert convs[conv_layers.ConvLayer(32, int(widths[1]), int(widths[1]), 3, 1, False)] == 4
    assert sum(n for c, n in convs.items() if c.k == 1) == 3


def test_conv_layers_jax_and_torch_calls_compute_the_same_convolution():
    pytest.importorskip("torch")
    from benchmarks import conv_layers

    # The benchmark times these calls against each other: they must be the same math.
    for layer in [
        conv_layers.ConvLayer(8, 4, 6, 3, 2, False),
        conv_layers.ConvLayer(8, 4, 6, 3, 1, False),
    ]:
        x, w = conv_layers.layer_data(layer, 2)
        jx = {k: np.asarray(f()) for k, f in conv_layers.jax_fns(layer, x, w, "auto").items()}
        tc = {k: f().detach().numpy() for k, f in conv_layers.torch_fns(layer, x, w).items()}
        np.testing.assert_allclose(jx["fwd"], tc["fwd"].transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(jx["dk"], tc["dk"].transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(jx["dx"], tc["dx"].transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
    stem = conv_layers.ConvLayer(8, 3, 4, 3, 2, True)
    x, w = conv_layers.layer_data(stem, 2)
    assert "dx" not in conv_layers.jax_fns(stem, x, w, "auto")
    assert "dx" not in conv_layers.torch_fns(stem, x, w)


def test_torch_port_refuses_what_it_does_not_mirror():
    pytest.importorskip("torch")
    from benchmarks import torch_marnet

    config = default.get_config("full,joint")
    torch_marnet.check_supported(config)
    with pytest.raises(ValueError, match=r"use_text_head=True.*classifier_input='x_v'"):
        torch_marnet.check_supported(default.get_config())  # the tuned teacher protocol
    config.model.cdr.prediction = "eps"
    config.model.fusion = "gated"
    with pytest.raises(ValueError, match=r"fusion='gated'.*cdr\.prediction='eps'"):
        torch_marnet.check_supported(config)


@pytest.mark.parametrize("variant", ["full", "baseline"])
def test_torch_port_has_the_jax_models_parameter_count(variant):
    pytest.importorskip("torch")
    from benchmarks import torch_marnet

    config = default.get_config(f"{variant},joint")  # the protocol the port mirrors
    facts = datasets.shape_facts(config.data)
    torch_model, _, _ = torch_marnet.build_torch_model(
        config, facts.num_classes, facts.num_ingredients
    )
    model = build_model(config.model, facts.num_classes, facts.num_ingredients)
    images = jnp.zeros((2, 64, 64, 3))
    ingredients = jnp.zeros((2, facts.num_ingredients))
    keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    keys["diffusion"] = jax.random.key(2)
    shapes = jax.eval_shape(lambda: model.init(keys, images, ingredients, train=True))
    n_jax = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    assert sum(p.numel() for p in torch_model.parameters()) == n_jax


class _CountingIterator:
    """Yields batches 0, 1, 2, ...; its state is the index of the next batch."""

    def __init__(self):
        self.next_index = 0

    def __next__(self):
        i = self.next_index
        self.next_index += 1
        return {"x": np.full((8, 2), i, np.float32)}

    def get_state(self):
        return {"next_index": self.next_index}


def test_device_prefetcher_position_is_the_first_batch_not_yet_returned():
    source = _CountingIterator()
    mesh = make_mesh(trainer_config_mesh())
    batches = loop.DevicePrefetcher(source, mesh, ("x",), size=2)
    assert source.next_index == 2  # two batches in flight before the first is asked for
    for expected in range(3):
        assert float(next(batches)["x"][0, 0]) == expected
        state = json.loads(batches.position().get_state())
        assert state == {"next_index": expected + 1}
    assert source.next_index == 5


def trainer_config_mesh():
    from marnet_jax.config import mesh_config

    cfg = mesh_config()
    cfg.num_devices = 1
    return cfg


def test_pending_metrics_stop_at_the_non_finite_step():
    pending = loop.PendingMetrics(max_in_flight=2)
    good = {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0), "update_norm": jnp.float32(1)}
    bad = dict(good, loss=jnp.float32(np.nan))
    pending.add(1, good, None)
    with pytest.raises(loop.NonFiniteLossError, match=r"step 2 .*checkpoint: step 1"):
        pending.add(2, bad, 1)  # ready at once: checked without waiting for a drain
        pending.add(3, good, 1)
        pending.drain(1)


def test_backbone_remat_gives_the_same_outputs_and_gradients():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    kw = dict(stage_sizes=(1, 1), stem="small", width=0.125, conv_impl="xla")
    plain, remat = resnet.ResNet(**kw), resnet.ResNet(remat=True, **kw)
    assert build_backbone("resnet50", remat=True).remat  # the registry passes it through
    config = default.get_config()
    config.model.remat = True
    assert build_model(config.model, num_classes=3, num_ingredients=4).backbone.remat
    variables = plain.init(jax.random.key(0), x, train=False)
    assert jax.tree.structure(variables) == jax.tree.structure(
        jax.eval_shape(lambda: remat.init(jax.random.key(0), x, train=False))
    )

    def loss(model, params):
        out, _ = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(out**2)

    grad_plain = jax.value_and_grad(lambda p: loss(plain, p))
    grad_remat = jax.value_and_grad(lambda p: loss(remat, p))
    recomputes = lambda f: bool(
        re.search(r"\b(remat2?|checkpoint)\[", str(jax.make_jaxpr(f)(params)))
    )
    params = variables["params"]
    assert recomputes(grad_remat) and not recomputes(grad_plain)
    for_plain = jax.jit(grad_plain)(params)
    for_remat = jax.jit(grad_remat)(params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), for_plain, for_remat
    )


def test_global_batch_shapes_of_synthetic_batches():
    from benchmarks import _common

    host = _common.synthetic_batch(4, 8, num_classes=3, num_ingredients=5, dtype="bfloat16")
    assert host["image"].shape == (4, 8, 8, 3) and host["image"].dtype == jnp.bfloat16
    assert host["label"].dtype == np.int32 and host["label"].max() < 3
    assert host["ingredients"].shape == (4, 5) and np.all(host["ingredients"].sum(-1) >= 1)
    batch = sharding.global_batch(host, make_mesh(trainer_config_mesh()))
    assert batch["image"].shape == (4, 8, 8, 3)
    train = _common.synthetic_train_batch(4, 8, num_classes=3, num_ingredients=5)
    assert train["image"].dtype == np.uint8 and train["jitter"].shape == (4, 3)
    assert train["flip"].shape == (4,) and train["flip"].dtype == np.bool_
    assert set(train) == set(decoders.Decoder().train_keys())  # the 'cpu' decoder's keys
