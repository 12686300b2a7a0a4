"""PyTorch reference networks in torchvision's (ResNet) and timm's (ViT) module layouts, for tests.

Their state_dict keys are the ones real checkpoints use (torchvision has no working build here, timm is
not a dependency), so exporting their random weights makes test files in each format. Import this module
only after `pytest.importorskip("torch")`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, c: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = None
        if stride != 1 or cin != c:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c)
            )

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, c: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)  # v1.5: stride on the 3x3
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, 4 * c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * c)
        self.downsample = None
        if stride != 1 or cin != 4 * c:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, 4 * c, 1, stride, bias=False), nn.BatchNorm2d(4 * c)
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


RESNETS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}


class ResNet(nn.Module):
    """torchvision.models.ResNet (v1.5) whose forward returns the pooled feature, before `fc`."""

    def __init__(self, name: str, width: int, num_classes: int = 10):
        super().__init__()
        block, sizes = RESNETS[name]
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for i, n in enumerate(sizes):
            blocks = []
            for b in range(n):
                stride = (1 if i == 0 else 2) if b == 0 else 1
                blocks.append(block(cin, width * 2**i, stride))
                cin = width * 2**i * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, num_classes)  # in the state dict, as in torchvision; not used

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.mean((2, 3))


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics (fresh ones are 1/0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, heads)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """timm VisionTransformer (class token, pre-norm blocks, final norm, exact GELU, patch 16);
    forward returns the class token's feature, before `head`."""

    def __init__(self, d: int, depth: int, heads: int, hidden: int, grid: int, num_classes=10):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, 16, 16)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, num_classes)  # in the state dict, as in timm; not used

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.norm(self.blocks(x))[:, 0]


def state_dict_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def timm_to_big_vision(sd: dict[str, np.ndarray], heads: int, old_layout: bool = False):
    """The same ViT weights under big_vision's .npz names (or, with old_layout, those of
    google-research/vision_transformer), written from timm's independently of the importer."""
    d = sd["norm.weight"].shape[0]
    hd = d // heads
    mha, ln2, mlp = (
        ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
        if old_layout
        else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    )
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    if old_layout:  # class position inside the position embedding
        out["cls"] = sd["cls_token"]
        out["Transformer/posembed_input/pos_embedding"] = sd["pos_embed"]
    else:
        out["cls"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        out["pos_embedding"] = sd["pos_embed"][:, 1:]
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        t, b = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        out[b + "LayerNorm_0/scale"] = sd[t + "norm1.weight"]
        out[b + "LayerNorm_0/bias"] = sd[t + "norm1.bias"]
        out[b + f"{ln2}/scale"] = sd[t + "norm2.weight"]
        out[b + f"{ln2}/bias"] = sd[t + "norm2.bias"]
        qkv_w, qkv_b = sd[t + "attn.qkv.weight"], sd[t + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            out[b + f"{mha}/{name}/kernel"] = qkv_w[j * d : (j + 1) * d].T.reshape(d, heads, hd)
            out[b + f"{mha}/{name}/bias"] = qkv_b[j * d : (j + 1) * d].reshape(heads, hd)
        out[b + f"{mha}/out/kernel"] = sd[t + "attn.proj.weight"].T.reshape(heads, hd, d)
        out[b + f"{mha}/out/bias"] = sd[t + "attn.proj.bias"]
        for r in range(2):
            out[b + f"{mlp}/Dense_{r}/kernel"] = sd[t + f"mlp.fc{r + 1}.weight"].T
            out[b + f"{mlp}/Dense_{r}/bias"] = sd[t + f"mlp.fc{r + 1}.bias"]
        i += 1
    return out


def to_nhwc(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))
