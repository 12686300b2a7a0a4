"""The documented torchvision (ResNet) and timm (ViT) parameter mappings reproduce PyTorch outputs.

PyTorch is not a project dependency: this file is skipped unless torch is installed
(`pip install torch`). The reference models below are written in torchvision's / timm's module
layout, so their state_dict keys are the ones real checkpoints use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import unflatten_dict

from marnet_jax.models.backbones import build_backbone

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional


class _Basic(tnn.Module):
    expansion = 1

    def __init__(self, cin: int, c: int, stride: int):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(c)
        self.conv2 = tnn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(c)
        self.downsample = None
        if stride != 1 or cin != c:
            self.downsample = tnn.Sequential(
                tnn.Conv2d(cin, c, 1, stride, bias=False), tnn.BatchNorm2d(c)
            )

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class _Bottleneck(tnn.Module):
    expansion = 4

    def __init__(self, cin: int, c: int, stride: int):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, c, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(c)
        self.conv2 = tnn.Conv2d(c, c, 3, stride, 1, bias=False)  # v1.5: stride on the 3x3
        self.bn2 = tnn.BatchNorm2d(c)
        self.conv3 = tnn.Conv2d(c, 4 * c, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(4 * c)
        self.downsample = None
        if stride != 1 or cin != 4 * c:
            self.downsample = tnn.Sequential(
                tnn.Conv2d(cin, 4 * c, 1, stride, bias=False), tnn.BatchNorm2d(4 * c)
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class _TorchResNet(tnn.Module):
    """torchvision.models.ResNet without fc, returning the pooled feature."""

    def __init__(self, block, sizes, width: int):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(width)
        cin = width
        for i, n in enumerate(sizes):
            blocks = []
            for b in range(n):
                stride = (1 if i == 0 else 2) if b == 0 else 1
                blocks.append(block(cin, width * 2**i, stride))
                cin = width * 2**i * block.expansion
            setattr(self, f"layer{i + 1}", tnn.Sequential(*blocks))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.mean((2, 3))


def _torchvision_to_flax(state_dict) -> dict:
    """The mapping documented in marnet_jax/models/resnet.py."""
    params, stats = {}, {}
    for key, value in state_dict.items():
        value = value.detach().numpy().copy()
        parts = key.split(".")
        if parts[-1] == "num_batches_tracked":
            continue
        if parts[0] in ("conv1", "bn1"):
            module = ("conv_init",) if parts[0] == "conv1" else ("bn_init",)
        else:
            name = parts[2]
            if name == "downsample":
                name = "downsample_conv" if parts[3] == "0" else "downsample_bn"
            module = (parts[0], f"block{parts[1]}", name)
        leaf = parts[-1]
        if leaf == "weight" and value.ndim == 4:
            params[(*module, "kernel")] = value.transpose(2, 3, 1, 0)
        elif leaf == "weight":
            params[(*module, "scale")] = value
        elif leaf == "bias":
            params[(*module, "bias")] = value
        elif leaf == "running_mean":
            stats[(*module, "mean")] = value
        elif leaf == "running_var":
            stats[(*module, "var")] = value
    return {"params": unflatten_dict(params), "batch_stats": unflatten_dict(stats)}


@pytest.mark.parametrize(
    "name,block,sizes",
    [("resnet18", _Basic, (2, 2, 2, 2)), ("resnet50", _Bottleneck, (3, 4, 6, 3))],
)
def test_resnet_matches_torchvision_layout(name, block, sizes):
    torch.manual_seed(0)
    ref_model = _TorchResNet(block, sizes, width=16)
    with torch.no_grad():
        for m in ref_model.modules():
            if isinstance(m, tnn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64)
    xj = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    variables = _torchvision_to_flax(ref_model.state_dict())
    model = build_backbone(name, width=0.25, stem="imagenet")
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), xj, train=False))
    assert jax.tree.structure(abstract) == jax.tree.structure(variables)

    ref_model.eval()
    expected = ref_model(x).detach().numpy()
    for impl in ("xla", "cpu"):
        m = build_backbone(name, width=0.25, stem="imagenet", conv_impl=impl)
        out = jax.jit(lambda v, x, m=m: m.apply(v, x, train=False))(variables, xj)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

    ref_model.train()
    expected = ref_model(x).detach().numpy()  # also updates torch's running stats once
    out, state = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, xj
    )
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=2e-3)
    updated = _torchvision_to_flax(ref_model.state_dict())["batch_stats"]
    new = state["batch_stats"]
    np.testing.assert_allclose(
        new["layer2"]["block0"]["bn1"]["mean"],
        updated["layer2"]["block0"]["bn1"]["mean"],
        atol=1e-6,
    )
    # torch updates running_var with the unbiased batch variance, flax with the biased one.
    np.testing.assert_allclose(
        new["layer2"]["block0"]["bn1"]["var"], updated["layer2"]["block0"]["bn1"]["var"], rtol=5e-3
    )


class _Attention(tnn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = tnn.Linear(d, 3 * d)
        self.proj = tnn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, d))


class _Mlp(tnn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1 = tnn.Linear(d, hidden)
        self.fc2 = tnn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(tnn.Module):
    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = tnn.LayerNorm(d, eps=1e-6)
        self.attn = _Attention(d, heads)
        self.norm2 = tnn.LayerNorm(d, eps=1e-6)
        self.mlp = _Mlp(d, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _TorchViT(tnn.Module):
    """timm VisionTransformer layout (class token, pre-norm blocks, final norm), no head."""

    def __init__(self, d: int, depth: int, heads: int, hidden: int, num_patches: int):
        super().__init__()
        self.patch_embed = tnn.Module()
        self.patch_embed.proj = tnn.Conv2d(3, d, 16, 16)
        self.cls_token = tnn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = tnn.Parameter(torch.randn(1, num_patches + 1, d) * 0.02)
        self.blocks = tnn.Sequential(*[_Block(d, heads, hidden) for _ in range(depth)])
        self.norm = tnn.LayerNorm(d, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.norm(self.blocks(x))[:, 0]


def _timm_to_flax(sd, d: int, heads: int) -> dict:
    """The mapping documented in marnet_jax/models/vit.py."""
    hd = d // heads

    def g(k):
        return sd[k].detach().numpy().copy()

    p = {
        ("embedding", "kernel"): g("patch_embed.proj.weight").transpose(2, 3, 1, 0),
        ("embedding", "bias"): g("patch_embed.proj.bias"),
        ("pos_embedding",): g("pos_embed")[:, 1:],
        ("cls",): g("cls_token") + g("pos_embed")[:, :1],
        ("Transformer", "encoder_norm", "scale"): g("norm.weight"),
        ("Transformer", "encoder_norm", "bias"): g("norm.bias"),
    }
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b, t = ("Transformer", f"encoderblock_{i}"), f"blocks.{i}."
        attn = (*b, "MultiHeadDotProductAttention_0")
        for tn, fn in [("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")]:
            p[(*b, fn, "scale")] = g(t + tn + ".weight")
            p[(*b, fn, "bias")] = g(t + tn + ".bias")
        w, bias = g(t + "attn.qkv.weight"), g(t + "attn.qkv.bias")
        for j, name in enumerate(["query", "key", "value"]):
            p[(*attn, name, "kernel")] = w[j * d : (j + 1) * d].T.reshape(d, heads, hd)
            p[(*attn, name, "bias")] = bias[j * d : (j + 1) * d].reshape(heads, hd)
        p[(*attn, "out", "kernel")] = g(t + "attn.proj.weight").T.reshape(heads, hd, d)
        p[(*attn, "out", "bias")] = g(t + "attn.proj.bias")
        for tn, fn in [("fc1", "Dense_0"), ("fc2", "Dense_1")]:
            p[(*b, "MlpBlock_0", fn, "kernel")] = g(t + "mlp." + tn + ".weight").T
            p[(*b, "MlpBlock_0", fn, "bias")] = g(t + "mlp." + tn + ".bias")
        i += 1
    return {"params": unflatten_dict(p)}


def test_vit_matches_timm_layout():
    torch.manual_seed(0)
    d, heads, hidden, depth = 64, 4, 128, 2
    ref_model = _TorchViT(d, depth, heads, hidden, num_patches=16).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = ref_model(x).detach().numpy()
    model = build_backbone(
        "vit_ti16", width=d, depth=depth, num_heads=heads, mlp_dim=hidden, approximate_gelu=False
    )
    variables = _timm_to_flax(ref_model.state_dict(), d, heads)
    xj = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), xj, train=False))
    assert jax.tree.structure(abstract) == jax.tree.structure(variables)
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, xj)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-5)
