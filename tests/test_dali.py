"""data.decoder 'dali': grain draws the same crops, flips and jitter as on the CPU path and DALI
decodes them. The DALI tests run where nvidia-dali is installed (its CPU-only mode), the GPU test
where there is also a GPU; the rest runs everywhere."""

import importlib.util
import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from benchmarks.input_pipeline import photo_like_jpeg
from marnet_jax.data import config as data_config
from marnet_jax.data import dali, decoders, decoding, pipeline
from marnet_jax.train import sharding


def _have_dali() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no nvidia namespace package at all
        return False


HAVE_DALI = _have_dali()
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")
BATCH = 8


def jpeg_source(n: int = 12) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "image": photo_like_jpeg(rng, 320, 240),
            "label": i,
            "ingredients": np.eye(5)[i % 5],
            "image_path": b"x.jpg",
        }
        for i in range(n)
    ]


def data_cfg(decoder: str):
    c = data_config.get_data_config("vireo_food172")
    c.image_size, c.read_threads, c.decoder = 64, 0, decoder
    return c


def batches(decoder: str, src: list[dict], seed: int = 3):
    return pipeline.train_iterator(
        data_cfg(decoder),
        batch_size=BATCH,
        seed=seed,
        shard_index=0,
        shard_count=1,
        data_source=src,
    )


def batch_sharding() -> jax.sharding.NamedSharding:
    """The batch over up to 4 devices (8 CPU devices in the tests, however many GPUs there are)."""
    devices = np.array(jax.devices()[:4]).reshape(-1, 1)
    return sharding.batch_sharding(Mesh(devices, ("data", "fsdp")))


def test_dali_batches_carry_the_boxes_the_cpu_path_crops():
    """With decoder 'dali' grain ships each encoded image and the box the CPU path would crop from
    it (same random stream), with the same jitter, flip, labels and ingredients; cropping those
    boxes on the CPU gives the CPU path's very pixels, across epochs."""
    src = jpeg_source()
    cpu, encoded = batches("cpu", src), batches("dali", src)
    for _ in range(3):  # 36 crops: three epochs of 12 images
        a, b = next(cpu), next(encoded)
        assert "image" not in b and b["crop"].dtype == np.int32 and b["crop"].shape == (BATCH, 4)
        for key in ("jitter", "flip", "label", "ingredients"):
            np.testing.assert_array_equal(a[key], b[key])
        for image, data, box in zip(a["image"], b["encoded"], b["crop"], strict=True):
            crop = decoding.crop_resized(
                data.tobytes(), lambda h, w, box=box: tuple(box), 64, "bilinear"
            )
            np.testing.assert_array_equal(crop, image)


def test_dali_batches_resume_exactly():
    src = jpeg_source()
    it = batches("dali", src)
    reference = [next(it) for _ in range(4)]
    it = batches("dali", src)
    next(it), next(it)
    restored = batches("dali", src)
    restored.set_state(json.loads(json.dumps(it.get_state())))
    for want, got in zip(reference[2:], [next(restored), next(restored)], strict=True):
        np.testing.assert_array_equal(want["crop"], got["crop"])
        for x, y in zip(want["encoded"], got["encoded"], strict=True):
            np.testing.assert_array_equal(x, y)


def test_decoder_errors_name_the_field_and_the_remedy():
    c = data_cfg("nvjpeg")
    with pytest.raises(ValueError, match=r"data.decoder 'nvjpeg'.*\['cpu', 'cpu_decode', 'dali'\]"):
        pipeline.train_iterator(
            c, batch_size=2, seed=0, shard_index=0, shard_count=1, data_source=jpeg_source(4)
        )
    decoded = [{**r, "image": np.zeros((32, 32, 3), np.uint8)} for r in jpeg_source(4)]
    with pytest.raises(ValueError, match="needs encoded images"):
        next(batches("dali", decoded))


@pytest.mark.skipif(HAVE_DALI, reason="nvidia-dali is installed")
def test_dali_missing_says_how_to_install_it():
    with pytest.raises(ImportError, match="pip install nvidia-dali-cuda120"):
        decoders.Dali().on_devices(
            batches("dali", jpeg_source(4)), batch_sharding(), data_cfg("dali")
        )


def test_cpu_decoder_passes_batches_through():
    it = batches("cpu", jpeg_source(4))
    assert decoders.for_config(data_cfg("cpu")).on_devices(it, batch_sharding(), None) is it


def _assert_close_to_cpu_path(make_gpu_crops, mean_tol: float, max_tol: int) -> None:
    src = jpeg_source()
    cpu, crops = batches("cpu", src), make_gpu_crops(batches("dali", src))
    for _ in range(2):
        a, b = next(cpu), next(crops)
        assert b["image"].shape == (BATCH, 64, 64, 3) and b["image"].dtype == np.uint8
        assert b["image"].sharding == batch_sharding()
        diff = np.abs(np.asarray(b["image"], np.int16) - a["image"])
        assert diff.mean() < mean_tol and diff.max() <= max_tol, (diff.mean(), diff.max())
        np.testing.assert_array_equal(a["flip"], b["flip"])


@needs_dali
def test_dali_crops_match_the_cpu_path_and_resume():
    """DALI's decode of each box (its CPU-only mode here) is the CPU path's crop up to decoder and
    resampler rounding, placed under the batch sharding; a position saved through grain's
    checkpoint handler (JSON bytes) resumes the same crops."""

    def make(it):
        return dali.GpuCrops(it, batch_sharding(), data_cfg("dali"), on_cpu=True)

    _assert_close_to_cpu_path(make, mean_tol=0.5, max_tol=8)
    src = jpeg_source()
    it = make(batches("dali", src))
    next(it)
    state = json.dumps(it.get_state()).encode()
    want = next(it)
    restored = make(batches("dali", src))
    restored.set_state(state)
    np.testing.assert_array_equal(np.asarray(next(restored)["image"]), np.asarray(want["image"]))


@needs_dali
def test_dali_without_a_gpu_says_so():
    if jax.default_backend() == "gpu":
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match=r"decodes on GPUs.*data.decoder='cpu'"):
        decoders.Dali().on_devices(
            batches("dali", jpeg_source(4)), batch_sharding(), data_cfg("dali")
        )


@pytest.mark.skipif(
    not HAVE_DALI or jax.default_backend() != "gpu", reason="needs nvidia-dali and a GPU"
)
def test_dali_gpu_crops_match_the_cpu_path():
    """On the GPU (nvJPEG, mixed decoder) the crops are the CPU path's up to decoder rounding."""

    def make(it):
        return dali.GpuCrops(it, batch_sharding(), data_cfg("dali"))

    _assert_close_to_cpu_path(make, mean_tol=1.5, max_tol=24)
