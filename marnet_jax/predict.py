"""Classify photos with a trained MARNet: python -m marnet_jax.predict --workdir DIR IMAGE [IMAGE ...]

Reads DIR/config.json (written by the trainer) and the newest checkpoint in DIR/checkpoints (or --step),
prepares every image exactly as the evaluation does (decode, resize the shorter side and take the
centre crop: marnet_jax.data.images; normalise: photometric.eval_images), runs the image-only path
(MARNet.predict: no ingredient text) and prints, per image, the top-k dishes of the fused classifier
with their softmax probabilities; --json also writes them to a file.

Class names come from the dataset's tfds metadata when the dataset is prepared under
config.data.data_dir (or --data_dir); without it, classes are printed as indices, with a warning.
An image that cannot be read gets a one-line error on stderr naming the file and the others are still
classified; the exit status is then 1. A workdir without config or checkpoint exits with status 2.
The CDR chain starts from noise drawn from config.seed: the same call gives the same output.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from absl import logging as absl_logging

from marnet_jax import cli
from marnet_jax.data import datasets, photometric
from marnet_jax.data.images import IMAGE_ERRORS, load_image
from marnet_jax.models.marnet import MARNet
from marnet_jax.train import experiment

log = logging.getLogger("marnet_jax")


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, or why it could not be classified."""

    image: str
    classes: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    probabilities: tuple[float, ...] = ()
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        top = zip(self.classes, self.names, self.probabilities, strict=True)
        return {
            "image": self.image,
            "top_k": [{"class": c, "name": n, "probability": p} for c, n, p in top],
        }


def class_names(
    data_cfg: ml_collections.ConfigDict, num_classes: int
) -> tuple[tuple[str, ...], str | None]:
    """(names, warning): the dataset's class names if it is prepared, else indices and why."""
    indices = tuple(str(i) for i in range(num_classes))
    try:
        b = datasets.builder(data_cfg)
        prepared = datasets.is_prepared(b)
    except Exception as e:  # any failure to open the metadata only costs the names
        return indices, f"cannot open dataset {data_cfg.name} in {data_cfg.data_dir} ({e})"
    if not prepared:
        where = f"{data_cfg.name}/{data_cfg.builder_config} in {data_cfg.data_dir}"
        return indices, f"dataset {where} is not prepared"
    names = datasets.facts_from_info(b.info, data_cfg.builder_config).class_names
    if len(names) != num_classes:
        return indices, f"the dataset has {len(names)} classes, the checkpoint {num_classes}"
    return names, None


def _top_k(variables, images, rng, *, model: MARNet, data_cfg: ml_collections.ConfigDict, k: int):
    x = photometric.eval_images(images, data_cfg)
    out = model.apply(variables, x, train=False, rngs={"diffusion": rng}, method=MARNet.predict)
    probs = jax.nn.softmax(out["logits"].astype(jnp.float32), axis=-1)
    return jax.lax.top_k(probs, k)


def predict(
    workdir: str,
    images: Sequence[str],
    *,
    top_k: int = 5,
    step: int | None = None,
    batch_size: int = 32,
    cdr_samples: int | None = None,
    data_dir: str | None = None,
) -> tuple[list[Prediction], int]:
    """Top-k fused-head predictions for each image path (failures carry `error`); the step used."""
    config = experiment.read_config(workdir)
    if cdr_samples is not None:
        config.model.cdr.num_samples = cdr_samples
    if data_dir is not None:
        config.data.data_dir = data_dir
    config.mesh.update(num_devices=1, data=-1, fsdp=1)  # whatever mesh the run trained on
    trained = experiment.Experiment.restore(workdir, config, step)
    model, variables, step = trained.model, trained.variables, trained.step
    num_classes = trained.facts.num_classes
    names, warning = class_names(config.data, num_classes)
    if warning:
        log.warning("Class names unavailable (%s): printing class indices.", warning)
    k = min(top_k, num_classes)
    run = jax.jit(functools.partial(_top_k, model=model, data_cfg=config.data, k=k))

    results: dict[int, Prediction] = {}
    loaded: list[tuple[int, np.ndarray]] = []
    for i, path in enumerate(images):
        try:
            loaded.append((i, load_image(config.data, path)))
        except IMAGE_ERRORS as e:
            results[i] = Prediction(path, error=f"{type(e).__name__}: {e}")
    size = config.data.image_size
    batch = max(1, min(batch_size, len(loaded)))
    rng = jax.random.PRNGKey(config.seed)
    for b, start in enumerate(range(0, len(loaded), batch)):
        chunk = loaded[start : start + batch]
        x = np.zeros((batch, size, size, 3), chunk[0][1].dtype)
        for j, (_, image) in enumerate(chunk):
            x[j] = image
        probs, idx = jax.device_get(run(variables, x, jax.random.fold_in(rng, b)))
        chex.assert_shape((probs, idx), (batch, k))
        for j, (i, _) in enumerate(chunk):
            classes = tuple(int(c) for c in idx[j])
            results[i] = Prediction(
                images[i],
                classes=classes,
                names=tuple(names[c] for c in classes),
                probabilities=tuple(float(p) for p in probs[j]),
            )
    return [results[i] for i in range(len(images))], step


def format_prediction(p: Prediction) -> str:
    lines = [p.image]
    for rank, (name, prob) in enumerate(zip(p.names, p.probabilities, strict=True), 1):
        lines.append(f"  {rank}. {name:<32} {prob:.4f}")
    return "\n".join(lines)


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "the training run's workdir", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    flags.DEFINE_integer("top_k", 5, "classes shown per image", lower_bound=1, flag_values=fv)
    flags.DEFINE_string(
        "json", None, "also write the predictions as JSON to this file", flag_values=fv
    )
    flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "images per forward pass", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer(
        "cdr_samples",
        None,
        "CDR chains averaged per image (default: the config's)",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_string(
        "data_dir", None, "where the dataset's tfds metadata is (class names)", flag_values=fv
    )


def main(argv: Sequence[str] | None = None) -> int:
    args, images = cli.parse_flags(
        "marnet_jax.predict", _define_flags, argv, "--workdir DIR IMAGE [IMAGE ...]", __doc__
    )
    if not images:
        cli.usage_error("marnet_jax.predict", "give at least one IMAGE.")
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    try:
        predictions, step = predict(
            args.workdir,
            images,
            top_k=args.top_k,
            step=args.step,
            batch_size=args.batch_size,
            cdr_samples=args.cdr_samples,
            data_dir=args.data_dir,
        )
    except FileNotFoundError as e:  # no config.json, no checkpoint
        print(f"predict: {e}", file=sys.stderr)
        return 2
    print(f"Checkpoint step {step} of {args.workdir}", file=sys.stderr)
    for p in predictions:
        if p.error is None:
            print(format_prediction(p))
        else:
            print(f"predict: cannot classify {p.image}: {p.error}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([p.to_json() for p in predictions], f, indent=2)
    return 1 if any(p.error is not None for p in predictions) else 0


if __name__ == "__main__":
    cli.run(main)
