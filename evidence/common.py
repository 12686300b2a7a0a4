"""What the studies share: the command line, provenance, tables, the ablation's run index, prediction.

Every study writes into its own folder of one evidence workdir (`<workdir>/<study>/`): a JSON with every
number and its provenance (machine, config, seeds, exact command), a markdown fragment that
`evidence.results` puts into docs/results.md, and its tables and figures.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from marnet_jax import reporting
from marnet_jax.data.config import train_image_size
from marnet_jax.train.steps import EVAL_HEADS

ABLATION = "ablation"  # the study folder whose runs/<variant>/seed_<s>/ the other studies read
RUN_MARKER = "evidence_run.json"  # written into a run directory once its training and test are done


class Preempted(RuntimeError):
    """A run stopped on SIGTERM with a checkpoint; rerunning the command resumes it."""


class UsageError(ValueError):
    """A bad flag, config or workdir: the command line prints it in one line and exits."""


# --------------------------------------------------------------------------------------------------
# Command line.


def run_cli(prog: str, main: Callable[[], None]) -> int:
    """Runs a study's main (0: the exit status); a UsageError or a missing file ends the program
    with one line."""
    try:
        main()
    except (UsageError, FileNotFoundError) as e:
        sys.exit(f"{prog}: {e}")
    return 0


def study_cli(
    prog: str,
    define_flags: Callable[[flags.FlagValues], None],
    run_from_flags: Callable[[flags.FlagValues], Path],
    argv: Sequence[str] | None = None,
    training: bool = False,
    doc: str = "",
) -> int:
    """The command line of a study (marnet_jax.cli.parse_flags; `doc` for --help): --config,
    --workdir and `define_flags`'s flags, then `run_from_flags(flags)`, whose markdown fragment is printed; the
    exit status. A UsageError or a missing file ends it with one line. `training`: a run stopped by
    SIGTERM (a checkpoint was saved) exits 0 with the resume hint, as marnet_jax.main does."""
    from marnet_jax.cli import define_config, parse_flags, usage_error

    def define(fv: flags.FlagValues) -> None:
        define_config(fv, argv, "Evidence workdir: every study reads and writes here.")
        define_flags(fv)

    args, rest = parse_flags(prog, define, argv, "--config FILE --workdir DIR [flags]", doc)
    if rest:
        usage_error(prog, f"unexpected arguments {rest}.")

    def body() -> None:
        try:
            fragment = run_from_flags(args)
        except Preempted as e:
            if not training:
                raise
            logging.getLogger("marnet_jax").warning("%s", e)
            return
        print(fragment.read_text())

    return run_cli(prog, body)


def write_study(
    workdir: Path,
    study: str,
    report: Mapping[str, Any],
    markdown: str,
    csv: tuple[Sequence[str], Sequence[Mapping[str, Any]]] | None = None,
    plot: Callable[[Mapping[str, Any], Path], None] | None = None,
) -> Path:
    """Writes a study's files into `<workdir>/<study>/`: <study>.json (the report), .md (its
    fragment of docs/results.md) and, when given, .csv (columns, rows) and .png (`plot`)."""
    out = Path(workdir) / study
    out.mkdir(parents=True, exist_ok=True)
    reporting.write_json(out / f"{study}.json", report)
    if csv is not None:
        reporting.write_csv(out / f"{study}.csv", *csv)
    if plot is not None:
        plot(report, out / f"{study}.png")
    (out / f"{study}.md").write_text(markdown)
    return out


def command_line() -> str:
    """The command that started this process, as a user would type it."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if argv and Path(argv[0]).name.startswith("python"):
        argv[0] = "python"
    return shlex.join(argv)


def parse_ints(values: Sequence[str], what: str) -> list[int]:
    """['0', '1'] -> [0, 1], with an error naming the flag."""
    try:
        return [int(v) for v in values]
    except ValueError as e:
        raise UsageError(f"{what} must be integers, got {list(values)}.") from e


def parse_ints_of(specs: Sequence[str], flag: str, key: str = "VARIANT") -> dict[str, list[int]]:
    """['baseline,full=0,1,2', ...] -> {'baseline': [0, 1, 2], 'full': [0, 1, 2]}: the integers a
    repeatable flag gives each key (a variant's seeds or budgets, a fraction's seeds or steps)."""
    out: dict[str, list[int]] = {}
    for spec in specs:
        keys, sep, values = spec.partition("=")
        if not sep or not keys or not values:
            raise UsageError(f"{flag} {spec!r}: expected '{key}[,{key}...]=N[,N...]'.")
        for k in keys.split(","):
            if k in out:
                raise UsageError(f"{flag} names {k!r} twice.")
            out[k] = parse_ints(values.split(","), f"{flag} {spec!r}")
    return out


def check_seeds(seeds: Sequence[int], what: str) -> None:
    """Seeds of a study: at least one, distinct, non-negative; else an error naming the flag."""
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UsageError(f"{what} must be distinct non-negative integers, got {list(seeds)}.")


# --------------------------------------------------------------------------------------------------
# Provenance.


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[1]  # evidence/ sits in the repository root
    try:
        git = lambda *args: subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+uncommitted changes" if dirty else "")


def config_summary(config: Any) -> dict[str, Any]:
    """The config facts a reader needs next to a number (the full config is saved alongside)."""
    model = config.model
    return {
        "dataset": f"{config.data.name}/{config.data.builder_config}",
        "protocol": config.protocol,
        "image_size": config.data.image_size,
        "train_image_size": train_image_size(config.data),
        "backbone": model.backbone,
        "backbone_kwargs": dict(model.backbone_kwargs),
        "embed_dim": model.embed_dim,
        "train_steps": config.train.num_steps,
        "train_fraction": float(config.data.train_fraction),
        "batch_size": config.train.batch_size,
        "lr": config.optim.lr,
        "loss_weights": {k: v for k, v in config.loss.items() if k.startswith("w_")},
        "cdr_training": f"head_input={model.cdr_wiring.head_input}, "
        f"chain_grad={model.cdr_wiring.chain_grad}",
        "cdr_test_chain": f"{model.cdr.sampler} {model.cdr.sample_steps} steps x "
        f"{model.cdr.num_samples} samples (T={model.cdr.num_steps})",
        "fusion": model.fusion,
    }


class Provenance:
    """Collects what every number needs stated with it; `finish()` gives the JSON-able record."""

    def __init__(self, command: str, config: Any, seeds: Sequence[int]):
        self.command = command
        self.config = config_summary(config)
        self.seeds = [int(s) for s in seeds]
        self.started = datetime.datetime.now(datetime.UTC)
        self._t0 = time.perf_counter()
        self._cpu0 = time.process_time()
        self.machine = reporting.machine()

    def finish(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "config": self.config,
            "seeds": self.seeds,
            "machine": self.machine,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "git_commit": _git_commit(),
            "started_utc": self.started.isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - self._t0, 1),
            "process_cpu_s": round(time.process_time() - self._cpu0, 1),
        }


# --------------------------------------------------------------------------------------------------
# Files.


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for a single value)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def paired_verdict(deltas: Sequence[float], better: str, worse: str) -> str:
    """Plain words for paired per-seed differences: `better` when every seed improves, `worse` when
    every seed gets worse, otherwise that the effect is not consistent (one seed: no verdict)."""
    d = np.asarray(deltas, np.float64)
    if d.size < 2:
        return "one seed only: no verdict"
    if np.all(d > 0):
        return better
    if np.all(d < 0):
        return worse
    return f"no consistent effect ({int(np.sum(d > 0))} of {d.size} seeds better)"


# --------------------------------------------------------------------------------------------------
# Trained runs.


def run_index(workdir: Path) -> dict[str, dict[int, Path]]:
    """{variant label: {seed: run directory}} of every finished run with its weights in
    `<workdir>/ablation/runs`.

    Read from the runs' markers, not from ablation.json: an ablation run in parts (one call per
    variant, say) rewrites that report with its own variants only, yet every finished run counts.
    A record restored from docs/results without its checkpoints is not a model to read.
    """
    from marnet_jax.train import checkpoint

    root = workdir / ABLATION / "runs"
    index: dict[str, dict[int, Path]] = {}
    for marker in sorted(root.glob(f"*/seed_*/{RUN_MARKER}")):
        run_dir = marker.parent
        if not checkpoint.is_run_dir(run_dir):
            continue
        index.setdefault(run_dir.parent.name, {})[int(run_dir.name.removeprefix("seed_"))] = run_dir
    if not index:
        raise UsageError(
            f"No finished ablation runs with their checkpoints in {root}: run `python -m "
            "evidence.ablation` with this --workdir first (it trains the runs the other studies "
            "read; records restored from docs/results hold no weights)."
        )
    return index


def select_runs(
    index: Mapping[str, Mapping[int, Path]], labels: Sequence[str], seeds: Sequence[int] | None
) -> dict[str, dict[int, Path]]:
    """The requested labels (and seeds; None = every seed) of a run index, with clear errors."""
    out = {}
    for label in labels:
        if label not in index:
            raise UsageError(
                f"No ablation runs of variant {label!r}; the ablation has {sorted(index)}."
            )
        runs = index[label]
        wanted = sorted(runs) if seeds is None else list(seeds)
        missing = [s for s in wanted if s not in runs]
        if missing:
            raise UsageError(
                f"Variant {label!r} has no run for seeds {missing} (has {sorted(runs)})."
            )
        out[label] = {s: runs[s] for s in wanted}
    return out


def run_config(run_dir: Path, study_config: Any) -> Any:
    """The run's own config (its model is what the checkpoint holds) with the study's data section,
    mesh and eval batch size (so a study can read the data from another place or use other devices).
    The dataset and image geometry must be the run's: otherwise the error names both."""
    from marnet_jax.train import experiment

    config = experiment.read_config(run_dir)
    ours, theirs = study_config.data, config.data
    for key in ("name", "builder_config", "image_size"):
        if ours[key] != theirs[key]:
            raise UsageError(
                f"{run_dir / 'config.json'} was trained on data.{key}={theirs[key]!r} but --config "
                f"has data.{key}={ours[key]!r}: use the config the ablation was run with."
            )
    with config.unlocked():
        config.data = study_config.data
        config.mesh = study_config.mesh
        config.train.eval_batch_size = study_config.train.eval_batch_size
    return config


def load_run(run_dir: Path, config: Any) -> Any:
    """A finished run restored for a study (experiment.Trained), with `config` from run_config and
    the dataset's own facts (class names)."""
    from marnet_jax.data import datasets
    from marnet_jax.train.experiment import Experiment

    return Experiment.restore(run_dir, config, facts=datasets.prepare(config.data))


def latest_step(run_dir: Path) -> int | None:
    """The newest checkpoint step in `<run_dir>/checkpoints` (None: none), without restoring it."""
    ckpt = Path(run_dir) / "checkpoints"
    steps = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()] if ckpt.exists() else []
    return max(steps, default=None)


def first_run_config(runs: Mapping[str, Mapping[int, Path]], study_config: Any) -> Any:
    """The config of the first selected run: what a study's provenance states (training steps,
    backbone, ...), since the runs, not the study's --config, were trained with it."""
    run_dir = next(iter(next(iter(runs.values())).values()))
    return run_config(run_dir, study_config)


# --------------------------------------------------------------------------------------------------
# Prediction.


def predict_fn(trained: Any, keys: Sequence[str]) -> Callable[..., dict[str, Any]]:
    """Jitted image-only prediction of `trained` (experiment.Trained) returning the named outputs
    ('logits', 'visual_logits', 'cdr_logits', 'x_v', 'x_ema', 'x_cdr'; those the variant has)."""
    import jax

    from marnet_jax.data import photometric
    from marnet_jax.models.marnet import MARNet
    from marnet_jax.train import sharding

    keys = tuple(keys)

    def apply(variables, images, rng):
        x = photometric.eval_images(images, trained.config.data)
        out = trained.model.apply(
            variables, x, train=False, rngs={"diffusion": rng}, method=MARNet.predict
        )
        return {k: out[k] for k in keys if k in out}

    mesh = trained.mesh
    return jax.jit(
        apply, in_shardings=(None, sharding.batch_sharding(mesh), sharding.replicated(mesh))
    )


def iterate_predictions(
    trained: Any,
    fn: Callable[..., dict[str, Any]],
    split: str,
    *,
    extra_transforms: Sequence[Any] = (),
    transform_seed: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Per batch of `split`: the outputs of `fn` and 'label', padding removed, as NumPy arrays.

    The CDR chain's noise of batch i is fold_in(PRNGKey(run seed), i), as in the trainer's
    evaluation, so clean accuracies reproduce the run's test accuracy exactly.
    """
    import jax

    from marnet_jax.data import pipeline
    from marnet_jax.train import sharding

    if jax.process_count() != 1:
        raise RuntimeError("The evidence studies run in a single process (any number of devices).")
    config = trained.config
    rng = jax.random.PRNGKey(config.seed)
    batches = pipeline.eval_batches(
        config.data,
        split,
        batch_size=config.train.eval_batch_size,
        shard_index=0,
        shard_count=1,
        extra_transforms=extra_transforms,
        seed=transform_seed,
    )
    for i, batch in enumerate(batches):
        images = sharding.global_batch({"image": batch["image"]}, trained.mesh)["image"]
        out = jax.device_get(fn(trained.variables, images, jax.random.fold_in(rng, i)))
        keep = batch["mask"] > 0
        yield {k: np.asarray(v)[keep] for k, v in out.items()} | {"label": batch["label"][keep]}


def first_batch(config: Any, split: str) -> dict[str, np.ndarray]:
    """The first eval batch of `split` as the model sees it (normalised images), padding removed."""
    from marnet_jax.data import photometric, pipeline

    batches = pipeline.eval_batches(
        config.data, split, batch_size=config.train.eval_batch_size, shard_index=0, shard_count=1
    )
    try:
        batch = next(batches)
    finally:
        batches.close()
    keep = batch["mask"] > 0
    out = {k: v[keep] for k, v in batch.items()}
    return out | {"image": np.asarray(photometric.eval_images(out["image"], config.data))}


def predict(trained: Any, fn: Callable[..., dict[str, Any]], split: str, **kwargs: Any):
    """`iterate_predictions` concatenated over the split: {output: [N, ...], 'label': [N]}."""
    parts = list(iterate_predictions(trained, fn, split, **kwargs))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


HEADS = EVAL_HEADS  # head name -> the model output holding its logits


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k largest logits (k clipped to the class count)."""
    k = min(k, logits.shape[-1])
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=-1)))


def head_accuracies(outputs: Mapping[str, np.ndarray]) -> dict[str, float]:
    """{'fused_top1', 'fused_top5', 'visual_top1', ...} for the heads present in `outputs`."""
    out = {}
    for head, key in HEADS.items():
        if key in outputs:
            out[f"{head}_top1"] = topk_accuracy(outputs[key], outputs["label"], 1)
            out[f"{head}_top5"] = topk_accuracy(outputs[key], outputs["label"], 5)
    return out


def split_with_limit(data_cfg: Any, split: str, num_examples: int) -> str:
    """'test' -> 'test[:N]' (tfds slicing) when 0 < N < the size of the split, else 'test'."""
    from marnet_jax.data import datasets

    if num_examples < 0:
        raise UsageError(f"num_examples must be >= 0 (0 = the whole split), got {num_examples}.")
    if num_examples == 0:
        return split
    if "[" in split:
        raise UsageError(f"Give either a sliced split ({split!r}) or num_examples, not both.")
    sizes = datasets.prepare(data_cfg).split_sizes
    if split not in sizes:
        raise UsageError(f"No split {split!r} in {data_cfg.name}; it has {sorted(sizes)}.")
    return split if num_examples >= sizes[split] else f"{split}[:{num_examples}]"
