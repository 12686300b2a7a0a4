"""MARNet: backbone + ingredient encoder, EMA alignment, CDR diffusion reconstruction, fusion.

One code path gives the four variants of the ablation:
  baseline (use_ema=False, use_cdr=False): classifier on x_v; the text is never read.
  +EMA     (use_ema=True,  use_cdr=False): classifier on x_EMA = g_v(x_v), aligned to g_s(x_s).
  +CDR     (use_ema=False, use_cdr=True):  classifier on [x_v, x_CDR]; s0 = g_s(x_s) is trained
           only through the CE on s0_hat (cdr_target_grad='straight_through'): no alignment loss.
  full     (use_ema=True,  use_cdr=True):  classifier on [x_EMA, x_CDR].
Every classifier is LayerNorm + Dense on its inputs (the same for all variants), so the variants
differ only in what they read.

CDR in training: the MSE uses the one-step estimate s0_hat (noise s0 at a random t, denoise once).
What the classifiers read as x_CDR in training is chosen per head: `cdr_train_estimate` for the fused
classifier, `cdr_head_input` for the CDR head. 'chain' (default) runs the same image-only reverse
chain as `predict`, so the head is trained on exactly what it sees at test; 'one_step' feeds it
s0_hat, which at small t is nearly the text embedding itself, so the head learns to trust a branch
that is much weaker at test (docs/method.md has the numbers).

The `aux` reference (use_aux, with EMA and CDR off) is the simplest use of the same privileged text:
a multi-label ingredient head on x_v, trained with BCE and never read at test.

The text teacher (use_text_head): a classifier on g_s(f_s(ingredients)), trained alone before the
joint stage (marnet_jax/train/teacher.py). The `distill` reference (use_distill, with EMA and CDR
off) trains the visual-only model towards the teacher's softened class probabilities (generalized
distillation, Lopez-Paz et al. 2016); MARNet under the 'teacher' protocol aligns to the teacher's
fixed embedding instead (align_moves='image').
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from marnet_jax.models import word_vectors
from marnet_jax.models.alignment import EMAHeads, l2_normalize
from marnet_jax.models.backbones import build_backbone
from marnet_jax.models.diffusion import CDR, CHAIN_GRADS, TARGET_GRADS
from marnet_jax.models.text import build_text_encoder

Array = jax.Array
FUSIONS = ("concat", "sum", "gated")
CLASSIFIER_INPUTS = ("x_ema", "x_v")
ALIGN_MOVES = ("both", "image")


class ClassifierHead(nn.Module):
    """Fusion + linear classifier in float32: LayerNorm on each input, then combine, then Dense.

    One input: LN -> Dense. Two inputs: 'concat' concatenates them; 'sum' adds them (a shared
    classifier over both); 'gated' mixes them with an elementwise sigmoid gate computed from both.
    'sum' and 'gated' need the same width: when the first input is wider or narrower (x_v with EMA
    off), a learned Dense maps it to the width of the second.
    """

    num_classes: int
    fusion: str = "concat"
    dropout: float = 0.0

    @nn.compact
    def __call__(self, feats: Sequence[Array], train: bool) -> Array:
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; expected one of {FUSIONS}")
        chex.assert_rank(list(feats), 2)
        xs = [nn.LayerNorm(name=f"norm_{i}")(f.astype(jnp.float32)) for i, f in enumerate(feats)]
        if len(xs) == 1:
            h = xs[0]
        elif len(xs) == 2 and self.fusion == "concat":
            h = jnp.concatenate(xs, axis=-1)
        elif len(xs) == 2:
            a, b = xs
            if a.shape[-1] != b.shape[-1]:
                a = nn.Dense(b.shape[-1], name="proj_0")(a)
            if self.fusion == "sum":
                h = a + b
            else:
                gate = nn.sigmoid(nn.Dense(b.shape[-1], name="gate")(jnp.concatenate([a, b], -1)))
                h = gate * a + (1.0 - gate) * b
        else:
            raise ValueError(f"ClassifierHead takes 1 or 2 inputs, got {len(xs)}")
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        return nn.Dense(self.num_classes, name="classifier")(h)


class MARNet(nn.Module):
    """The MARNet classifier. Parameter collections: 'backbone', 'text_encoder', 'ema', 'cdr',
    'fused_head', 'visual_head', 'cdr_head' (only the ones a variant uses get parameters).

    Attributes:
      backbone: any module mapping images [B, H, W, 3] -> [B, D] with `__call__(x, train)`.
      text_encoder: any module mapping multi-hot ingredients [B, V] -> [B, D_s] with
        `__call__(x, train)`; may be None for the baseline.
      ema: projection heads g_v, g_s and the temperature (CDR uses g_s even with use_ema False).
      cdr: the diffusion module; may be None when use_cdr is False. cdr.dim == ema.embed_dim.
      use_ema, use_cdr: the variant (both off: the visual-only baseline).
      use_aux: add the ingredient head on x_v (training only; 'aux_logits', 'aux_targets').
      use_text_head: add the text teacher's classifier on g_s(x_s) ('text_head'; `text_logits`);
        trained by the teacher stage, and in the joint stage by loss.w_text.
      use_distill: the visual-only model distilled from the text head ('teacher_logits', gradient
        stopped); needs use_text_head.
      classifier_input: what the fused classifier (and the probe) reads on the visual side with
        EMA on: 'x_ema' (g_v(x_v), the paper's x_EMA) or 'x_v' (EMA is then a projection head
        whose loss shapes x_v through g_v, as in SimCLR, and the classifier never reads g_v).
      freeze_text: the text side (ingredient encoder, g_s, text head) is a fixed teacher: it runs
        in inference mode (no dropout) and its outputs carry no gradient; the optimizer leaves
        its parameters as they are, weight decay included (train/optim.py).
      align_moves: 'both' (the alignment targets g_s(x_s) carry gradients into the text side) or
        'image' (EMA's and CDR's targets are stop-gradient: only the image side moves towards
        the text, as the lab's ATNet detaches its text features).
      align_fraction: EMA aligns the first round(align_fraction * E) dimensions of g_v and g_s
        only (ATNet aligns 3/8 of its latent); the rest of x_EMA is free for the classifier.
      fusion: 'concat' | 'sum' | 'gated' of x_EMA (x_v with EMA off) and x_CDR; fusion_dropout
        before the fused classifier.
      cdr_target_grad: gradient into s0 in the CDR training path: 'stop' | 'straight_through'
        (the CE on s0_hat reaches the text side, the MSE never does: no collapse, and +CDR
        without EMA still trains g_s) | 'none' (s0 may collapse); see CDR.estimate.
      cdr_condition_on: the denoiser's condition: 'x_v' (backbone feature) or 'x_ema' (needs
        use_ema).
      cdr_chain_start: where the image-only chain starts: 'noise' (N(0, I)) or 'visual' (x_EMA
        put on the target sphere and noised to step T-1; needs use_ema).
      cdr_train_estimate: x_CDR read by the fused classifier in training: 'chain' (the test-time
        reverse chain: it trains on what it sees at test) or 'one_step' (s0_hat).
      cdr_head_input: x_CDR read by the CDR head in training: 'chain' or 'one_step' (the paper's
        literal form: the CE on s0_hat, which also trains the text side through target_grad).
      cdr_chain_grad: with 'chain', how the CEs back-propagate through the chain (into the
        denoiser and the image side): 'all' of its passes, its 'last_step' only (one pass's
        backward, but the CDR head then carries much less of the class: docs/method.md), or
        'none' (a constant).
    """

    backbone: nn.Module
    text_encoder: nn.Module | None
    ema: EMAHeads
    cdr: CDR | None
    num_classes: int
    num_ingredients: int | None = None
    use_ema: bool = True
    use_cdr: bool = True
    use_aux: bool = False
    use_text_head: bool = False
    use_distill: bool = False
    freeze_text: bool = False
    classifier_input: str = "x_ema"
    align_moves: str = "both"
    align_fraction: float = 1.0
    fusion: str = "concat"
    fusion_dropout: float = 0.0
    cdr_target_grad: str = "straight_through"
    cdr_condition_on: str = "x_v"
    cdr_chain_start: str = "noise"
    cdr_train_estimate: str = "chain"
    cdr_head_input: str = "chain"
    cdr_chain_grad: str = "all"

    def setup(self) -> None:
        if self.use_cdr:
            if self.cdr is None:
                raise ValueError("use_cdr=True needs a CDR module")
            if self.cdr.dim != self.ema.embed_dim:
                raise ValueError(f"cdr.dim={self.cdr.dim} != ema.embed_dim={self.ema.embed_dim}")
            if not self.use_ema and (
                self.cdr_condition_on == "x_ema" or self.cdr_chain_start == "visual"
            ):
                raise ValueError(
                    "cdr_condition_on='x_ema' and cdr_chain_start='visual' need use_ema=True"
                )
        if self.reads_text and self.text_encoder is None:
            raise ValueError("EMA, CDR, the text head and distillation need a text encoder")
        if self.use_distill and not self.use_text_head:
            raise ValueError("use_distill=True needs use_text_head=True (the teacher)")
        if not 0.0 < self.align_fraction <= 1.0:
            raise ValueError(f"MARNet.align_fraction={self.align_fraction!r}; expected (0, 1]")
        for name, value, allowed in (
            ("cdr_condition_on", self.cdr_condition_on, ("x_v", "x_ema")),
            ("cdr_chain_start", self.cdr_chain_start, ("noise", "visual")),
            ("cdr_target_grad", self.cdr_target_grad, TARGET_GRADS),
            ("cdr_train_estimate", self.cdr_train_estimate, ("chain", "one_step")),
            ("cdr_head_input", self.cdr_head_input, ("chain", "one_step")),
            ("cdr_chain_grad", self.cdr_chain_grad, CHAIN_GRADS),
            ("classifier_input", self.classifier_input, CLASSIFIER_INPUTS),
            ("align_moves", self.align_moves, ALIGN_MOVES),
        ):
            if value not in allowed:
                raise ValueError(f"MARNet.{name}={value!r}; expected one of {allowed}")
        self.fused_head = ClassifierHead(self.num_classes, self.fusion, self.fusion_dropout)
        self.visual_head = ClassifierHead(self.num_classes)
        if self.use_cdr:
            self.cdr_head = ClassifierHead(self.num_classes)
        if self.use_aux:
            if self.num_ingredients is None:
                raise ValueError("use_aux=True needs num_ingredients (the ingredient head's size)")
            self.aux_head = ClassifierHead(self.num_ingredients)
        if self.use_text_head:
            self.text_head = ClassifierHead(self.num_classes)

    @property
    def reads_text(self) -> bool:
        """Whether training reads the ingredients through the text encoder."""
        return self.use_ema or self.use_cdr or self.use_text_head or self.use_distill

    def _semantic(self, ingredients: Array, train: bool) -> Array:
        """g_s(f_s(ingredients)), float32 [B, E]."""
        x_s = self.text_encoder(ingredients, train=train)
        chex.assert_rank(x_s, 2)
        return self.ema.project_semantic(x_s)

    def text_logits(self, ingredients: Array, train: bool = False) -> Array:
        """The text teacher: class logits [B, C] from the ingredients alone (the teacher stage
        trains this path: text encoder, g_s and the text head)."""
        chex.assert_rank(ingredients, 2)
        g_s = self._semantic(ingredients.astype(jnp.float32), train)
        return self.text_head([g_s], train)

    def visual_features(self, images: Array, train: bool = False) -> dict[str, Array]:
        """The image side: 'x_v' [B, D] and, with EMA, 'x_ema' = g_v(x_v) [B, E]; float32."""
        chex.assert_rank(images, 4)
        x_v = self.backbone(images, train=train)
        chex.assert_rank(x_v, 2)
        chex.assert_axis_dimension(x_v, 0, images.shape[0])
        out = {"x_v": x_v.astype(jnp.float32)}
        if self.use_ema:
            out["x_ema"] = self.ema.project_visual(x_v)
        return out

    def cdr_chain(self, out: dict[str, Array], grad: str = "all") -> Array:
        """x_CDR [B, E] from the configured reverse chain, conditioned on the image only (`out` as
        visual_features gives it; keyed by the 'diffusion' rng)."""
        cond = out["x_v"] if self.cdr_condition_on == "x_v" else out["x_ema"]
        x_init = None
        if self.cdr_chain_start == "visual":
            x_init = self.cdr.semantic_target(out["x_ema"])
        return self.cdr.sample(cond, x_init=x_init, grad=grad)

    def classify(
        self,
        out: dict[str, Array],
        x_cdr: Array | None,
        train: bool = False,
        cdr_head_input: Array | None = None,
    ) -> dict[str, Array]:
        """`out` (visual_features) with the heads' logits added: 'logits' (the fused classifier on
        the visual side and x_cdr), 'visual_logits' (the probe) and, given x_cdr, 'cdr_logits' (on
        cdr_head_input, default x_cdr)."""
        visual = out["x_ema"] if self.use_ema and self.classifier_input == "x_ema" else out["x_v"]
        feats = [visual] if x_cdr is None else [visual, x_cdr]
        out["logits"] = self.fused_head(feats, train)
        # The probe reads what the fused classifier reads on the visual side, gradient stopped.
        out["visual_logits"] = self.visual_head([jax.lax.stop_gradient(visual)], train)
        if x_cdr is not None:
            head_in = x_cdr if cdr_head_input is None else cdr_head_input
            out["cdr_logits"] = self.cdr_head([head_in], train)
        return out

    def __call__(
        self, images: Array, ingredients: Array | None = None, train: bool = False
    ) -> dict[str, Array]:
        """Training path (reads the ingredients). Returns float32 arrays:
        always 'logits', 'visual_logits' [B, C], 'x_v' [B, D];
        use_ema: 'x_ema' [B, E], 'ema_z_v', 'ema_z_s' (L2-normalised g_v(x_v), g_s(x_s)),
          'ema_logit_scale' [];
        use_cdr: 'cdr_logits' [B, C] (the CDR head on its `cdr_head_input`), 's0', 's0_hat',
          'cdr_pred', 'cdr_target' [B, E], 'cdr_t' int32 [B]; 'x_cdr' [B, E] when either head
          reads the chain;
        use_aux: 'aux_logits' [B, V] (ingredient head on x_v), 'aux_targets' [B, V] (the multi-hot);
        use_text_head: 'text_logits' [B, C]; use_distill: 'teacher_logits' [B, C] (stop-gradient).
        """
        out = self.visual_features(images, train)
        x_cdr = head_in = None
        if self.reads_text or self.use_aux:
            if ingredients is None:
                raise ValueError(
                    "the training path of MARNet with EMA, CDR or aux needs ingredients"
                )
            chex.assert_rank(ingredients, 2)
            chex.assert_axis_dimension(ingredients, 0, images.shape[0])
            if self.num_ingredients is not None:
                chex.assert_axis_dimension(ingredients, 1, self.num_ingredients)
            ingredients = ingredients.astype(jnp.float32)
        if self.use_aux:
            out["aux_logits"] = self.aux_head([out["x_v"]], train)
            out["aux_targets"] = ingredients
        if self.reads_text:
            g_s = self._semantic(ingredients, train and not self.freeze_text)
            if self.freeze_text:
                g_s = jax.lax.stop_gradient(g_s)
            if self.use_text_head:
                text_logits = self.text_head([g_s], train and not self.freeze_text)
                frozen = self.freeze_text
                out["text_logits"] = jax.lax.stop_gradient(text_logits) if frozen else text_logits
                if self.use_distill:
                    out["teacher_logits"] = jax.lax.stop_gradient(text_logits)
            if self.align_moves == "image":
                g_s = jax.lax.stop_gradient(g_s)
            if self.use_ema:
                k = max(1, round(self.align_fraction * out["x_ema"].shape[-1]))
                out["ema_z_v"] = l2_normalize(out["x_ema"][:, :k])
                out["ema_z_s"] = l2_normalize(g_s[:, :k])
                out["ema_logit_scale"] = self.ema.logit_scale()
            if self.use_cdr:
                s0 = self.cdr.semantic_target(g_s)
                cond = out["x_v"] if self.cdr_condition_on == "x_v" else out["x_ema"]
                est = self.cdr(s0, cond, train=train, target_grad=self.cdr_target_grad)
                out.update(
                    s0=s0,
                    s0_hat=est.x0_hat,
                    cdr_pred=est.model_out,
                    cdr_target=est.target,
                    cdr_t=est.t,
                )
                chain = None
                if "chain" in (self.cdr_train_estimate, self.cdr_head_input):
                    chain = out["x_cdr"] = self.cdr_chain(out, self.cdr_chain_grad)
                pick = lambda how: chain if how == "chain" else est.x0_hat
                x_cdr, head_in = pick(self.cdr_train_estimate), pick(self.cdr_head_input)
        return self.classify(out, x_cdr, train, cdr_head_input=head_in)

    def predict(self, images: Array, train: bool = False) -> dict[str, Array]:
        """Image-only prediction: 'logits', 'visual_logits', 'x_v' (+ 'x_ema' with EMA, 'cdr_logits'
        and 'x_cdr' with CDR: the reverse chain conditioned on the image, keyed by the 'diffusion'
        rng)."""
        out = self.visual_features(images, train)
        x_cdr = None
        if self.use_cdr:
            x_cdr = out["x_cdr"] = self.cdr_chain(out)
        return self.classify(out, x_cdr, train)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
    """'float32' | 'bfloat16' -> jnp dtype."""
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {tuple(_DTYPES)}")
    return _DTYPES[name]


# MARNet's fields that are sub-modules or come from the dataset, not from config.model.
_BUILT = ("backbone", "text_encoder", "ema", "cdr", "num_classes", "num_ingredients")


# MARNet's fields that wire CDR into it; config.model.cdr_wiring holds them without this prefix.
WIRING_PREFIX = "cdr_"


def marnet_fields() -> tuple[str, ...]:
    """MARNet's own choices: config.model fields passed to it as they are (the CDR wiring aside)."""
    own = (f for f in module_fields(MARNet) if f not in _BUILT)
    return tuple(f for f in own if not f.startswith(WIRING_PREFIX))


def wiring_fields() -> tuple[str, ...]:
    """MARNet's fields that say how CDR is wired in: config.model.cdr_wiring, without the prefix."""
    return tuple(f for f in module_fields(MARNet) if f.startswith(WIRING_PREFIX))


def build_model(
    model_cfg: ml_collections.ConfigDict, num_classes: int, num_ingredients: int | None
) -> MARNet:
    """MARNet from config.model (marnet_jax.models.config): the encoders from their fields, EMAHeads
    from the `ema` section, CDR from the `cdr` section, how CDR is wired in from `cdr_wiring`,
    MARNet's own choices from the rest."""
    cfg = model_cfg
    dtype = compute_dtype(cfg.dtype)
    backbone_kwargs = cfg.backbone_kwargs.to_dict()
    if cfg.remat:
        backbone_kwargs["remat"] = True
    backbone = build_backbone(cfg.backbone, dtype, **backbone_kwargs)
    text_encoder = None
    if cfg.use_ema or cfg.use_cdr or cfg.use_text_head or cfg.use_distill:
        text_kwargs = cfg.text_kwargs.to_dict()
        if cfg.word_vectors:
            text_kwargs["word_dim"] = word_vectors.dim(cfg.word_vectors)
            text_kwargs["freeze_words"] = cfg.freeze_word_vectors
        text_encoder = build_text_encoder(cfg.text_encoder, dtype, **text_kwargs)
    ema = EMAHeads(embed_dim=cfg.embed_dim, dtype=dtype, **cfg.ema)
    cdr = CDR(dim=cfg.embed_dim, dtype=dtype, **cfg.cdr) if cfg.use_cdr else None
    return MARNet(
        backbone=backbone,
        text_encoder=text_encoder,
        ema=ema,
        cdr=cdr,
        num_classes=num_classes,
        num_ingredients=num_ingredients,
        **{name: cfg[name] for name in marnet_fields()},
        **{WIRING_PREFIX + name: value for name, value in cfg.cdr_wiring.items()},
    )


def module_fields(module: type[nn.Module]) -> dict[str, Any]:
    """A linen module's attributes with their defaults (None for required ones), in order."""
    return {
        f.name: None if f.default is dataclasses.MISSING else f.default
        for f in dataclasses.fields(module)
        if f.init and f.name not in ("parent", "name")
    }
