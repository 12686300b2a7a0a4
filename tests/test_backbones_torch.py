"""Imported weights reproduce PyTorch: torchvision ResNets and timm ViTs, through every file format.

Reference networks (tests/torch_reference.py) are written in torchvision's / timm's module layouts, so
their state dicts carry real checkpoint names. Their random weights are saved as .pth, .safetensors and
big_vision / vision_transformer .npz, imported with marnet_jax.models.pretrained, and the Flax forward
pass is compared with PyTorch's on the same input. Skipped unless torch is installed (CI installs it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marnet_jax.models import pretrained
from marnet_jax.models.backbones import build_backbone

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
import torch_reference as ref  # noqa: E402  (needs torch)


def _relative_error(out, expected) -> float:
    return float(np.linalg.norm(np.asarray(out) - expected) / np.linalg.norm(expected))


def _abstract(model, size: int):
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def _import_files(paths, abstract):
    """Imports each file; checks they all give the same arrays; returns the first's variables."""
    results = [
        pretrained.import_backbone(p, abstract["params"], abstract.get("batch_stats"))
        for p in paths
    ]
    params, stats, report = results[0]
    for other_params, other_stats, _ in results[1:]:
        jax.tree.map(np.testing.assert_array_equal, (params, stats), (other_params, other_stats))
    variables = {"params": params, "batch_stats": stats} if stats else {"params": params}
    assert jax.tree.structure(variables) == jax.tree.structure(abstract)
    return variables, report


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_from_torchvision_files_matches_pytorch(name, tmp_path):
    torch.manual_seed(0)
    torch_model = ref.randomize_batchnorm(ref.ResNet(name, width=16))
    sd = torch_model.state_dict()
    torch.save(sd, tmp_path / "w.pth")
    safetensors_torch.save_file(sd, tmp_path / "w.safetensors")
    model = build_backbone(name, width=0.25, stem="imagenet")
    variables, report = _import_files(
        [tmp_path / "w.pth", tmp_path / "w.safetensors"], _abstract(model, 64)
    )
    assert report.format == "torchvision"
    assert {"fc.weight", "fc.bias", "bn1.num_batches_tracked"} <= set(report.ignored)

    x = torch.randn(2, 3, 64, 64)
    xj = ref.to_nhwc(x)
    torch_model.eval()
    expected = torch_model(x).detach().numpy()
    for impl in ("xla", "cpu"):
        m = build_backbone(name, width=0.25, stem="imagenet", conv_impl=impl)
        out = jax.jit(lambda v, x, m=m: m.apply(v, x, train=False))(variables, xj)
        assert _relative_error(out, expected) < 1e-4, impl
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

    # Train mode: batch statistics, and the running-average update of the imported statistics.
    torch_model.train()
    expected = torch_model(x).detach().numpy()  # also updates torch's running stats once
    out, state = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, xj
    )
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=2e-3)
    _, updated, _ = pretrained.import_backbone(
        torch_model.state_dict(), variables["params"], variables["batch_stats"]
    )
    new = state["batch_stats"]["layer2"]["block0"]["bn1"]
    np.testing.assert_allclose(new["mean"], updated["layer2"]["block0"]["bn1"]["mean"], atol=1e-6)
    # torch updates running_var with the unbiased batch variance, flax with the biased one.
    np.testing.assert_allclose(new["var"], updated["layer2"]["block0"]["bn1"]["var"], rtol=5e-3)


D, HEADS, HIDDEN, DEPTH = 64, 4, 128, 2


def _vit(**kwargs):
    return build_backbone(
        "vit_ti16",
        width=D,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_dim=HIDDEN,
        approximate_gelu=False,  # timm's exact GELU
        **kwargs,
    )


def _torch_vit(grid: int):
    torch.manual_seed(0)
    return ref.ViT(D, DEPTH, HEADS, HIDDEN, grid=grid).eval()


def _vit_forward(variables, x, **kwargs):
    m = _vit(**kwargs)
    return jax.jit(lambda v, x: m.apply(v, x, train=False))(variables, ref.to_nhwc(x))


def test_vit_from_timm_and_big_vision_files_matches_pytorch(tmp_path):
    torch_model = _torch_vit(grid=4)
    sd = torch_model.state_dict()
    safetensors_torch.save_file(sd, tmp_path / "timm.safetensors")
    torch.save(sd, tmp_path / "timm.pth")
    sd_np = ref.state_dict_numpy(torch_model)
    np.savez(tmp_path / "big_vision.npz", **ref.timm_to_big_vision(sd_np, HEADS))
    old = ref.timm_to_big_vision(sd_np, HEADS, old_layout=True)
    np.savez(tmp_path / "vit_jax.npz", **{f"opt/target/{k}": v for k, v in old.items()})
    timm_files = [tmp_path / "timm.safetensors", tmp_path / "timm.pth"]
    variables, _ = _import_files(timm_files, {"params": _abstract(_vit(), 64)["params"]})
    for npz in ("big_vision.npz", "vit_jax.npz"):
        params, _, report = pretrained.import_backbone(tmp_path / npz, variables["params"])
        assert report.format == "big_vision"
        assert set(report.ignored) == {"head/kernel", "head/bias"}
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-7),
            params,
            variables["params"],
        )

    x = torch.randn(2, 3, 64, 64)
    expected = torch_model(x).detach().numpy()
    out = _vit_forward(variables, x)
    assert _relative_error(out, expected) < 1e-4
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
@pytest.mark.parametrize("grid", [6, 2])
def test_posemb_resize_is_torch_interpolation(method, grid):
    """Weights for a 4x4 patch grid (64 px) imported into a model at 96 px (6x6) or 32 px (2x2)."""
    torch_model = _torch_vit(grid=4)
    size = 16 * grid
    abstract = _abstract(_vit(), size)["params"]
    params, _, report = pretrained.import_backbone(
        torch_model.state_dict(), abstract, posemb_interpolation=method
    )
    assert report.resized == (f"params/pos_embedding 4x4 -> {grid}x{grid} ({method})",)
    old_grid = torch_model.pos_embed.detach()[:, 1:].reshape(1, 4, 4, D).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(
        old_grid, size=(grid, grid), mode=method, align_corners=False, antialias=True
    )
    expected = expected.permute(0, 2, 3, 1).reshape(1, grid * grid, D).numpy()
    np.testing.assert_allclose(params["pos_embedding"], expected, rtol=1e-5, atol=1e-6)

    if grid == 6 and method == "bicubic":  # the resized model is timm's resized model
        with torch.no_grad():
            torch_model.pos_embed = torch.nn.Parameter(
                torch.cat([torch_model.pos_embed[:, :1], torch.from_numpy(expected)], 1)
            )
        x = torch.randn(2, 3, size, size)
        out = _vit_forward({"params": params}, x)
        assert _relative_error(out, torch_model(x).detach().numpy()) < 1e-4
