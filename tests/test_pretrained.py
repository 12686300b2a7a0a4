"""Weight import without PyTorch: .safetensors and .npz round trips, the one error that lists every
missing / unexpected / mis-shaped array, re-initialised layers and sharded placement. The comparisons
with PyTorch forward passes are in test_backbones_torch.py; a training run that starts from a weights
file (model.init_from) is in test_predict.py."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file
from weight_files import torchvision_names

from configs import tiny
from marnet_jax.models import pretrained
from marnet_jax.models.backbones import build_backbone
from marnet_jax.train.steps import TrainState


@pytest.fixture
def no_torch(monkeypatch):
    """`import torch` fails, as on a machine without PyTorch."""
    monkeypatch.setitem(sys.modules, "torch", None)


def _random_like(tree, seed: int = 0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), tree)


def _resnet_variables():
    """Random numpy variables of a small ImageNet-stem ResNet-18 (no compile: shapes only)."""
    model = build_backbone("resnet18", width=0.125, stem="imagenet")
    x = jnp.zeros((1, 32, 32, 3))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    return _random_like(abstract["params"]), _random_like(abstract["batch_stats"], seed=1)


def _vit_params():
    model = build_backbone("vit_ti16", width=32, depth=2, num_heads=2, mlp_dim=64)
    x = jnp.zeros((1, 32, 32, 3))
    return _random_like(jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False)))[
        "params"
    ]


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_torchvision_safetensors_round_trip_without_torch(tmp_path, no_torch):
    params, stats = _resnet_variables()
    save_file(torchvision_names(params, stats), tmp_path / "r18.safetensors")
    new_params, new_stats, report = pretrained.import_backbone(
        tmp_path / "r18.safetensors", params, stats
    )
    _assert_tree_equal(new_params, params)
    _assert_tree_equal(new_stats, stats)
    assert report.format == "torchvision" and report.loaded == len(jax.tree.leaves((params, stats)))
    assert "fc.weight" in report.ignored
    assert "fc.weight" in report.summary() and "num_batches_tracked" in report.summary()


def test_big_vision_npz_round_trip_without_torch(tmp_path, no_torch):
    params = _vit_params()
    flat = {"/".join(k): v for k, v in flatten_dict(params).items()}
    flat |= {"head/kernel": np.ones((32, 10), np.float32), "pre_logits/bias": np.ones(32)}
    np.savez(tmp_path / "vit.npz", **{f"params/{k}": v for k, v in flat.items()})
    new_params, _, report = pretrained.import_backbone(tmp_path / "vit.npz", params)
    _assert_tree_equal(new_params, params)
    assert set(report.ignored) == {"head/kernel", "pre_logits/bias"}


def test_pth_without_torch_says_what_to_do(tmp_path, no_torch):
    (tmp_path / "w.pth").write_bytes(b"not read")
    with pytest.raises(ImportError, match=r"needs PyTorch.*\.safetensors"):
        pretrained.read_weights(tmp_path / "w.pth")


def test_one_error_lists_missing_unexpected_and_mismatched(tmp_path):
    params, stats = _resnet_variables()
    weights = torchvision_names(params, stats)
    del weights["layer1.0.conv1.weight"]
    weights["layer2.0.bn1.bias"] = np.zeros(3, np.float32)
    weights["layer9.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    weights["extra.thing"] = np.zeros(2, np.float32)
    save_file(weights, tmp_path / "bad.safetensors")
    with pytest.raises(pretrained.WeightImportError) as e:
        pretrained.import_backbone(tmp_path / "bad.safetensors", params, stats)
    msg = str(e.value)
    assert "bad.safetensors (torchvision format)" in msg
    assert "missing from the file (1): params/layer1/block0/conv1/kernel (3, 3, 8, 8)" in msg
    assert "unexpected in the file (2)" in msg
    assert "layer9.0.conv1.weight (-> params/layer9/block0/conv1/kernel)" in msg
    assert "extra.thing" in msg
    assert (
        "shape mismatch (1): params/layer2/block0/bn1/bias: file layer2.0.bn1.bias gives (3,)"
        in msg
    )
    assert "fc.weight" not in msg  # the classifier is ignored, not unexpected


def test_stem_mismatch_is_a_shape_error():
    params, stats = _resnet_variables()
    small = build_backbone("resnet18", width=0.125, stem="small")
    x = jnp.zeros((1, 32, 32, 3))
    target = jax.eval_shape(lambda: small.init(jax.random.key(0), x, train=False))
    with pytest.raises(pretrained.WeightImportError, match=r"conv_init/kernel: file conv1.weight"):
        pretrained.import_backbone(
            torchvision_names(params, stats), target["params"], target["batch_stats"]
        )


def test_reinit_keeps_initialised_layers():
    params, stats = _resnet_variables()
    weights = {k: v for k, v in torchvision_names(params, stats).items() if "layer4" not in k}
    init_params, init_stats = _resnet_variables()  # the same shapes, other values: "fresh" init
    init_params = jax.tree.map(lambda x: x + 1, init_params)
    new_params, new_stats, report = pretrained.import_backbone(
        weights, init_params, init_stats, reinit=["layer4/"]
    )
    for new, init in ((new_params, init_params), (new_stats, init_stats)):
        kept = zip(jax.tree.leaves(new["layer4"]), jax.tree.leaves(init["layer4"]), strict=True)
        assert all(a is b for a, b in kept)
    _assert_tree_equal(new_params["layer3"], params["layer3"])
    assert report.reinit and all("layer4/" in k for k in report.reinit)
    with pytest.raises(ValueError, match=r"\['layer7/'\] match no backbone array"):
        pretrained.import_backbone(weights, init_params, init_stats, reinit=["layer7/"])


def test_format_and_file_errors(tmp_path):
    params, stats = _resnet_variables()
    with pytest.raises(pretrained.WeightImportError, match="timm weights do not fit a resnet"):
        pretrained.import_backbone({"patch_embed.proj.weight": np.zeros(1)}, params, stats)
    with pytest.raises(pretrained.WeightImportError, match="Cannot tell the weights format"):
        pretrained.import_backbone({"foo.weight": np.zeros(1)}, params, stats)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        pretrained.import_backbone(tmp_path / "absent.pth", params, stats)
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(pretrained.WeightImportError, match=r"unknown weights file type '\.h5'"):
        pretrained.import_backbone(tmp_path / "w.h5", params, stats)


def test_load_into_state_keeps_each_arrays_sharding(tmp_path):
    """Imported arrays land on the shardings of the arrays they replace (here FSDP over 8 devices)."""
    params, stats = _resnet_variables()
    save_file(torchvision_names(params, stats), tmp_path / "r18.safetensors")
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("fsdp",))

    def place(x):
        spec = P(*([None] * (x.ndim - 1)), "fsdp") if x.shape[-1] % 8 == 0 else P()
        return jax.device_put(jnp.zeros_like(x), NamedSharding(mesh, spec))

    head = {"kernel": jnp.ones((4, 3))}
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params={"backbone": jax.tree.map(place, params), "fused_head": head},
        batch_stats={"backbone": jax.tree.map(place, stats)},
        opt_state=(),
        rng=jax.random.key(0),
    )
    model_cfg = tiny.get_config().model
    model_cfg.init_from = str(tmp_path / "r18.safetensors")
    messages = []
    new = pretrained.load_into_state(state, model_cfg, on_report=messages.append)
    assert messages and messages[0].startswith("Backbone weights from")
    assert new.params["fused_head"] is head
    for got, old, want in zip(
        jax.tree.leaves(new.params["backbone"]),
        jax.tree.leaves(state.params["backbone"]),
        jax.tree.leaves(params),
    ):
        assert got.sharding == old.sharding
        np.testing.assert_array_equal(np.asarray(got), want)
    kernel = new.params["backbone"]["layer4"]["block0"]["conv1"]["kernel"]
    assert kernel.sharding.spec == P(None, None, None, "fsdp")
