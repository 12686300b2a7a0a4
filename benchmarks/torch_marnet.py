"""The default config's MARNet written in plain PyTorch (eager), timed like the JAX step; side by side.

  python -m benchmarks.torch_marnet                   # configs/default.py:VARIANT,joint for full and
                                                      # baseline, both frameworks
  python -m benchmarks.torch_marnet --frameworks torch
  python -m benchmarks.torch_marnet --preset tiny     # configs/tiny.py, seconds (tests)

The torch model is the same network as the config builds in JAX, read from the same config file:
the small-stem ResNet-10 or -18 (its width and stem stride), the ingredient MLP encoder, the EMA
projection heads with the symmetric class-aware InfoNCE, the CDR denoiser (FiLM residual MLP) with the
one-step v-prediction MSE, the DDIM reverse chain that the fused classifier and the CDR head train on
(gradients through all its passes or the last one; or the CDR head on the straight-through s0_hat),
LayerNorm + Linear heads, the visual probe on
detached features, AdamW with decay on matrices only and global-norm clipping. Same batch, image size
and float32. A config option this file does not implement is a clear error, not a silent difference.
Timing is the same for both frameworks: single, waited-for steps after warm-up on one fixed synthetic
batch. The frameworks take turns: in each round every one runs a few steps (the order rotates from
round to round), so a machine whose speed drifts during the run slows all of them alike. Reported: the
median and interquartile range of all timed steps, and the speed relative to torch as the median over
rounds of torch's round median over the row's round median (with its range over rounds). The JAX
steps are built and compiled by benchmarks.train_step.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags

from benchmarks import _common
from marnet_jax import cli, reporting
from marnet_jax.data import datasets
from marnet_jax.models import diffusion

PRESETS = {
    # config module, variants, warm-up steps, rounds, timed steps per round
    "tiny": ("tiny", ("full", "baseline"), 1, 2, 1),
    "small": ("default", ("full", "baseline"), 3, 8, 3),
}

# What this torch port implements; anything else in the config is refused.
_SUPPORTED = {
    "model.backbone_kwargs.stem": "small",
    "model.text_encoder": "mlp",
    "model.fusion": "concat",
    "model.cdr.schedule": "cosine",
    "model.cdr.prediction": "v",
    "model.cdr.sampler": "ddim",
    "model.cdr.eta": 0.0,
    "model.cdr.num_samples": 1,
    "model.cdr.clip_mode": "none",
    "model.cdr_wiring.target_grad": "straight_through",
    "model.cdr_wiring.train_estimate": "chain",
    "model.cdr_wiring.condition_on": "x_v",
    "model.cdr_wiring.chain_start": "noise",
    "model.cdr.conditioning": "film",
    "model.cdr.dropout": 0.0,
    "model.ema.learnable_temperature": True,
    "loss.ema_form": "infonce",
    "loss.label_smoothing": 0.0,
    "optim.name": "adamw",
    "optim.grad_accum_steps": 1,
    "optim.backbone_lr_mult": 1.0,
    "model.fusion_dropout": 0.0,
    "model.use_text_head": False,  # the joint protocol: no text teacher, the text side trains
    "model.freeze_text": False,
    "model.align_moves": "both",
    "model.classifier_input": "x_ema",
}


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = value[part] if part in value else None
        if value is None:
            return None
    return value


# Fields where the port implements several values.
_SUPPORTED_ANY = {
    "model.backbone": ("resnet10", "resnet18"),
    "model.cdr_wiring.chain_grad": ("all", "last_step"),
    "model.cdr_wiring.head_input": ("chain", "one_step"),
    "model.use_aux": (False,),
}
_STAGES = {"resnet10": 1, "resnet18": 2}  # basic blocks per stage


def check_supported(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming every config field whose value the torch port does not implement."""
    bad = [
        f"config.{k}={_get(config, k)!r} (torch port implements {v!r})"
        for k, v in _SUPPORTED.items()
        if _get(config, k) != v
    ]
    bad += [
        f"config.{k}={_get(config, k)!r} (torch port implements one of {v!r})"
        for k, v in _SUPPORTED_ANY.items()
        if _get(config, k) not in v
    ]
    if config.model.cdr.sampler == "ddim" and config.model.cdr.sample_steps < 1:
        bad.append(f"config.model.cdr.sample_steps={config.model.cdr.sample_steps} (need >= 1)")
    if bad:
        raise ValueError("benchmarks.torch_marnet cannot mirror: " + "; ".join(bad))


def build_torch_model(config: ml_collections.ConfigDict, num_classes: int, num_ingredients: int):
    """(model, optimizer, lr scheduler) in torch for `config` (see the module docstring)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    m = config.model
    ln = lambda d: nn.LayerNorm(d, eps=1e-6)  # flax LayerNorm's epsilon

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return F.relu((x if self.down is None else self.down(x)) + y)

    class ResNet(nn.Module):
        def __init__(self, blocks: int, width: float, stem_stride: int):
            super().__init__()
            w = max(1, round(64 * width))
            self.stem = nn.Sequential(
                nn.Conv2d(3, w, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
            )
            layers, cin = [], w
            for i in range(4):
                cout = w * 2**i
                layers.append(BasicBlock(cin, cout, 1 if i == 0 else 2))
                layers += [BasicBlock(cout, cout, 1) for _ in range(blocks - 1)]
                cin = cout
            self.layers = nn.Sequential(*layers)
            self.feature_dim = cin

        def forward(self, x):
            return self.layers(self.stem(x)).mean(dim=(2, 3))

    class IngredientMLP(nn.Module):
        def __init__(self, vocab: int, features=512, hidden_dim=512, num_layers=2, dropout=0.1):
            super().__init__()
            mods, d = [], vocab
            for _ in range(num_layers):
                mods += [nn.Linear(d, hidden_dim), ln(hidden_dim), nn.GELU(), nn.Dropout(dropout)]
                d = hidden_dim
            mods.append(nn.Linear(d, features))
            self.net = nn.Sequential(*mods)
            self.feature_dim = features

        def forward(self, x):
            return self.net(x)

    def projection(din: int) -> nn.Module:
        e = m.ema
        mods, d = [], din
        for _ in range(e.num_layers - 1):  # flax nn.gelu defaults to the tanh form
            mods += [nn.Linear(d, e.hidden_dim), ln(e.hidden_dim), nn.GELU("tanh")]
            d = e.hidden_dim
        mods.append(nn.Linear(d, m.embed_dim))
        return nn.Sequential(*mods)

    class DenoiserBlock(nn.Module):
        def __init__(self, h: int, ratio: int):
            super().__init__()
            self.norm, self.film = ln(h), nn.Linear(h, 2 * h)
            self.fc1, self.fc2 = nn.Linear(h, h * ratio), nn.Linear(h * ratio, h)

        def forward(self, h, emb):
            scale, shift = self.film(F.silu(emb)).chunk(2, dim=-1)
            y = self.norm(h) * (1.0 + scale) + shift
            return h + self.fc2(F.silu(self.fc1(y)))

    class Denoiser(nn.Module):
        def __init__(self, dim: int, cond_dim: int):
            super().__init__()
            c = m.cdr
            h = c.hidden_dim
            self.temb_dim = c.time_embed_dim
            self.time_fc1, self.time_fc2 = nn.Linear(c.time_embed_dim, h), nn.Linear(h, h)
            self.cond_norm = ln(cond_dim)
            self.cond_fc1, self.cond_fc2 = nn.Linear(cond_dim, h), nn.Linear(h, h)
            self.in_proj = nn.Linear(dim, h)
            self.blocks = nn.ModuleList(
                [DenoiserBlock(h, c.mlp_ratio) for _ in range(c.num_blocks)]
            )
            self.out_norm, self.out_proj = ln(h), nn.Linear(h, dim)

        def timestep_embedding(self, t):
            half = self.temb_dim // 2
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / max(half, 1))
            args = t.float()[:, None] * freqs[None, :]
            emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
            return F.pad(emb, (0, self.temb_dim % 2))

        def forward(self, x, t, cond):
            temb = self.time_fc2(F.silu(self.time_fc1(self.timestep_embedding(t))))
            emb = temb + self.cond_fc2(F.silu(self.cond_fc1(self.cond_norm(cond))))
            h = self.in_proj(x)
            for block in self.blocks:
                h = block(h, emb)
            return self.out_proj(self.out_norm(h))

    def l2n(x):
        return x * torch.rsqrt(torch.clamp((x * x).sum(-1, keepdim=True), min=1e-12))

    class MARNet(nn.Module):
        def __init__(self):
            super().__init__()
            kw = m.backbone_kwargs
            self.backbone = ResNet(
                _STAGES[m.backbone], kw.get("width", 1.0), kw.get("stem_stride", 1)
            )
            d_v = self.backbone.feature_dim
            self.use_ema, self.use_cdr = m.use_ema, m.use_cdr
            if self.use_ema or self.use_cdr:
                self.text = IngredientMLP(num_ingredients, **m.text_kwargs.to_dict())
                self.g_s = projection(self.text.feature_dim)
            if self.use_ema:
                self.g_v = projection(d_v)
                self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / m.ema.temperature)))
            d_vis = m.embed_dim if self.use_ema else d_v
            self.fused_norms = nn.ModuleList([ln(d_vis)] + ([ln(m.embed_dim)] if m.use_cdr else []))
            self.fused = nn.Linear(d_vis + (m.embed_dim if m.use_cdr else 0), num_classes)
            self.visual_norm, self.visual = ln(d_vis), nn.Linear(d_vis, num_classes)
            if self.use_cdr:
                self.denoiser = Denoiser(m.embed_dim, d_v)
                self.cdr_norm, self.cdr_head = ln(m.embed_dim), nn.Linear(m.embed_dim, num_classes)
                betas = diffusion.make_betas("cosine", m.cdr.num_steps, cosine_s=m.cdr.cosine_s)
                ac = np.cumprod(1.0 - betas)
                self.register_buffer("sa", torch.tensor(np.sqrt(ac), dtype=torch.float32))
                self.register_buffer("s1a", torch.tensor(np.sqrt(1 - ac), dtype=torch.float32))
                ts = diffusion.ddim_timesteps(m.cdr.num_steps, m.cdr.sample_steps)
                prev = np.append(ts[1:], -1)
                a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], 1.0)
                self.chain = [
                    (int(t), float(np.sqrt(ac[t])), float(np.sqrt(1 - ac[t])), float(ap))
                    for t, ap in zip(ts, a_prev)
                ]

        def ddim_chain(self, cond):
            x = torch.randn(cond.shape[0], m.embed_dim)
            last_only = m.cdr_wiring.chain_grad == "last_step"
            for i, (t, sa, s1a, ap) in enumerate(self.chain):
                tb = torch.full((cond.shape[0],), t, dtype=torch.long)
                with torch.set_grad_enabled(not last_only or i == len(self.chain) - 1):
                    out = self.denoiser(x, tb, cond)
                    x0, eps = sa * x - s1a * out, s1a * x + sa * out
                    x = math.sqrt(ap) * x0 + math.sqrt(max(1.0 - ap, 0.0)) * eps
            return x

        def forward(self, images, ingredients, labels):
            """Total loss and the fused logits."""
            x_v = self.backbone(images)
            parts = {}
            visual = x_v
            if self.use_ema or self.use_cdr:
                g_s = self.g_s(self.text(ingredients))
            if self.use_ema:
                visual = self.g_v(x_v)
                scale = torch.exp(torch.clamp(self.log_scale, max=math.log(m.ema.max_logit_scale)))
                logits = scale * l2n(visual) @ l2n(g_s).T
                pos = torch.eye(len(labels))
                if config.loss.ema_class_aware:
                    pos = torch.maximum(pos, (labels[:, None] == labels[None, :]).float())
                v2s = -(pos * F.log_softmax(logits, -1)).sum(-1) / pos.sum(-1)
                s2v = -(pos.T * F.log_softmax(logits.T, -1)).sum(-1) / pos.T.sum(-1)
                parts["ema"] = 0.5 * (v2s.mean() + s2v.mean())
            feats = [visual]
            if self.use_cdr:
                s0 = math.sqrt(m.embed_dim) * l2n(g_s)
                x0 = s0.detach()
                t = torch.randint(0, m.cdr.num_steps, (len(labels),))
                noise = torch.randn_like(x0)
                sa, s1a = self.sa[t][:, None], self.s1a[t][:, None]
                x_t = sa * x0 + s1a * noise
                out = self.denoiser(x_t, t, x_v)
                parts["mse"] = F.mse_loss(out, sa * noise - s1a * x0)
                s0_hat = sa * x_t - s1a * out + (s0 - x0)  # straight-through into s0
                x_cdr = self.ddim_chain(x_v)
                head_in = x_cdr if m.cdr_wiring.head_input == "chain" else s0_hat
                parts["ce_cdr"] = F.cross_entropy(self.cdr_head(self.cdr_norm(head_in)), labels)
                feats.append(x_cdr)
            normed = [norm(f) for norm, f in zip(self.fused_norms, feats)]
            fused = self.fused(torch.cat(normed, dim=-1))
            parts["ce"] = F.cross_entropy(fused, labels)
            probe = self.visual(self.visual_norm(visual.detach()))
            parts["ce_visual"] = F.cross_entropy(probe, labels)
            loss_cfg = config.loss
            weights = {
                "ce": 1.0,
                "ema": loss_cfg.w_ema,
                "mse": loss_cfg.w_mse,
                "ce_cdr": loss_cfg.w_cdr,
                "ce_visual": loss_cfg.w_visual,
            }
            return sum(weights[k] * v for k, v in parts.items()), fused

    model = MARNet()
    o = config.optim
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=o.lr,
        betas=(o.b1, o.b2),
        eps=1e-8,
    )
    total, warm = max(config.train.num_steps, 1), min(o.warmup_steps, config.train.num_steps - 1)

    def lr_factor(step: int) -> float:
        if step < warm:
            return step / max(warm, 1)
        frac = min((step - warm) / max(total - warm, 1), 1.0)
        cos = 0.5 * (1 + math.cos(math.pi * frac))
        return o.final_lr_fraction + (1 - o.final_lr_fraction) * cos

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    return model, opt, sched


def torch_step_fn(config: ml_collections.ConfigDict, num_classes: int, num_ingredients: int):
    """A function running one torch train step on a fixed synthetic batch; and the model."""
    import torch

    check_supported(config)
    model, opt, sched = build_torch_model(config, num_classes, num_ingredients)
    model.train()
    host = _common.synthetic_batch(
        config.train.batch_size, config.data.image_size, num_classes, num_ingredients
    )
    images = torch.from_numpy(np.ascontiguousarray(host["image"].transpose(0, 3, 1, 2)))
    ingredients = torch.from_numpy(host["ingredients"])
    labels = torch.from_numpy(host["label"].astype(np.int64))
    params = list(model.parameters())
    clip = config.optim.grad_clip_norm

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss, logits = model(images, ingredients, labels)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            (logits.argmax(-1) == labels).float().mean()

    return step, model


def _race(
    contenders: list[tuple[dict[str, Any], Callable[[], None]]],
    warmup: int,
    rounds: int,
    per_round: int,
) -> list[dict[str, Any]]:
    """Times the contenders' steps in turns; returns their rows with timings and speed vs torch."""
    timings, round_medians = _common.time_in_turns(
        [step for _, step in contenders], warmup, rounds, per_round
    )
    torch_i = next(
        (i for i, (row, _) in enumerate(contenders) if row["framework"].startswith("torch")), None
    )
    rows = []
    for i, ((row, _), t) in enumerate(zip(contenders, timings, strict=True)):
        row = row | dict(
            step=t.as_dict(), images_per_s=round(row["batch"] / t.median_s, 1), rounds=rounds
        )
        if torch_i is not None:
            ratios = round_medians[:, torch_i] / round_medians[:, i]
            row["speed_vs_torch"] = dict(
                median=round(float(np.median(ratios)), 3),
                min=round(float(ratios.min()), 3),
                max=round(float(ratios.max()), 3),
            )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def define(fv: flags.FlagValues) -> None:
        flags.DEFINE_string("frameworks", "torch,jax", "torch and/or jax", flag_values=fv)
        flags.DEFINE_integer("devices", -1, "JAX devices to use (-1: all)", flag_values=fv)
        flags.DEFINE_string(
            "variants", "", "comma-separated subset of full,baseline", flag_values=fv
        )
        flags.DEFINE_integer(
            "torch_threads",
            0,
            "torch intra-op threads (0: torch's default, one per core). On a loaded machine "
            "torch's OpenMP threads slow down far more than XLA's thread pool: compare idle.",
            flag_values=fv,
        )
        flags.DEFINE_string(
            "jax_conv_impls",
            "auto,xla",
            "ResNet conv_impl values of the JAX rows ('auto' is what the config trains with; "
            "'xla' is XLA's own conv gradients)",
            flag_values=fv,
        )

    args = _common.parse_args("torch_marnet", __doc__, argv, PRESETS, "small", define)
    _common.setup_jax(args)
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    module, variants, warmup, rounds, per_round = PRESETS[args.preset]
    frameworks = args.frameworks.split(",")
    if args.variants:
        variants = tuple(v for v in variants if v in args.variants.split(","))
    load_before = reporting.load_average()
    rows = []
    for variant in variants:
        config = importlib.import_module(f"configs.{module}").get_config(f"{variant},joint")
        facts = datasets.shape_facts(config.data)
        b, px = config.train.batch_size, config.data.image_size
        base = dict(variant=variant, batch=b, image_size=px, dtype="float32")
        contenders = []  # (row without timings, one waited-for step)
        if "torch" in frameworks:
            torch.manual_seed(0)
            step, model = torch_step_fn(config, facts.num_classes, facts.num_ingredients)
            framework = f"torch {torch.__version__} eager ({torch.get_num_threads()} threads)"
            n_params = sum(p.numel() for p in model.parameters())
            contenders.append((base | dict(framework=framework, params=n_params), step))
        if "jax" in frameworks:
            from benchmarks import train_step

            for impl in args.jax_conv_impls.split(","):
                kwargs = () if impl == "auto" else (("conv_impl", impl),)
                case = train_step.Case(
                    f"{module} {variant}", module, variant, b, backbone_kwargs=kwargs
                )
                c = train_step.compile_case(case, args.devices, flops=False)
                framework = f"jax {jax.__version__} jit" + (
                    "" if impl == "auto" else f" (conv_impl={impl})"
                )
                compile_s = round(c.lower_s + c.compile_s, 2)
                contenders.append(
                    (
                        base | dict(framework=framework, compile_s=compile_s),
                        functools.partial(c.run, 1),
                    )
                )
        rows += _race(contenders, warmup, rounds, per_round)
        for r in rows[-len(contenders) :]:
            print(f"{r['framework']} {variant}: {r['step']['median_s'] * 1e3:.0f} ms", flush=True)
    info = reporting.machine()
    info["load_average_before"] = load_before
    info["torch_threads"] = torch.get_num_threads()
    print(
        f"\nconfigs/{module}.py, {args.preset} preset on {reporting.machine_line(info, load=True)}"
    )
    table = []
    for r in rows:
        s = r["step"]
        vs = r.get("speed_vs_torch")
        ratio = "-" if vs is None else f"{vs['median']:.2f}x ({vs['min']:.2f}-{vs['max']:.2f})"
        table.append(
            [
                r["variant"],
                r["framework"],
                r["batch"],
                r["image_size"],
                reporting.fmt(s["median_s"] * 1e3),
                f"{s['p25_s'] * 1e3:.0f}-{s['p75_s'] * 1e3:.0f}",
                reporting.fmt(s["cpu_s"], 2),
                reporting.fmt(r["images_per_s"]),
                ratio,
            ]
        )
    headers = ["variant", "framework", "batch", "px", "step ms (median)", "IQR ms"]
    headers += ["CPU s/step", "images/s", "speed vs torch (range over rounds)"]
    print(reporting.markdown_table(headers, table))
    out = dict(
        benchmark="torch_marnet",
        preset=args.preset,
        config=f"configs/{module}.py",
        machine=info,
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        rows=rows,
    )
    return _common.save(args.json, out)


if __name__ == "__main__":
    cli.run(main)
