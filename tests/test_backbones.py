"""Vision backbones: shapes, dtypes, parameter counts, BatchNorm modes, conv paths, jit agreement."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from functools import partial

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marnet_jax import cpu
from marnet_jax.models import resnet, vit
from marnet_jax.models.backbones import BACKBONES, build_backbone, feature_dim

TINY_RESNET = dict(width=0.0625, stem="small")  # base width 4
TINY_VIT = dict(width=32, depth=2, mlp_dim=64, num_heads=2)


def _images(batch: int, size: int, seed: int = 0) -> jax.Array:
    # numpy, not jax.random: XLA CPU compiles rank-4 threefry draws slowly (see models/layers.py).
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)


def _num_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_init(model, size: int):
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


@pytest.mark.parametrize(
    "name,size,expected",
    [
        # torchvision / timm totals minus the 1000-class head (timm's ViT also minus the class
        # token's position embedding, which this layout folds into 'cls').
        ("resnet18", 64, 11_689_512 - 513_000),
        ("resnet34", 64, 21_797_672 - 513_000),
        ("resnet50", 64, 25_557_032 - 2_049_000),
        ("resnet101", 64, 44_549_160 - 2_049_000),
        ("vit_ti16", 224, 5_717_416 - 193_000 - 192),
        ("vit_s16", 224, 22_050_664 - 385_000 - 384),
        ("vit_b16", 224, 86_567_656 - 769_000 - 768),
        # EfficientNet-Lite0's PyTorch port minus its 1000-class _fc.
        ("efficientnet_lite0", 224, 4_652_008 - 1_281_000),
    ],
)
def test_full_size_parameter_counts(name, size, expected):
    variables = _abstract_init(build_backbone(name), size)
    assert _num_params(variables["params"]) == expected
    for leaf in jax.tree.leaves(variables["params"]):
        assert leaf.dtype == jnp.float32


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_tiny_output_shape_dtype(name):
    kwargs = (
        TINY_RESNET if name.startswith("resnet") else TINY_VIT if name.startswith("vit") else {}
    )
    bf16 = ("resnet18", "resnet50", "vit_ti16", "efficientnet_lite0")
    dtypes = (jnp.float32, jnp.bfloat16) if name in bf16 else ()
    for dtype in dtypes or (jnp.float32,):
        model = build_backbone(name, dtype=dtype, **kwargs)
        x = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
        variables = jax.eval_shape(lambda x, m=model: m.init(jax.random.key(0), x, train=False), x)
        out = jax.eval_shape(lambda v, x, m=model: m.apply(v, x, train=False), variables, x)
        assert out.shape == (3, feature_dim(name, **kwargs))
        assert out.dtype == jnp.float32
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("stem,stem_stride,layer1_size", [("small", 1, 64), ("small", 2, 32)])
def test_stem_map_sizes(stem, stem_stride, layer1_size):
    model = build_backbone("resnet18", stem=stem, stem_stride=stem_stride, width=0.0625)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    variables = _abstract_init(model, 64)
    _, state = jax.eval_shape(
        lambda v, x: model.apply(
            v, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        ),
        variables,
        x,
    )
    layer1 = state["intermediates"]["layer1"]["__call__"][0]
    assert layer1.shape == (1, layer1_size, layer1_size, 4)
    layer4 = state["intermediates"]["layer4"]["__call__"][0]
    assert layer4.shape == (1, layer1_size // 8, layer1_size // 8, 32)


def test_unknown_backbone_lists_known_names():
    with pytest.raises(ValueError, match=r"resnet18.*vit_b16"):
        build_backbone("resnet999")


def test_feature_dims():
    assert feature_dim("resnet18") == 512
    assert feature_dim("resnet50") == 2048
    assert feature_dim("resnet50", width=0.5) == 1024
    assert feature_dim("vit_s16") == 384
    assert feature_dim("efficientnet_lite3") == 1280


def _tiny_resnet(**kwargs) -> resnet.ResNet:
    """One BasicBlock per stage, base width 4: every code path of ResNet-18/34, compiled quickly."""
    fields = dict(stage_sizes=(1, 1, 1, 1), block=resnet.BasicBlock, width=0.0625, stem="small")
    fields.update(kwargs)
    return resnet.ResNet(**fields)


def _jit_init(model, x):
    return jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)


def _numpy_init(model, x, seed: int = 0):
    """Variables of model's structure filled on the host with numpy (no XLA compile of an init).

    Kernels/embeddings ~ N(0, 1 / fan_in); BN/LN scales and running variances near 1; biases and
    running means small. For tests that need sensible values, not the module's own initializers.
    """
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)

    def fill(path, leaf):
        name = path[-1].key
        shape = leaf.shape
        if name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name in ("bias", "mean", "cls"):
            value = 0.1 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(max(np.prod(shape[:-1]), 1))
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@functools.cache
def _tiny_resnet_setup():
    """(model, images [2, 16, 16, 3], variables): initialised once for the tests below."""
    model, x = _tiny_resnet(), _images(2, 16)
    return model, x, _numpy_init(model, x)


@pytest.fixture(scope="module")
def tiny_resnet():
    return _tiny_resnet_setup()


@pytest.fixture(scope="module")
def tiny_vit():
    model, x = build_backbone("vit_ti16", dropout=0.5, **TINY_VIT), _images(2, 32)
    return model, x, _jit_init(model, x)


def test_resnet18_small_stem_64px_forward_and_bn_modes():
    """Full-width ResNet-18, small stem, 64 px: real forward; BN stats move only in train mode."""
    model = build_backbone("resnet18", stem="small")
    x = _images(2, 64)
    variables = _jit_init(model, x)
    params = variables["params"]
    assert set(params) == {"conv_init", "bn_init", "layer1", "layer2", "layer3", "layer4"}
    assert set(params["layer2"]["block0"]) == {
        "conv1",
        "bn1",
        "conv2",
        "bn2",
        "downsample_conv",
        "downsample_bn",
    }
    assert set(params["layer1"]["block1"]) == {"conv1", "bn1", "conv2", "bn2"}
    assert params["conv_init"]["kernel"].shape == (3, 3, 3, 64)
    assert set(variables["batch_stats"]["layer4"]["block1"]["bn2"]) == {"mean", "var"}

    @jax.jit
    def run(x):
        # Eval mode runs without mutable collections: it never writes batch_stats.
        eval_out = model.apply(variables, x, train=False)
        train_out, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return eval_out, train_out, state

    eval_out, train_out, new_state = run(x)
    chex.assert_shape([eval_out, train_out], (2, 512))
    chex.assert_tree_all_finite([eval_out, train_out])
    # momentum 0.9: new = 0.9 * old + 0.1 * batch mean (the old mean is 0 at init).
    stem = jax.lax.conv_general_dilated(
        x,
        params["conv_init"]["kernel"],
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    new_mean = new_state["batch_stats"]["bn_init"]["mean"]
    np.testing.assert_allclose(new_mean, 0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    # Eval mode reads the running stats: an example's output does not depend on the rest of its
    # batch. In train mode it does (batch statistics).
    x2 = x.at[1].set(_images(1, 64, seed=5)[0])
    eval_out2, train_out2, _ = run(x2)
    np.testing.assert_allclose(eval_out2[0], eval_out[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(train_out2[0], train_out[0], atol=1e-3)
    # Train mode must be allowed to write batch_stats.
    with pytest.raises(flax.errors.ModifyScopeVariableError):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True), variables, x)


def test_bf16_compute_keeps_float32_params(tiny_resnet):
    f32_model, x, variables = tiny_resnet
    model = _tiny_resnet(dtype=jnp.bfloat16)

    @jax.jit
    def run(v, x):
        out, state = model.apply(
            v, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
        return out, state, f32_model.apply(v, x, train=False)

    out, state, ref = run(variables, x)
    assert out.dtype == jnp.float32
    inter = flax.traverse_util.flatten_dict(state["intermediates"])
    for key in [("layer1", "block0", "bn1"), ("layer4", "block0", "conv2"), ("conv_init",)]:
        assert inter[(*key, "__call__")][0].dtype == jnp.bfloat16, key
    bf16_vars = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bf16_vars))
    np.testing.assert_allclose(out, ref, rtol=0.1, atol=0.1)


def test_zero_init_residual():
    x = _images(1, 4)
    norm = partial(flax.linen.BatchNorm, use_running_average=True)
    blocks = {
        "bn2": resnet.BasicBlock(features=2, strides=2, norm=norm, zero_init_residual=True),
        "bn3": resnet.Bottleneck(features=2, strides=2, norm=norm, zero_init_residual=True),
    }
    inits = jax.jit(lambda x: {k: m.init(jax.random.key(0), x) for k, m in blocks.items()})(x)
    for last, variables in inits.items():
        params = variables["params"]
        np.testing.assert_array_equal(params[last]["scale"], 0.0)
        np.testing.assert_array_equal(params["bn1"]["scale"], 1.0)
        assert "downsample_conv" in params
    for zero in (True, False):
        tree = _abstract_init(build_backbone("resnet50", zero_init_residual=zero), 32)
        assert "bn3" in tree["params"]["layer1"]["block0"]


# (map size, in, out, kernel, stride): the cases a ResNet meets, incl. maps smaller than the kernel.
CONV_CASES = [(9, 3, 4, 7, 2), (8, 3, 5, 3, 1), (8, 4, 6, 3, 2), (9, 4, 6, 1, 2), (2, 5, 3, 3, 1)]
CONV_CASES += [(1, 5, 3, 3, 1), (3, 4, 4, 3, 2), (6, 4, 5, 1, 1), (9, 3, 4, 7, 1)]


def test_conv_impls_agree_with_flax_conv():
    """Conv2D with impl 'xla', 'auto' and 'cpu' (im2col for maps under the kernel size, kernel
    gradients of stride-1 convs with the output gradient as the image) match nn.Conv with torch
    padding k // 2 on both sides (flax 'SAME' would pad stride-2 convs 0/1): values and gradients."""
    for i, (size, cin, cout, k, stride) in enumerate(CONV_CASES):
        rng = np.random.default_rng(i)
        x = jnp.asarray(rng.standard_normal((2, size, size, cin)), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
        ref = flax.linen.Conv(
            cout, (k, k), strides=stride, padding=[(k // 2, k // 2)] * 2, use_bias=False
        )
        models = [ref] + [resnet.Conv2D(cout, k, stride, impl=i) for i in ("xla", "auto", "cpu")]

        @jax.jit
        def run(kernel, x, models=models):
            def loss(kernel, x, m):
                return jnp.sum(jnp.sin(m.apply({"params": {"kernel": kernel}}, x)))

            return [jax.value_and_grad(loss, argnums=(0, 1))(kernel, x, m) for m in models]

        expected, *outs = run(kernel, x)
        for out in outs:
            chex.assert_trees_all_close(out, expected, rtol=1e-4, atol=1e-4, custom_message=str(i))


def test_unknown_options_raise():
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)

    def init(model):
        return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)

    with pytest.raises(ValueError, match="stem"):
        init(build_backbone("resnet18", stem="huge", width=0.0625))
    with pytest.raises(ValueError, match="conv_impl"):
        init(build_backbone("resnet18", conv_impl="fft", width=0.0625))
    with pytest.raises(ValueError, match="pool_type"):
        init(build_backbone("vit_ti16", pool_type="max", **TINY_VIT))
    x = jax.ShapeDtypeStruct((1, 20, 20, 3), jnp.float32)
    with pytest.raises(ValueError, match="multiple of patch"):
        init(build_backbone("vit_ti16", **TINY_VIT))


def test_vit_tiny_forward_and_dropout(tiny_vit):
    model, x, variables = tiny_vit
    params = variables["params"]
    assert set(params) == {"embedding", "pos_embedding", "cls", "Transformer"}
    block = params["Transformer"]["encoderblock_1"]
    assert set(block) == {
        "LayerNorm_0",
        "MultiHeadDotProductAttention_0",
        "LayerNorm_1",
        "MlpBlock_0",
    }
    assert block["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape == (32, 2, 16)
    assert params["embedding"]["kernel"].shape == (16, 16, 3, 32)
    assert params["pos_embedding"].shape == (1, 4, 32)

    x = x.at[1].set(x[0])

    @jax.jit
    def run(v, x):
        drop = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(3)})
        return model.apply(v, x, train=False), drop

    out, drop = run(variables, x)
    chex.assert_shape([out, drop], (2, 32))
    chex.assert_tree_all_finite([out, drop])
    # Same image, same features (rounding aside: XLA's CPU conv may tile batch rows differently).
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(drop[0], drop[1])  # independent dropout masks per example
    assert not np.allclose(out, drop)


def test_vit_gap_sincos():
    model = build_backbone("vit_ti16", pool_type="gap", posemb="sincos2d", **TINY_VIT)
    x = _images(2, 32)
    variables = _numpy_init(model, x)
    assert set(variables["params"]) == {"embedding", "Transformer"}
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    chex.assert_shape(out, (2, 32))
    chex.assert_tree_all_finite(out)
    pe = vit.posemb_sincos_2d(2, 2, 8)
    assert pe.shape == (1, 4, 8)
    np.testing.assert_allclose(pe[0, 0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)  # sin 0, cos 0


def test_vit_remat_same_gradients(tiny_vit):
    model, x, variables = tiny_vit
    remat = build_backbone("vit_ti16", remat=True, dropout=0.5, **TINY_VIT)

    @jax.jit
    def grads(v):
        return [
            jax.grad(lambda v, m=m: jnp.sum(m.apply(v, x, train=False) ** 2))(v)
            for m in (model, remat)
        ]

    g1, g2 = grads(variables)
    chex.assert_trees_all_close(g1, g2, rtol=1e-4, atol=1e-6)


class JitAgreementTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_resnet(self):
        model, x, variables = _tiny_resnet_setup()

        def fn(v, x):
            return model.apply(v, x, train=False)

        expected = jax.jit(fn)(variables, x)
        chex.assert_trees_all_close(self.variant(fn)(variables, x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_resnet50_imagenet_224_forward():
    model = build_backbone("resnet50")
    x = _images(2, 224)
    variables = _jit_init(model, x)
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    chex.assert_shape(out, (2, 2048))
    chex.assert_tree_all_finite(out)
    assert out.dtype == jnp.float32


def test_cpu_conv_flag_is_added_unless_the_user_set_it():
    add = cpu.xla_flags_with_cpu_conv
    flag = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
    assert add("", "0.10.2") == flag
    assert add("--xla_force_host_platform_device_count=8", "0.10.2").split() == [
        "--xla_force_host_platform_device_count=8",
        flag,
    ]
    own = "--xla_cpu_experimental_ynn_fusion_type=+reduce"
    assert add(own, "0.10.2") == own
    assert add("", "0.11.0") == ""  # a jaxlib that may not know the flag is left alone


def test_entry_points_keep_convolutions_on_xlas_own_cpu_path():
    """Importing the package leaves XLA_FLAGS alone; after cpu.configure_xla (what the entry points
    call) the ResNet's convolutions (forward and both gradients) compile to XLA's own CPU
    convolution, not a YNNPACK fusion (slower on these models: benchmarks.backbones)."""
    code = (
        "import os, marnet_jax.models, marnet_jax.train.trainer\n"
        "assert 'ynn' not in os.environ.get('XLA_FLAGS', ''), os.environ['XLA_FLAGS']\n"
        "from marnet_jax import cpu\n"
        "cpu.configure_xla()\n"
        "import jax, jax.numpy as jnp\n"
        "from marnet_jax.models import layers\n"
        "f = lambda x, k: jnp.sum(layers.conv_nhwc(x, k, 1, 1) ** 2)\n"
        "g = jax.jit(jax.grad(f, argnums=(0, 1)))\n"
        "hlo = g.lower(jnp.ones((4, 8, 8, 4)), jnp.ones((3, 3, 4, 4))).compile().as_text()\n"
        "print('convolutions', hlo.count(' convolution('), 'ynn', hlo.count('__ynn'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["convolutions", "3", "ynn", "0"], out
