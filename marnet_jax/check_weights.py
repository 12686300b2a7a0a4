"""Check a weights file before training on it: its backbone imported as training imports it, with the
file's own ImageNet classifier, classifying photos.

    python -m marnet_jax.check_weights --weights FILE --backbone NAME [--format auto] IMAGE [IMAGE ...]

Prints the import report and the top-k ImageNet classes per photo (--json also writes them); a photo
that cannot be read gets a one-line error on stderr and the exit status 1, the others are still
classified. A file without its classifier, or one that does not fit the backbone, exits with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags

from marnet_jax import cli
from marnet_jax.data import photometric
from marnet_jax.data.images import IMAGE_ERRORS, load_image
from marnet_jax.models import pretrained
from marnet_jax.models.backbones import build_backbone


@dataclasses.dataclass(frozen=True)
class TopClasses:
    """The top classes of one image under a file's classifier, or why it could not be read."""

    image: str
    top: tuple[tuple[int, str, float], ...] = ()  # (index, name, probability)
    error: str | None = None

    def to_json(self) -> list[dict[str, Any]] | dict[str, str]:
        if self.error is not None:
            return {"error": self.error}
        return [{"index": i, "name": n, "prob": p} for i, n, p in self.top]


def check_weights(
    path: str,
    backbone: str,
    images: Sequence[str],
    *,
    fmt: str = "auto",
    backbone_kwargs: Mapping[str, Any] | None = None,
    image_size: int | None = None,
    mean_std: tuple[Sequence[float], Sequence[float]] | None = None,
    crop_ratio: float = 0.875,
    interpolation: str = "bicubic",
    top_k: int = 5,
) -> tuple[list[TopClasses], pretrained.ImportReport]:
    """Imports `path` into `backbone` as training would (import_backbone) and classifies each image
    with the file's own classifier: the top-k ImageNet classes per image, and the import report.

    Images are prepared by the evaluation pipeline's transforms (resize the shorter side to
    image_size / crop_ratio, centre crop, normalise with the format's mean / std unless given).
    image_size defaults to the backbone's native resolution (224 where it has none).
    """
    weights = pretrained.read_weights(path)
    fmt = pretrained.detect_format(list(weights)) if fmt == "auto" else fmt
    if fmt not in pretrained.FORMAT_NORMALIZATION:
        raise ValueError(f"unknown weights format {fmt!r}; expected one of {pretrained.FORMATS}")
    kwargs = dict(backbone_kwargs or {})
    if fmt == "timm":
        kwargs.setdefault("approximate_gelu", False)
    model = build_backbone(backbone, **kwargs)
    size = image_size or getattr(model, "resolution", 224)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, size, size, 3)), train=False)
    )
    params, stats, report = pretrained.import_backbone(
        weights, abstract["params"], abstract.get("batch_stats", {}), fmt=fmt
    )
    report = dataclasses.replace(report, path=path)
    head = pretrained.file_classifier(weights, fmt, path)
    names = pretrained.imagenet_class_names()
    if head.kernel.shape[1] != len(names):
        names = tuple(str(i) for i in range(head.kernel.shape[1]))
    mean, std = mean_std or pretrained.FORMAT_NORMALIZATION[fmt]
    # The evaluation pipeline's own preprocessing, as predict uses it.
    data_cfg = ml_collections.ConfigDict(
        dict(image_size=size, eval_crop_ratio=crop_ratio, interpolation=interpolation,
             mean=tuple(mean), std=tuple(std), dtype="float32")
    )  # fmt: skip
    variables = {"params": params, **({"batch_stats": stats} if stats else {})}

    @jax.jit
    def probabilities(variables: dict[str, Any], crops: jax.Array) -> jax.Array:
        x = photometric.eval_images(crops, data_cfg)
        features = model.apply(variables, x, train=False)
        return jax.nn.softmax(head.logits(features).astype(jax.numpy.float32), axis=-1)

    results = []
    for image in images:
        try:
            x = load_image(data_cfg, image)
        except IMAGE_ERRORS as e:
            results.append(TopClasses(image, error=f"{type(e).__name__}: {e}"))
            continue
        probs = np.asarray(probabilities(variables, x[None]))[0]
        order = np.argsort(-probs, kind="stable")[:top_k]
        top = tuple((int(i), names[i], float(probs[i])) for i in order)
        results.append(TopClasses(image, top=top))
    return results, report


PROG = "marnet_jax.check_weights"


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("weights", None, "weights file (.pth, .safetensors, .npz)", flag_values=fv)
    flags.DEFINE_string("backbone", None, "build_backbone name, e.g. resnet50", flag_values=fv)
    flags.mark_flags_as_required(["weights", "backbone"], flag_values=fv)
    flags.DEFINE_enum("format", "auto", pretrained.FORMATS, "weights format", flag_values=fv)
    flags.DEFINE_string(
        "backbone_kwargs",
        "{}",
        "JSON kwargs of the backbone, e.g. '{\"width\": 1}'",
        flag_values=fv,
    )
    flags.DEFINE_integer("image_size", None, "input size (default: the backbone's)", flag_values=fv)
    flags.DEFINE_list(
        "mean", None, "RGB mean in [0, 1], 3 numbers (default: format's)", flag_values=fv
    )
    flags.DEFINE_list(
        "std", None, "RGB std in [0, 1], 3 numbers (default: format's)", flag_values=fv
    )
    flags.DEFINE_float("crop_ratio", 0.875, "centre crop / resized shorter side", flag_values=fv)
    flags.DEFINE_string(
        "interpolation", "bicubic", "resize: bilinear | bicubic | lanczos", flag_values=fv
    )
    flags.DEFINE_integer("top_k", 5, "classes shown per image", lower_bound=1, flag_values=fv)
    flags.DEFINE_string(
        "json", None, "also write {image: [{index, name, prob}]} here", flag_values=fv
    )


def _rgb(name: str, values: list[str] | None) -> tuple[float, float, float] | None:
    if values is None:
        return None
    try:
        rgb = tuple(float(v) for v in values)
    except ValueError:
        rgb = ()
    if len(rgb) != 3:
        cli.usage_error(PROG, f"--{name} takes 3 numbers (R,G,B), got {','.join(values)}")
    return rgb


def main(argv: Sequence[str] | None = None) -> int:
    """Top-k ImageNet classes of photos under a weights file's own classifier."""
    args, photos = cli.parse_flags(
        PROG, _define_flags, argv, "--weights FILE --backbone NAME IMAGE...", __doc__
    )
    if not photos:
        cli.usage_error(PROG, "give at least one IMAGE.")
    mean, std = _rgb("mean", args.mean), _rgb("std", args.std)
    if (mean is None) != (std is None):
        cli.usage_error(PROG, "give --mean and --std together")
    try:
        kwargs = json.loads(args.backbone_kwargs)
    except json.JSONDecodeError as e:
        cli.usage_error(PROG, f"--backbone_kwargs is not JSON ({e}): {args.backbone_kwargs}")
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    try:
        results, report = check_weights(
            args.weights,
            args.backbone,
            photos,
            fmt=args.format,
            backbone_kwargs=kwargs,
            image_size=args.image_size,
            mean_std=(mean, std) if mean else None,
            crop_ratio=args.crop_ratio,
            interpolation=args.interpolation,
            top_k=args.top_k,
        )
    except (pretrained.WeightImportError, FileNotFoundError, ImportError, ValueError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    for r in results:
        if r.error is not None:
            print(f"{PROG}: cannot read {r.image}: {r.error}", file=sys.stderr)
            continue
        print(r.image)
        for rank, (index, name, prob) in enumerate(r.top, 1):
            print(f"  {rank}. {index:>4} {name[:48]:<48} {prob:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({r.image: r.to_json() for r in results}, f, indent=2)
    return 1 if any(r.error is not None for r in results) else 0


if __name__ == "__main__":
    cli.run(main)
