"""Backbone train-step (forward + backward + SGD update) and forward timings; prints a table.

  python -m benchmarks.backbones                      # resnet18 small stem, 64 px, batch 32, conv paths
  python -m benchmarks.backbones --names resnet18,vit_ti16 --stem imagenet --conv_impl xla,cpu

Each row: one jitted step, compile excluded, median of --iters timed calls after --warmup calls.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from marnet_jax import cli
from marnet_jax.models.backbones import build_backbone


def _time(fn, args, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench(
    name: str, image_size: int, batch: int, dtype, warmup: int, iters: int, **kwargs
) -> tuple[float, float]:
    """Returns (train step seconds, eval forward seconds)."""
    model = build_backbone(name, dtype=dtype, **kwargs)
    x = jax.random.normal(jax.random.key(0), (batch, image_size, image_size, 3), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(1))
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    tx = optax.sgd(0.01, momentum=0.9)
    opt_state = tx.init(params)
    mutable = list(state) or False

    def loss_fn(p, s, x, key):
        out = model.apply({"params": p, **s}, x, train=True, mutable=mutable, rngs={"dropout": key})
        feat, new_s = out if mutable else (out, {})
        return jnp.mean(feat**2), new_s

    @jax.jit
    def train_step(p, s, o, x, key):
        (loss, new_s), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s, x, key)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), new_s, o, loss

    @jax.jit
    def forward(p, s, x):
        return model.apply({"params": p, **s}, x, train=False)

    key = jax.random.key(2)
    t_train = _time(train_step, (params, state, opt_state, x, key), warmup, iters)
    t_fwd = _time(forward, (params, state, x), warmup, iters)
    return t_train, t_fwd


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("names", "resnet18", "comma-separated backbone names", flag_values=fv)
    flags.DEFINE_integer("image_size", 64, "input size", flag_values=fv)
    flags.DEFINE_integer("batch", 32, "batch size", flag_values=fv)
    flags.DEFINE_string("stem", "small", "ResNet stem: small | imagenet", flag_values=fv)
    flags.DEFINE_string(
        "conv_impl", "xla,cpu", "ResNet conv_impl values to compare", flag_values=fv
    )
    flags.DEFINE_string("dtype", "float32", "compute dtype", flag_values=fv)
    flags.DEFINE_integer("warmup", 2, "untimed calls", flag_values=fv)
    flags.DEFINE_integer("iters", 5, "timed calls", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    a, rest = cli.parse_flags("benchmarks.backbones", _define_flags, argv, doc=__doc__)
    if rest:
        cli.usage_error("benchmarks.backbones", f"unexpected arguments {rest}")
    dtype = jnp.dtype(a.dtype)
    print(f"backend={jax.default_backend()} devices={jax.device_count()} dtype={a.dtype}")
    print(
        f"{'backbone':<10} {'size':>5} {'batch':>5} {'options':<24} {'train ms':>9} {'fwd ms':>8}"
    )
    for name in a.names.split(","):
        if name.startswith("resnet"):
            variants = [{"stem": a.stem, "conv_impl": v} for v in a.conv_impl.split(",")]
        else:
            variants = [{}]
        for kw in variants:
            t_train, t_fwd = bench(name, a.image_size, a.batch, dtype, a.warmup, a.iters, **kw)
            opts = ",".join(f"{k}={v}" for k, v in kw.items()) or "-"
            print(
                f"{name:<10} {a.image_size:>5} {a.batch:>5} {opts:<24} "
                f"{t_train * 1e3:>9.1f} {t_fwd * 1e3:>8.1f}"
            )


if __name__ == "__main__":
    cli.run(main)
