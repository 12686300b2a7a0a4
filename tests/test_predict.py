"""python -m marnet_jax.predict on a tiny run: the evaluation pipeline's numbers, top-k with class
names, per-file errors, JSON output, the fall-back to class indices, workdirs it cannot use.

The run is one step of configs/tiny.py started from a backbone weights file (model.init_from). Its
checkpoint also shows that the trainer imported the file: the learning rate is 0 during the first
warm-up step, so the saved backbone is the file's.
"""

from __future__ import annotations

import functools
import io
import json

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file
from weight_files import torchvision_names

from configs import tiny
from marnet_jax import predict
from marnet_jax.data import datasets, images, pipeline
from marnet_jax.models import build_model
from marnet_jax.train import loop, trainer
from marnet_jax.train.experiment import Experiment


@pytest.fixture(scope="module")
def run(tiny_data_dir, tmp_path_factory):
    """(workdir, config, the backbone params written to the weights file)."""
    tmp = tmp_path_factory.mktemp("predict")
    config = tiny.get_config()
    config.data.data_dir = str(tiny_data_dir)
    config.mesh.num_devices = 1  # the same compiled train step as test_trainer.py
    abstract = Experiment.build(config).abstract
    rng = np.random.default_rng(0)
    params, stats = jax.tree.map(
        lambda s: np.abs(rng.standard_normal(s.shape).astype(np.float32)) * 0.5,
        (abstract.params["backbone"], abstract.batch_stats["backbone"]),
    )
    save_file(torchvision_names(params, stats), tmp / "backbone.safetensors")
    config.model.init_from = str(tmp / "backbone.safetensors")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop.StopFlag, "should_stop", lambda self, step, every: step == 1)
        assert trainer.train_and_evaluate(config, str(tmp / "work")) == {"preempted_at_step": 1}
    return tmp / "work", config, params


@pytest.fixture(scope="module")
def photos(run, tmp_path_factory):
    """Eight test-split images re-encoded at 48x40 px (so that the resize and the centre crop
    matter), as PNG files and as dataset records."""
    _, config, _ = run
    source = datasets.source(config.data, config.data.test_split)
    folder = tmp_path_factory.mktemp("photos")
    paths, records = [], []
    for i in range(8):
        buf = io.BytesIO()
        Image.open(io.BytesIO(source[i]["image"])).resize((48, 40)).save(buf, format="PNG")
        records.append({**source[i], "image": buf.getvalue()})
        paths.append(folder / f"photo_{i}.png")
        paths[-1].write_bytes(buf.getvalue())
    return paths, records


def test_the_run_started_from_the_weights_file(run):
    workdir, config, params = run
    trained = Experiment.restore(workdir, config)
    variables, step = trained.variables, trained.step
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, variables["params"]["backbone"], params)


def test_predictions_are_the_evaluation_pipelines(run, photos):
    """The same images through eval_batches and the model's predict path give the same top-5."""
    workdir, config, _ = run
    paths, records = photos
    got, step = predict.predict(str(workdir), [str(p) for p in paths], batch_size=8)
    assert step == 1 and len(got) == 8
    batch = next(pipeline.eval_batches(config.data, batch_size=8, data_source=records))
    for i, record in enumerate(records):
        np.testing.assert_array_equal(
            images.preprocess(config.data, record["image"]), batch["image"][i]
        )
    variables = Experiment.restore(workdir, config).variables
    facts = datasets.prepare(config.data)
    model = build_model(config.model, facts.num_classes, facts.num_ingredients)
    run_top5 = jax.jit(functools.partial(predict._top_k, model=model, data_cfg=config.data, k=5))
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
    probs, idx = jax.device_get(run_top5(variables, batch["image"], rng))
    for i, p in enumerate(got):
        assert p.error is None and p.classes == tuple(idx[i])
        assert p.names == tuple(facts.class_names[c] for c in idx[i])
        np.testing.assert_allclose(p.probabilities, probs[i], rtol=1e-5, atol=1e-7)
        assert list(p.probabilities) == sorted(p.probabilities, reverse=True)


def test_command_line_bad_files_and_json(run, photos, tmp_path, capsys):
    workdir, _, _ = run
    paths, _ = photos
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    buf = io.BytesIO()
    Image.new("L", (50, 30), 128).save(buf, format="PNG")  # grey, not square: converted + cropped
    grey = tmp_path / "grey.png"
    grey.write_bytes(buf.getvalue())
    given = [str(paths[0]), str(corrupt), str(tmp_path / "absent.png"), str(grey)]
    out_json = tmp_path / "out.json"
    code = predict.main(
        ["--workdir", str(workdir), "--top_k", "3", "--json", str(out_json), *given]
    )
    out, err = capsys.readouterr()
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("predict: cannot classify")]
    assert len(errors) == 2
    assert str(corrupt) in errors[0] and str(tmp_path / "absent.png") in errors[1]
    lines = out.splitlines()
    assert lines[0] == str(paths[0]) and lines[4] == str(grey) and len(lines) == 8
    assert lines[1].strip().startswith("1. dish_")
    written = json.loads(out_json.read_text())
    assert [w["image"] for w in written] == given
    assert "error" in written[1] and "error" in written[2]
    assert len(written[3]["top_k"]) == 3 and written[3]["top_k"][0]["name"].startswith("dish_")
    assert sum(t["probability"] for t in written[0]["top_k"]) <= 1.0 + 1e-6


def test_without_the_dataset_classes_are_indices(run, photos, tmp_path, caplog):
    workdir, _, _ = run
    paths, _ = photos
    got, _ = predict.predict(str(workdir), [str(paths[0])], data_dir=str(tmp_path))
    assert got[0].names == tuple(str(c) for c in got[0].classes)
    assert "Class names unavailable" in caplog.text and "not prepared" in caplog.text


def test_unusable_workdirs_exit_2(run, tmp_path, capsys):
    workdir, _, _ = run
    assert predict.main(["--workdir", str(tmp_path), "x.png"]) == 2
    assert "config.json not found" in capsys.readouterr().err
    (tmp_path / "config.json").write_text((workdir / "config.json").read_text())
    assert predict.main(["--workdir", str(tmp_path), "x.png"]) == 2
    assert "No checkpoints in" in capsys.readouterr().err
    assert predict.main(["--workdir", str(workdir), "--step", "7", "x.png"]) == 2
    assert "No checkpoint for step 7" in capsys.readouterr().err
