"""A config's ResNet convolutions one at a time, JAX against PyTorch eager (oneDNN); prints a table.

  python -m benchmarks.conv_layers                  # configs/default.py's backbone, its batch (64)
  python -m benchmarks.conv_layers --preset tiny    # configs/tiny.py, seconds (tests)

Shows how much of a train step the convolutions take in each framework, and which ones differ. The
convolutions are read from the config's backbone (every Conv2D it calls, with its input size,
channels, kernel and stride, counted). For each distinct one: the forward pass, the kernel gradient
and the input gradient (not for the stem, whose input needs none), as separate jitted JAX functions
computed the way the backbone computes them (its `conv_impl`), and the same three in torch (conv2d,
and autograd.grad for one input at a time), float32, on the same random data, NHWC in JAX and NCHW in torch as
each model holds its activations. All of them take turns (benchmarks._common.time_in_turns); medians are shown.
The last row sums each column over the network, each convolution times its count.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from benchmarks import _common
from marnet_jax import cli, reporting
from marnet_jax.data.config import train_image_size
from marnet_jax.models import resnet
from marnet_jax.models.backbones import build_backbone

PRESETS = {
    # config module, warm-up calls, rounds, timed calls per round
    "tiny": ("tiny", 1, 1, 1),
    "small": ("default", 2, 4, 5),
}
PARTS = ("fwd", "dk", "dx")


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """One convolution of the backbone: input [batch, size, size, cin] -> cout, k x k, stride."""

    size: int
    cin: int
    cout: int
    k: int
    stride: int
    stem: bool  # its input is the image: no input gradient

    def label(self) -> str:
        name = f"{self.size}x{self.size}x{self.cin}->{self.cout} k{self.k}/{self.stride}"
        return name + (" (stem)" if self.stem else "")


def backbone_convs(config: ml_collections.ConfigDict) -> collections.Counter[ConvLayer]:
    """Every Conv2D the config's backbone calls on one batch, counted."""
    kwargs = config.model.backbone_kwargs.to_dict()
    model = build_backbone(config.model.backbone, **kwargs)
    if not isinstance(model, resnet.ResNet):
        raise ValueError(f"model.backbone={config.model.backbone!r} is not a ResNet.")
    px = train_image_size(config.data)
    images = jnp.zeros((config.train.batch_size, px, px, 3))
    found: collections.Counter[ConvLayer] = collections.Counter()

    def record(next_fun, args, kw, context):
        m = context.module
        if isinstance(m, resnet.Conv2D) and context.method_name == "__call__":
            _, h, _, cin = args[0].shape
            stem = not found
            found[ConvLayer(h, cin, m.features, m.kernel_size, m.strides, stem)] += 1
        return next_fun(*args, **kw)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=True))
    return found


def layer_data(layer: ConvLayer, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """A random input [batch, size, size, cin] and kernel [k, k, cin, cout] (float32) for both."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, layer.size, layer.size, layer.cin), np.float32)
    w = rng.standard_normal((layer.k, layer.k, layer.cin, layer.cout), np.float32) * 0.1
    return x, w


def jax_fns(layer: ConvLayer, x: np.ndarray, w: np.ndarray, impl: str) -> dict[str, Callable]:
    """Blocking JAX forward, kernel-gradient and input-gradient calls (output gradient: ones)."""
    x, w = jnp.asarray(x), jnp.asarray(w)

    def conv(x, w):
        return resnet.conv2d(x, w, layer.stride, layer.k // 2, impl)

    g = jnp.ones(jax.eval_shape(conv, x, w).shape)
    fwd = jax.jit(conv)
    dk = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    fns = {
        "fwd": lambda: jax.block_until_ready(fwd(x, w)),
        "dk": lambda: jax.block_until_ready(dk(x, w, g)),
        "dx": lambda: jax.block_until_ready(dx(x, w, g)),
    }
    if layer.stem:
        del fns["dx"]
    return fns


def torch_fns(layer: ConvLayer, x: np.ndarray, w: np.ndarray) -> dict[str, Callable]:
    """The same three calls in torch eager, NCHW / OIHW (each returns when done: torch is eager)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    w = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))).requires_grad_()
    x.requires_grad_(not layer.stem)
    y = F.conv2d(x, w, stride=layer.stride, padding=layer.k // 2)
    g = torch.ones_like(y)

    def fwd():
        with torch.no_grad():
            return F.conv2d(x, w, stride=layer.stride, padding=layer.k // 2)

    fns = {
        "fwd": fwd,
        "dk": lambda: torch.autograd.grad(y, w, g, retain_graph=True)[0],
        "dx": lambda: torch.autograd.grad(y, x, g, retain_graph=True)[0],
    }
    if layer.stem:
        del fns["dx"]
    return fns


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def define(fv: flags.FlagValues) -> None:
        flags.DEFINE_integer("torch_threads", 0, "0: torch's default", flag_values=fv)

    args = _common.parse_args("conv_layers", __doc__, argv, PRESETS, "small", define)
    _common.setup_jax(args)
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    module, warmup, rounds, per_round = PRESETS[args.preset]
    config = importlib.import_module(f"configs.{module}").get_config()
    impl = config.model.backbone_kwargs.get("conv_impl", "auto")
    batch = config.train.batch_size
    load_before = reporting.load_average()
    rows = []
    for layer, count in backbone_convs(config).items():
        x, w = layer_data(layer, batch)
        fns = {f"jax {k}": f for k, f in jax_fns(layer, x, w, impl).items()}
        fns |= {f"torch {k}": f for k, f in torch_fns(layer, x, w).items()}
        timings, _ = _common.time_in_turns(list(fns.values()), warmup, rounds, per_round, 0.05)
        ms = {name: t.median_s * 1e3 for name, t in zip(fns, timings, strict=True)}
        rows.append(dataclasses.asdict(layer) | dict(count=count, batch=batch, ms=ms))
    info = reporting.machine()
    info["load_average_before"] = load_before
    info["torch_threads"] = torch.get_num_threads()

    columns = [f"{fw} {part}" for fw in ("jax", "torch") for part in PARTS]
    totals = {c: sum(r["count"] * r["ms"].get(c, 0.0) for r in rows) for c in columns}
    table = []
    for r in rows:
        layer = ConvLayer(**{f.name: r[f.name] for f in dataclasses.fields(ConvLayer)})
        table.append([layer.label(), r["count"], *(reporting.fmt(r["ms"].get(c)) for c in columns)])
        table[-1].append(_ratio(r["ms"]))
    table.append(["**per step (x count)**", sum(r["count"] for r in rows)])
    table[-1] += [reporting.fmt(totals[c]) for c in columns] + [_ratio(totals)]
    print(
        f"\nconfigs/{module}.py backbone convolutions (conv_impl={impl!r}), batch {batch}, ms, "
        f"on {reporting.machine_line(info, load=True)}, torch {torch.__version__} ({info['torch_threads']} threads)"
    )
    headers = ["conv (input -> cout, k/stride)", "count", *(f"{c} ms" for c in columns)]
    print(reporting.markdown_table([*headers, "jax / torch (sum)"], table))
    out = dict(
        benchmark="conv_layers",
        preset=args.preset,
        config=f"configs/{module}.py",
        conv_impl=impl,
        machine=info,
        torch=torch.__version__,
        rows=rows,
        per_step_ms={c: round(v, 3) for c, v in totals.items()},
    )
    return _common.save(args.json, out)


def _ratio(ms: dict[str, float]) -> str:
    """JAX's time over torch's for the parts both ran."""
    parts = [p for p in PARTS if f"jax {p}" in ms and f"torch {p}" in ms]
    jax_ms = sum(ms[f"jax {p}"] for p in parts)
    torch_ms = sum(ms[f"torch {p}"] for p in parts)
    return f"{jax_ms / torch_ms:.2f}x" if torch_ms else "-"


if __name__ == "__main__":
    cli.run(main)
