"""The training protocol: variants and protocols from the config arg, per-group learning rates and
freezing, the text teacher stage (trains, resumes exactly after a kill in either stage, stays
frozen), distillation end to end, warm starts from a run, and the gradient diagnostics."""

import json

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import default, tiny
from marnet_jax.config import apply_variant
from marnet_jax.models import build_model
from marnet_jax.train import checkpoint, loop, optim, teacher, trainer
from marnet_jax.train.experiment import Experiment
from marnet_jax.train.metrics import MetricWriter

# --- config


def test_config_arg_sets_variant_and_protocol():
    config = apply_variant(tiny.get_config(), "full,teacher")
    m = config.model
    assert (m.use_ema, m.use_cdr, m.use_text_head, m.freeze_text) == (True, True, True, True)
    assert m.align_moves == "image" and config.protocol == "teacher"
    joint = apply_variant(tiny.get_config(), "full,joint")
    assert not joint.model.use_text_head and not joint.model.freeze_text
    assert joint.model.align_moves == "both"
    # The baseline never reads the text, whatever the protocol; distillation always has a teacher.
    assert not apply_variant(tiny.get_config(), "baseline,teacher").model.use_text_head
    distill = apply_variant(tiny.get_config(), "distill,joint")
    assert distill.model.use_distill and distill.model.freeze_text and distill.protocol == "teacher"
    for bad in ("fused", "full,staged"):
        with pytest.raises(ValueError, match="Unknown"):
            apply_variant(tiny.get_config(), bad)


def test_default_config_variants_build():
    for arg in ("full", "baseline", "distill", "full,joint", "aux", "ema,tuned", "cdr,teacher"):
        config = default.get_config(arg)
        assert config.variant == arg.split(",")[0]


def test_default_config_is_the_tuned_teacher_protocol_and_names_the_searched_ones():
    def settings(c):
        return (c.loss.w_mse, c.loss.w_cdr, c.model.classifier_input, c.loss.distill_temperature)

    tuned = default.get_config()
    assert tuned.to_dict() == default.get_config("full,tuned").to_dict()
    assert tuned.protocol == "teacher" and tuned.model.freeze_text and tuned.model.use_text_head
    assert settings(tuned) == (0.1, 0.1, "x_v", 4.0)
    # Naming a protocol gives it at the settings the searches started from (docs/results.md).
    for protocol in ("teacher", "joint"):
        searched = default.get_config(f"full,{protocol}")
        assert searched.protocol == protocol and settings(searched) == (1.0, 1.0, "x_ema", 2.0)
    assert default.get_config("full,teacher").model.freeze_text
    # For the baseline and aux, the tuned config differs in settings they do not read only.
    for variant in ("baseline", "aux"):
        a = traverse_util.flatten_dict(default.get_config(variant).to_dict(), sep=".")
        b = traverse_util.flatten_dict(default.get_config(f"{variant},joint").to_dict(), sep=".")
        assert {k for k in a if a[k] != b[k]} == {*default.TUNED, "protocol"}
    with pytest.raises(ValueError, match="Unknown protocol"):
        default.get_config("full,staged")


def test_a_saved_config_of_an_earlier_layout_is_read_as_this_one(tmp_path):
    """config.upgrade, through experiment.read_config: the fields added since a run was written
    take their defaults, moved ones move, values are kept."""
    from marnet_jax.config import upgrade
    from marnet_jax.train.experiment import read_config

    now = default.get_config("full,joint")
    now.train.num_steps, now.data.augment.brightness = 7, 0.1
    old = json.loads(now.to_json_best_effort())
    del (
        old["protocol"],
        old["teacher"],
        old["loss"]["aux_rampup_steps"],
        old["optim"]["text_lr_mult"],
    )
    for key in ("decoder", "cache_decoded", "train_image_size"):
        del old["data"][key]
    old["model"].update({f"cdr_{k}": v for k, v in old["model"].pop("cdr_wiring").items()})
    (tmp_path / "config.json").write_text(json.dumps(old))
    expected = json.loads(now.to_json_best_effort())
    assert json.loads(read_config(tmp_path).to_json_best_effort()) == expected
    assert json.loads(upgrade(now).to_json_best_effort()) == expected  # this layout: unchanged


def test_paper_scale_configs_take_a_protocol():
    from configs import ingredient101, vireo_food172

    teacher = vireo_food172.get_config("resnet50,full,teacher")
    assert (teacher.protocol, teacher.model.freeze_text, teacher.variant) == (
        "teacher",
        True,
        "full",
    )
    joint = ingredient101.get_config("vit_b16,ema")
    assert (joint.protocol, joint.model.backbone, joint.variant) == ("joint", "vit_b16", "ema")
    with pytest.raises(ValueError, match="Unknown protocol 'staged'"):
        vireo_food172.get_config("resnet50,full,staged")


# --- optimizer groups


def _params():
    k = jnp.ones((3, 3))
    return {
        "backbone": {"conv": {"kernel": k}},
        "text_encoder": {"Dense_0": {"kernel": k}},
        "text_head": {"classifier": {"kernel": k}},
        "ema": {"g_s": {"out": {"kernel": k}}, "g_v": {"out": {"kernel": k}}},
        "fused_head": {"classifier": {"kernel": k}},
    }


def test_parameter_groups():
    flat = traverse_util.flatten_dict(_params())
    groups = {"/".join(k): optim.param_group(list(k)) for k in flat}
    assert groups == {
        "backbone/conv/kernel": "backbone",
        "text_encoder/Dense_0/kernel": "text",
        "text_head/classifier/kernel": "text",
        "ema/g_s/out/kernel": "text",
        "ema/g_v/out/kernel": "heads",
        "fused_head/classifier/kernel": "heads",
    }


def test_frozen_group_stays_bit_identical_and_multipliers_scale_each_group():
    """AdamW's decoupled weight decay moves parameters whose gradient is zero: a frozen group must
    get no update at all, and its gradient must not count in the clipping norm."""
    cfg = tiny.get_config().optim
    cfg.weight_decay, cfg.warmup_steps, cfg.grad_clip_norm = 0.5, 0, 1.0
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    grads["text_encoder"]["Dense_0"]["kernel"] *= 100.0  # would dominate the global norm
    tx, _ = optim.make_optimizer(cfg, 10, frozen=("text",))
    updates, _ = tx.update(grads, tx.init(params), params)
    flat = traverse_util.flatten_dict(updates)
    for k, u in flat.items():
        moved = float(jnp.max(jnp.abs(u)))
        assert (moved == 0.0) == (optim.param_group(list(k)) == "text"), k
    # Without the text gradient in the norm, the others are clipped as if it were absent.
    no_text = {k: v for k, v in traverse_util.flatten_dict(grads).items()}
    ref_grads = traverse_util.unflatten_dict(
        {k: (0 * v if optim.param_group(list(k)) == "text" else v) for k, v in no_text.items()}
    )
    ref_tx, _ = optim.make_optimizer(cfg, 10, frozen=("text",))
    ref, _ = ref_tx.update(ref_grads, ref_tx.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, updates, ref)

    cfg.heads_lr_mult, cfg.backbone_lr_mult, cfg.text_lr_mult = 0.5, 0.0, 1.0
    tx, _ = optim.make_optimizer(cfg, 10)
    scaled = traverse_util.flatten_dict(tx.update(grads, tx.init(params), params)[0])
    cfg.heads_lr_mult = 1.0
    tx, _ = optim.make_optimizer(cfg, 10)
    plain = traverse_util.flatten_dict(tx.update(grads, tx.init(params), params)[0])
    for k in scaled:
        group = optim.param_group(list(k))
        want = {"heads": 0.5, "backbone": 0.0, "text": 1.0}[group]
        np.testing.assert_allclose(scaled[k], want * plain[k], rtol=1e-6, err_msg=str(k))


# --- the teacher's data


def test_teacher_batches_are_a_pure_function_of_seed_and_step_and_cover_each_epoch():
    n, b = 10, 4
    stream = np.concatenate([teacher.batch_indices(n, b, 3, s) for s in range(5)])
    assert len(stream) == 20
    for epoch in range(2):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    np.testing.assert_array_equal(teacher.batch_indices(n, b, 3, 2), stream[8:12])
    assert not np.array_equal(teacher.batch_indices(n, b, 4, 0), stream[:4])


# --- the teacher stage end to end (tiny config)


def _config(data_dir, arg="full,teacher"):
    config = apply_variant(tiny.get_config(), arg)
    config.data.data_dir = str(data_dir)
    config.mesh.num_devices = 1
    config.teacher.steps = 12
    config.teacher.batch_size = 32
    config.teacher.log_every = 6
    config.teacher.checkpoint_every = 6
    return config


def _state(workdir, config, subdir=""):
    manager = checkpoint.make_manager(workdir / subdir if subdir else workdir, config.checkpoint)
    mesh = Experiment.build(config).mesh
    state = checkpoint.restore_as_saved(manager, manager.latest_step(), mesh, config.mesh)
    manager.close()
    return jax.device_get(state)


@pytest.fixture(scope="module")
def teacher_run(tiny_data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("teacher_straight")
    config = _config(tiny_data_dir)
    config.train.grad_diag_every = 4
    results = trainer.train_and_evaluate(config, str(workdir))
    return workdir, config, results


def test_teacher_stage_trains_logs_and_stays_frozen_through_the_joint_stage(teacher_run):
    workdir, config, results = teacher_run
    assert 0.0 <= results[config.data.test_split]["fused_top1"] <= 1.0
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    taught = [x for x in lines if x["split"] == "teacher"]
    assert [x["step"] for x in taught] == [6, 12]
    assert all(0.0 <= x["validation_top1"] <= 1.0 and np.isfinite(x["loss"]) for x in taught)
    assert taught[-1]["loss"] < taught[0]["loss"] * 1.5
    grad_lines = [x for x in lines if x["split"] == "grad"]
    assert [x["step"] for x in grad_lines] == [0, 4]
    assert all(np.isfinite(v) for x in grad_lines for k, v in x.items() if k != "split")

    final = _state(workdir, config)
    taught_params = _state(workdir, config, teacher.SUBDIR)["params"]
    text = teacher.text_params(final["params"])
    jax.tree.map(np.testing.assert_array_equal, text, taught_params)  # bit-identical
    manager = checkpoint.make_manager(workdir / teacher.SUBDIR, config.checkpoint)
    assert sorted(manager.all_steps()) == [6, 12]
    mesh = Experiment.build(config).mesh
    halfway = checkpoint.restore_as_saved(manager, 6, mesh, config.mesh)["params"]
    manager.close()
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), taught_params, halfway)
    assert max(jax.tree.leaves(moved)) > 0.0  # the teacher trained on after step 6


def test_teacher_stage_resumes_exactly_after_a_kill(tiny_data_dir, tmp_path, monkeypatch):
    """The teacher stage alone, killed at step 6 of 12 and run again, ends bit-identical to an
    uninterrupted stage (its batches are a function of the step; its state is checkpointed)."""
    config = _config(tiny_data_dir)
    exp = Experiment.build(config)
    init = teacher.text_params(exp.initial_state().params)
    rng = jax.random.key(0)
    stage = teacher.TeacherStage(config, exp.model, exp.mesh)
    writer = MetricWriter(tmp_path, enabled=False)
    with loop.StopFlag() as stop:
        straight, _ = stage.run(tmp_path / "a", init, rng, writer, stop)
        monkeypatch.setattr(loop.StopFlag, "should_stop", lambda self, step, every: step == 6)
        assert stage.run(tmp_path / "b", init, rng, writer, stop) == (None, 6)
        monkeypatch.undo()
        resumed, _ = stage.run(tmp_path / "b", init, rng, writer, stop)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(straight))


# Slow: three runs of the trainer; the default run checks the teacher's resume alone (above) and
# the joint stage's (tests/test_trainer.py).
@pytest.mark.slow
def test_kills_in_either_stage_resume_to_the_uninterrupted_run(
    teacher_run, tiny_data_dir, tmp_path, monkeypatch
):
    workdir, config, _ = teacher_run
    # A kill at teacher step 6, then one at joint step 4 (as preemptions would), then the rest.
    for stop_at, stage in ((6, "teacher"), (4, None)):
        monkeypatch.setattr(
            loop.StopFlag, "should_stop", lambda self, step, every, s=stop_at: step == s
        )
        out = trainer.train_and_evaluate(_config(tiny_data_dir), str(tmp_path))
        assert out["preempted_at_step"] == stop_at and out.get("stage") == stage
        monkeypatch.undo()
    trainer.train_and_evaluate(_config(tiny_data_dir), str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, _state(tmp_path, config), _state(workdir, config))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "teacher"] == [6, 12]


def test_distill_from_a_finished_teacher_and_a_warm_started_backbone(
    teacher_run, tiny_data_dir, tmp_path
):
    """distill on the tiny config, its teacher taken from another run (teacher.init_from), its
    backbone warm-started from that run's final checkpoint (model.init_from = a workdir)."""
    workdir, config, _ = teacher_run
    cfg = _config(tiny_data_dir, "distill")
    cfg.teacher.init_from = str(workdir)
    cfg.model.init_from = str(workdir)
    cfg.train.num_steps = 3
    cfg.train.log_every = 1
    exp = Experiment.build(cfg)
    state = jax.device_get(exp.initial_state())
    theirs = _state(workdir, config)
    jax.tree.map(
        np.testing.assert_array_equal, state.params["backbone"], theirs["params"]["backbone"]
    )
    jax.tree.map(
        np.testing.assert_array_equal,
        state.batch_stats["backbone"],
        theirs["batch_stats"]["backbone"],
    )
    results = trainer.train_and_evaluate(cfg, str(tmp_path))
    assert set(results[cfg.data.test_split]) >= {"fused_top1", "visual_top1"}
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert not any(x["split"] == "teacher" for x in lines)  # taken, not trained
    distill = [x["loss/distill"] for x in lines if x["split"] == "train"]
    assert len(distill) == 3 and all(np.isfinite(distill)) and distill[0] > 0
    final = _state(tmp_path, cfg)
    jax.tree.map(
        np.testing.assert_array_equal,
        teacher.text_params(final["params"]),
        teacher.text_params(theirs["params"]),
    )
    # a teacher whose text side differs from the model's is refused, naming the parameter
    wider = jax.tree.map(
        lambda x: np.zeros((*x.shape[:-1], x.shape[-1] + 1), x.dtype),
        teacher.text_params(theirs["params"]),
    )
    with pytest.raises(ValueError, match="does not fit"):
        teacher.with_text_params(theirs["params"], wider)


def test_text_head_without_a_teacher_is_an_error(tiny_data_dir):
    cfg = _config(tiny_data_dir)
    cfg.teacher.steps = 0
    with pytest.raises(ValueError, match=r"config\.teacher\.steps"):
        Experiment.build(cfg)


def test_build_model_reads_the_protocol_fields():
    model = build_model(tiny.get_config("distill").model, 4, 6)
    assert model.use_distill and model.use_text_head and model.freeze_text
    assert model.text_encoder is not None
