"""Input pipeline: batch format, augmentation determinism, sharding, iterator state, padding."""

import io

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from marnet_jax.data import config as data_config
from marnet_jax.data import datasets, decoders, decoding, photometric, pipeline
from marnet_jax.testing import fixtures
from marnet_jax.train import steps

SIZE = 32
V = 6


def memory_source(n: int, *, height: int = SIZE, width: int = SIZE, fmt: str = "PNG", solid=None):
    """In-memory records shaped like the tfds ones; label = record index (identifies records)."""
    rng = np.random.default_rng(n)
    records = []
    for i in range(n):
        if solid is None:
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        else:
            pixels = np.broadcast_to(np.asarray(solid, np.uint8), (height, width, 3))
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format=fmt)
        records.append(
            {
                "image": buf.getvalue(),
                "label": i,
                "ingredients": (np.arange(V) == i % V).astype(np.uint8),
                "image_path": f"img/{i}.png".encode(),
            }
        )
    return records


def cfg(**overrides):
    c = data_config.get_data_config("synthetic_food/tiny")
    c.read_threads = 0
    c.cache_decoded = False  # the records' own path; the cache's tests turn it on
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def no_augment(c):
    c.augment.random_resized_crop = False
    c.augment.horizontal_flip = False
    c.augment.color_jitter = False
    return c


def take(it, k):
    return [next(it) for _ in range(k)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_config_presets():
    assert data_config.get_data_config().image_size == 64
    assert data_config.get_data_config("synthetic_food/tiny").image_size == 32
    real = data_config.get_data_config("ingredient101")
    assert (real.builder_config, real.image_size, real.eval_crop_ratio) == ("full", 224, 0.875)
    with pytest.raises(ValueError):
        data_config.get_data_config("imagenet")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_batch_format_and_normalisation(dtype):
    colour = (200, 100, 30)
    src = memory_source(12, solid=colour)
    c = no_augment(cfg(dtype=dtype))
    batch = next(
        pipeline.train_iterator(
            c, batch_size=4, seed=0, shard_index=0, shard_count=1, data_source=src
        )
    )
    assert set(batch) == {"image", "label", "ingredients"}  # No 'image_path' in training batches.
    assert batch["image"].shape == (4, SIZE, SIZE, 3)
    assert batch["image"].dtype == np.uint8  # the host ships crops; the train step normalises
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (4,)
    assert batch["ingredients"].dtype == np.float32 and batch["ingredients"].shape == (4, V)
    np.testing.assert_array_equal(batch["ingredients"][np.arange(4), batch["label"] % V], 1.0)
    images = steps.model_input(batch, c)
    assert images.dtype == jnp.dtype(dtype)
    expected = (np.asarray(colour) / 255.0 - np.asarray(c.mean)) / np.asarray(c.std)
    got = np.asarray(images, np.float32)
    np.testing.assert_allclose(
        got, np.broadcast_to(expected, got.shape), atol=1e-2 if dtype == "bfloat16" else 1e-5
    )


def test_augmentations_change_images_but_keep_format():
    src = memory_source(8, height=48, width=40, fmt="JPEG")
    c = cfg()
    batch = next(
        pipeline.train_iterator(
            c, batch_size=8, seed=1, shard_index=0, shard_count=1, data_source=src
        )
    )
    assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["jitter"].shape == (8, 3)
    assert batch["flip"].shape == (8,) and batch["flip"].dtype == np.bool_
    plain = next(
        pipeline.eval_batches(
            no_augment(cfg(eval_crop_ratio=1.0)),
            batch_size=8,
            shard_index=0,
            shard_count=1,
            data_source=src,
        )
    )
    order = np.argsort(batch["label"])
    assert not np.allclose(np.asarray(steps.model_input(batch, c))[order], plain["image"])


def test_resize_centre_crop_geometry():
    t = pipeline.ResizeCentreCrop(32, crop_ratio=0.875)
    # 64 x 96 image: shorter side 64 -> 32 / 0.875 = 36.6; the 32 crop covers 56 px of the original.
    assert t.crop_box(64, 96) == (20, 4, 76, 60)
    image = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    same = pipeline.ResizeCentreCrop(32, crop_ratio=1.0).map({"image": image})["image"]
    assert same is image  # Identity for pre-sized images.
    out = t.map({"image": np.zeros((50, 70, 3), np.uint8)})["image"]
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_random_resized_crop_box_within_bounds():
    t = pipeline.RandomResizedCrop(16, scale=(0.2, 1.0), ratio=(0.5, 2.0))
    rng = np.random.default_rng(0)
    for h, w in [(20, 30), (100, 10), (7, 7)]:
        for _ in range(50):
            left, top, right, bottom = t.crop_box(h, w, rng)
            assert 0 <= left < right <= w and 0 <= top < bottom <= h


def test_random_resized_crop_box_statistics():
    """Inception-style boxes on a square image: area fraction in the scale range, aspect
    log-uniform in the ratio range (symmetric about 1), and the area fraction distributed as
    uniform draws with the boxes that do not fit redrawn (58 % below the range's midpoint)."""
    t = pipeline.RandomResizedCrop(32)  # scale (0.08, 1), ratio (3/4, 4/3)
    rng = np.random.default_rng(0)
    boxes = np.asarray([t.crop_box(256, 256, rng) for _ in range(4000)], np.float64)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area, log_aspect = w * h / 256**2, np.log(w / h)
    assert area.min() > 0.075 and area.max() <= 1.0
    assert np.all(np.abs(log_aspect) <= np.log(4 / 3) + 0.01)
    assert abs(log_aspect.mean()) < 0.01
    assert 0.55 < np.mean(area < 0.54) < 0.62


def test_color_jitter_factors_and_pil_semantics():
    """The host draws the factors; the train step's float jitter is PIL's ImageEnhance Brightness
    -> Contrast -> Color (torchvision's semantics) up to PIL's truncation to uint8 after each of the
    three steps (< 1 level each)."""
    from PIL import Image, ImageEnhance

    drawn = pipeline.ColorJitter(0.5, 0.0, 0.3).random_map({}, np.random.default_rng(3))
    u = np.random.default_rng(3).uniform(-1.0, 1.0, 3)
    np.testing.assert_allclose(drawn["jitter"], [1 + 0.5 * u[0], 1.0, 1 + 0.3 * u[2]], rtol=1e-6)
    assert drawn["jitter"].dtype == np.float32

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    factors = rng.uniform(0.5, 1.5, (6, 3)).astype(np.float32)
    out = np.asarray(photometric.color_jitter(images, factors))
    for image, f, got in zip(images, factors, out):
        img = Image.fromarray(image)
        for enhancer, factor in zip(
            (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), f
        ):
            img = enhancer(img).enhance(float(factor))
        np.testing.assert_allclose(got, np.asarray(img, np.float32), atol=3.5)
    grey = np.full((2, 8, 8, 3), 90, np.uint8)
    flat = photometric.color_jitter(grey, np.asarray([[1.0, 1.4, 0.6], [1.0, 0.7, 1.3]]))
    np.testing.assert_allclose(flat, grey, atol=1e-4)  # Contrast/saturation keep flat grey.


def test_brightened_mean_grey_is_the_clipped_mean_luma():
    """The level the contrast blend pulls towards: the mean luma of min(x * brightness, 255)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 24, 20, 3), dtype=np.uint8)
    brightness = np.asarray([0.8, 1.0, 1.2, 1.9], np.float32)
    expected = [
        np.mean(np.minimum(x * np.float64(b), 255.0) @ np.asarray(photometric.LUMA))
        for x, b in zip(images, brightness)
    ]
    got = photometric.brightened_mean_grey(images, brightness)
    assert got.shape == (4,) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_flip_draws_are_fair_and_mirror_in_the_train_step():
    """RandomFlip draws a flip for about half the images and leaves the pixels alone; the train
    step mirrors exactly those."""
    flips = np.asarray(
        [
            pipeline.RandomFlip().random_map({}, np.random.default_rng(i))["flip"]
            for i in range(2000)
        ]
    )
    assert flips.dtype == np.bool_ and 0.46 < flips.mean() < 0.54
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    out = np.asarray(photometric.flip(images, np.asarray([True, False])))
    np.testing.assert_array_equal(out[0], images[0, :, ::-1])
    np.testing.assert_array_equal(out[1], images[1])


def _photo_jpeg(width=512, height=384, seed=0):
    """Smooth colour gradients with mild noise, as JPEG (random pixels would not survive DCT
    scaling and say nothing about it)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    image = np.stack([x, y, (x + y) / 2], -1) * rng.uniform(100, 255, 3)
    image += rng.normal(0, 3, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_random_resized_crop_from_bytes_draws_the_same_box_and_decodes_only_what_it_needs():
    """From encoded bytes the crop draws the same box (the header's size, the same random draws)
    as from the decoded image; a JPEG box that spans several times the output is decoded at a
    reduced DCT scale, which changes pixels by little; a small box gives the very same pixels."""
    jpeg = _photo_jpeg()
    decoded = pipeline.DecodeImage().map({"image": jpeg})["image"]
    for size, scale, exact in ((224, (0.05, 0.1), True), (48, (0.8, 1.0), False)):
        t = pipeline.RandomResizedCrop(size, scale=scale)
        for seed in range(5):
            from_bytes = t.random_map({"image": jpeg}, np.random.default_rng(seed))["image"]
            from_array = t.random_map({"image": decoded}, np.random.default_rng(seed))["image"]
            assert from_bytes.shape == (size, size, 3) and from_bytes.dtype == np.uint8
            diff = np.abs(from_bytes.astype(np.int16) - from_array.astype(np.int16))
            if exact:
                np.testing.assert_array_equal(from_bytes, from_array)
            else:
                assert diff.mean() < 2.0 and diff.max() < 40, (seed, diff.mean(), diff.max())
    whole = pipeline.RandomResizedCrop(48, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))
    box = whole.crop_box(384, 512, np.random.default_rng(0))
    assert decoding.dct_factor(512, 384, box, 48) == 8  # the box still spans >= 48 px each way


def test_resize_centre_crop_from_bytes_matches_the_decoded_image():
    """Evaluation (and predict) crop the encoded image: a PNG, or a JPEG whose centre box is less
    than twice the output, gives the very pixels of cropping the decoded image; a large JPEG is
    decoded at a reduced DCT scale, which changes pixels by little."""
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), np.uint8)).save(
        png, format="PNG"
    )
    for data, size in ((png.getvalue(), 32), (_photo_jpeg(), 224)):
        t = pipeline.ResizeCentreCrop(size, crop_ratio=0.875)
        decoded = pipeline.DecodeImage().map({"image": data})["image"]
        from_bytes = t.map({"image": data})["image"]
        np.testing.assert_array_equal(from_bytes, t.map({"image": decoded})["image"])
    jpeg, t = _photo_jpeg(), pipeline.ResizeCentreCrop(64, crop_ratio=0.875)
    decoded = pipeline.DecodeImage().map({"image": jpeg})["image"]
    diff = np.abs(
        t.map({"image": jpeg})["image"].astype(np.int16)
        - t.map({"image": decoded})["image"].astype(np.int16)
    )
    assert 0 < diff.mean() < 2.0 and diff.max() < 40, (diff.mean(), diff.max())
    # The 336-px centre box spans 84 px at 1/4: still >= 64.
    assert decoding.dct_factor(512, 384, t.crop_box(384, 512), 64) == 4


def _jpeg(image: np.ndarray | Image.Image, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(
        buf, format="JPEG", **save_kwargs
    )
    return buf.getvalue()


def test_jpeg_decode_gives_pils_pixels_at_every_dct_scale():
    """The fast JPEG decode (simplejpeg) gives exactly PIL's pixels, at full and reduced DCT scales
    (odd sizes round up alike), for colour subsamplings, progressive and grey JPEGs; a CMYK JPEG
    goes through PIL, which converts it; bytes libjpeg cannot read raise PIL's error."""
    photo = Image.open(io.BytesIO(_photo_jpeg(333, 251)))
    cases = [
        _jpeg(photo, quality=90),
        _jpeg(photo, quality=80, subsampling=0),
        _jpeg(photo, quality=80, progressive=True),
        _jpeg(photo.convert("L"), quality=90),
    ]
    for data in cases:
        for factor in (1, 2, 4, 8):
            fast = decoding.decode(data, factor)
            assert isinstance(fast, np.ndarray), "YCbCr and grey JPEGs take the fast decode"
            with decoding.open_image(data) as img:
                if factor > 1:
                    img.draft("RGB", (img.width // factor, img.height // factor))
                np.testing.assert_array_equal(fast, np.asarray(img.convert("RGB")))
            assert fast.shape == (-(-251 // factor), -(-333 // factor), 3)
    cmyk = _jpeg(photo.convert("CMYK"), quality=95)
    decoded = np.asarray(decoding.decode(cmyk))
    reference = np.asarray(photo.convert("CMYK").convert("RGB"), np.int16)
    assert decoded.shape == (251, 333, 3) and np.abs(decoded - reference).mean() < 3
    with pytest.raises(OSError):
        decoding.decode(cases[0][:200])


@pytest.mark.parametrize("decoder", ["cpu", "cpu_decode"])
def test_train_batches_of_jpegs_are_deterministic_and_resume_exactly(decoder):
    src = [
        {"image": _photo_jpeg(seed=i), "label": i, "ingredients": np.eye(V)[i % V]}
        for i in range(6)
    ]
    c = cfg(shuffle=True, decoder=decoder)
    kwargs = dict(batch_size=3, seed=5, shard_index=0, shard_count=1, data_source=src)
    reference = take(pipeline.train_iterator(c, **kwargs), 4)
    assert_same_batches(reference, take(pipeline.train_iterator(c, **kwargs), 4))
    it = pipeline.train_iterator(c, **kwargs)
    take(it, 2)
    restored = pipeline.train_iterator(c, **kwargs)
    restored.set_state(pipeline.state_from_json(pipeline.state_to_json(it.get_state())))
    assert_same_batches(take(restored, 2), reference[2:])


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "lanczos"])
def test_resize_crops_is_pils_resize_of_the_box(interpolation):
    """The accelerator's resize (data.decoder 'cpu_decode') gives PIL's Image.resize(box=...) of a
    canvas's pixels: shrinking and enlarging, boxes at the image's edge (where the filter is cut
    off and renormalised) and inside it, whatever lies in the canvas beyond the extent."""
    rng = np.random.default_rng(0)
    resample = decoding.resample(interpolation)
    canvas, size, canvases, boxes, extents, expected = 96, 24, [], [], [], []
    for i in range(12):
        height, width = (int(v) for v in rng.integers(20, canvas + 1, 2))
        photo = np.asarray(Image.open(io.BytesIO(_photo_jpeg(width, height, seed=i))))
        left, top = rng.uniform(0, width / 2), rng.uniform(0, height / 2)
        box = (left, top, rng.uniform(left + 4, width), rng.uniform(top + 4, height))
        if i % 3 == 0:
            box = (0.0, 0.0, float(width), float(height))  # the whole image, edges on all sides
        expected.append(np.asarray(Image.fromarray(photo).resize((size, size), resample, box=box)))
        padded = rng.integers(0, 256, (canvas, canvas, 3), dtype=np.uint8)  # junk beyond extent
        padded[:height, :width] = photo
        canvases.append(padded)
        boxes.append(box)
        extents.append((height, width))
    out = photometric.resize_crops(
        jnp.asarray(np.stack(canvases)),
        jnp.asarray(boxes, jnp.float32),
        jnp.asarray(extents, jnp.int32),
        size,
        interpolation,
    )
    assert out.shape == (12, size, size, 3) and out.dtype == jnp.float32
    diff = np.abs(np.asarray(out) - np.stack(expected).astype(np.float32))
    # PIL rounds between its two passes and picks their order; a sum on a rounding tie may go
    # the other way.
    assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_cpu_decode_ships_the_boxes_that_the_train_step_resizes_to_the_cpu_crops():
    """data.decoder 'cpu_decode' draws what 'cpu' draws (boxes, flips, jitter) and ships each
    box's decoded pixels in a fixed canvas; resized in the train step they are the 'cpu' crops
    (within one level where PIL's two rounded passes tie). A box too wide for the canvas is
    resized on the host and shipped as the identity box; an unsupported filter is refused."""
    src = [
        {"image": _photo_jpeg(seed=i), "label": i, "ingredients": np.eye(V)[i % V]}
        for i in range(8)
    ]
    c = data_config.get_data_config("vireo_food172")
    c.read_threads, c.image_size = 0, 64
    kwargs = dict(batch_size=8, seed=3, shard_index=0, shard_count=1, data_source=src)
    crops = next(pipeline.train_iterator(c, **kwargs))
    c.decoder = "cpu_decode"
    shipped = next(pipeline.train_iterator(c, **kwargs))
    canvas = decoders.canvas_size(64)
    assert shipped["image"].shape == (8, canvas, canvas, 3) and shipped["image"].dtype == np.uint8
    assert shipped["box"].dtype == np.float32 and shipped["extent"].dtype == np.int32
    for key in ("flip", "jitter", "label", "ingredients"):
        np.testing.assert_array_equal(shipped[key], crops[key])
    resized = photometric.resize_crops(
        jnp.asarray(shipped["image"]), shipped["box"], shipped["extent"], 64, "bilinear"
    )
    diff = np.abs(np.asarray(resized) - crops["image"].astype(np.float32))
    assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())
    np.testing.assert_array_equal(
        steps.model_input(shipped, c),
        photometric.train_images(np.asarray(resized, np.uint8), crops, c),
    )

    wide = np.asarray(Image.open(io.BytesIO(_photo_jpeg(512, 200))))
    t = pipeline.RandomResizedCrop(32, scale=(1.0, 1.0), ratio=(2.56, 2.56))
    element = decoders.CanvasCrop(t).random_map({"image": wide}, np.random.default_rng(0))
    np.testing.assert_array_equal(element["box"], [0, 0, 32, 32])  # 512 px wide: no 80-px canvas
    host = t.random_map({"image": wide}, np.random.default_rng(0))["image"]
    same = photometric.resize_crops(
        jnp.asarray(element["image"][None]),
        element["box"][None],
        element["extent"][None],
        32,
        "bilinear",
    )
    np.testing.assert_array_equal(np.asarray(same[0]), host)
    with pytest.raises(ValueError, match=r"data\.interpolation is 'nearest'"):
        decoders.CanvasCrop(pipeline.RandomResizedCrop(32, interpolation="nearest"))


@pytest.mark.parametrize("decoder", ["cpu", "cpu_decode"])
def test_train_image_size_sizes_the_training_crops_only(decoder):
    """data.train_image_size: the train step's input is that size, from the same draws as at
    image_size (labels, flips, jitter); evaluation batches stay at image_size."""
    src = memory_source(16, height=48, width=48)
    kwargs = dict(batch_size=8, seed=3, shard_index=0, shard_count=1, data_source=src)
    small, full = cfg(decoder=decoder, train_image_size=24), cfg(decoder=decoder)
    a = next(pipeline.train_iterator(small, **kwargs))
    b = next(pipeline.train_iterator(full, **kwargs))
    assert steps.model_input(a, small).shape == (8, 24, 24, 3)
    assert steps.model_input(b, full).shape == (8, SIZE, SIZE, 3)
    for key in ("label", "flip", "jitter"):
        np.testing.assert_array_equal(a[key], b[key])
    ev = next(
        pipeline.eval_batches(small, batch_size=8, shard_index=0, shard_count=1, data_source=src)
    )
    assert ev["image"].shape == (8, SIZE, SIZE, 3)
    with pytest.raises(ValueError, match=r"data\.train_image_size must be a positive int"):
        data_config.train_image_size(cfg(train_image_size=-1))


@pytest.mark.parametrize("decoder", ["cpu", "cpu_decode"])
def test_cache_decoded_gives_the_batches_of_the_encoded_records_and_resumes(decoder):
    src = memory_source(24, height=40, width=36)
    kwargs = dict(batch_size=5, seed=3, shard_index=1, shard_count=2, data_source=src)
    records = take(pipeline.train_iterator(cfg(decoder=decoder), **kwargs), 7)
    cached_cfg = cfg(decoder=decoder, cache_decoded=True, read_threads=2)
    assert_same_batches(take(pipeline.train_iterator(cached_cfg, **kwargs), 7), records)
    it = pipeline.train_iterator(cached_cfg, **kwargs)
    take(it, 3)
    restored = pipeline.train_iterator(cached_cfg, **kwargs)
    restored.set_state(pipeline.state_from_json(pipeline.state_to_json(it.get_state())))
    assert_same_batches(take(restored, 4), records[3:])


def test_decoded_source_decodes_every_record_once_and_keeps_the_rest():
    src = memory_source(6, height=20, width=30)
    cached = pipeline.DecodedSource(src, threads=2)
    assert len(cached) == 6 and cached.nbytes() == 6 * 20 * 30 * 3
    for record, decoded in zip(src, (cached[i] for i in range(6))):
        np.testing.assert_array_equal(
            decoded["image"], np.asarray(Image.open(io.BytesIO(record["image"])))
        )
        assert decoded["label"] == record["label"] and decoded["image_path"] == record["image_path"]
    assert pipeline.DecodedSource(cached)[2]["image"] is cached[2]["image"]  # decoded stays as is


def test_cache_decoded_is_refused_when_the_split_would_fill_the_memory(monkeypatch):
    src = memory_source(4)  # 32 x 32 x 3 bytes each once decoded: 12 KiB in all
    monkeypatch.setattr(pipeline, "available_memory", lambda: 20 * 1024)
    with pytest.raises(ValueError, match=r"cache_decoded=True would keep .* more than half"):
        pipeline.cached_decoded(src, cfg(cache_decoded=True))
    monkeypatch.setattr(pipeline, "available_memory", lambda: 30 * 1024)
    assert len(pipeline.cached_decoded(src, cfg(cache_decoded=True))) == 4


def test_cache_decoded_is_refused_with_dali_naming_both_fields():
    with pytest.raises(ValueError, match=r"cache_decoded.*decoder='dali'"):
        pipeline.train_iterator(
            cfg(decoder="dali", cache_decoded=True),
            batch_size=2,
            seed=0,
            shard_index=0,
            shard_count=1,
            data_source=memory_source(4),
        )


def test_augmentation_deterministic_by_seed_and_varies_across_seeds_and_epochs():
    n = 8
    src = memory_source(n)
    c = cfg(shuffle=False)  # Same record order in every epoch, so only the augmentation differs.

    def run(seed):
        it = pipeline.train_iterator(
            c, batch_size=n, seed=seed, shard_index=0, shard_count=1, data_source=src
        )
        return take(it, 2)

    a, b, other = run(3), run(3), run(4)
    assert_same_batches(a, b)
    np.testing.assert_array_equal(a[0]["label"], a[1]["label"])  # Two epochs of the same records...
    assert not np.allclose(a[0]["image"], a[1]["image"])  # ...augmented differently.
    assert not np.allclose(a[0]["image"], other[0]["image"])


def test_shuffle_differs_across_epochs_and_seeds():
    src = memory_source(20)
    c = no_augment(cfg())
    it = pipeline.train_iterator(
        c, batch_size=20, seed=0, shard_index=0, shard_count=1, data_source=src
    )
    e0, e1 = (b["label"] for b in take(it, 2))
    assert sorted(e0) == sorted(e1) == list(range(20))
    assert not np.array_equal(e0, e1)
    it2 = pipeline.train_iterator(
        c, batch_size=20, seed=1, shard_index=0, shard_count=1, data_source=src
    )
    assert not np.array_equal(next(it2)["label"], e0)


def test_train_fraction_trains_on_a_fixed_nested_subset():
    """data.train_fraction: the same records for every run seed, nested across fractions, and every
    epoch goes over exactly that subset."""
    n = 50
    small, large = (pipeline.train_subset_indices(n, f) for f in (0.1, 0.3))
    assert len(small) == 5 and len(large) == 15 and set(small) <= set(large)
    np.testing.assert_array_equal(small, pipeline.train_subset_indices(n, 0.1))
    np.testing.assert_array_equal(pipeline.train_subset_indices(n, 1.0), np.arange(n))
    src = memory_source(n)
    c = no_augment(cfg(train_fraction=0.3))
    for seed in (0, 1):
        it = pipeline.train_iterator(
            c, batch_size=15, seed=seed, shard_index=0, shard_count=1, data_source=src
        )
        for b in take(it, 2):  # two epochs, each exactly the subset
            assert sorted(b["label"].tolist()) == large.tolist()
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="train_fraction"):
            pipeline.train_subset_indices(n, bad)


@pytest.mark.parametrize("n", [40, 43])
def test_train_shards_disjoint_and_cover_each_epoch(n):
    src = memory_source(n)
    c = no_augment(cfg())
    shards = 2
    per_shard = n // shards  # 43: one example left out of each epoch.
    epochs = []
    for s in range(shards):
        it = pipeline.train_iterator(
            c, batch_size=1, seed=5, shard_index=s, shard_count=shards, data_source=src
        )
        labels = np.concatenate([b["label"] for b in take(it, 2 * per_shard)])
        epochs.append((labels[:per_shard], labels[per_shard:]))
    for e in range(2):
        parts = [set(ep[e].tolist()) for ep in epochs]
        assert all(len(p) == per_shard for p in parts)  # No repeats within a shard's epoch.
        assert parts[0].isdisjoint(parts[1])
        assert len(parts[0] | parts[1]) == shards * per_shard  # All but n % shards examples.
    # Each epoch deals the examples out afresh.
    assert set(epochs[0][0].tolist()) != set(epochs[0][1].tolist())


def test_restored_iterator_continues_identically():
    src = memory_source(24, height=40, width=36)
    c = cfg()
    kwargs = dict(batch_size=5, seed=7, shard_index=1, shard_count=2, data_source=src)
    full = take(pipeline.train_iterator(c, **kwargs), 9)
    it = pipeline.train_iterator(c, **kwargs)
    take(it, 4)
    saved = pipeline.state_to_json(it.get_state())
    take(it, 2)  # Moves on after the save; the restore must not care.
    restored = pipeline.train_iterator(c, **kwargs)
    restored.set_state(pipeline.state_from_json(saved))
    assert_same_batches(take(restored, 5), full[4:])


def test_restored_iterator_with_worker_process_and_threads():
    src = memory_source(24)
    c = cfg(worker_count=1, read_threads=2)
    kwargs = dict(batch_size=4, seed=2, shard_index=0, shard_count=1, data_source=src)
    # Worker processes and threads do not change the batch sequence.
    reference = take(pipeline.train_iterator(cfg(), **kwargs), 7)
    it = pipeline.train_iterator(c, **kwargs)
    first = take(it, 3)
    saved = pipeline.state_to_json(it.get_state())
    assert_same_batches(first, reference[:3])
    it.close()
    restored = pipeline.train_iterator(c, **kwargs)
    restored.set_state(pipeline.state_from_json(saved))
    assert_same_batches(take(restored, 4), reference[3:])
    restored.close()


class _Blackout(grain.transforms.Map):
    """Test corruption: zeroes the image (uint8 in, uint8 out)."""

    def map(self, element):
        assert element["image"].dtype == np.uint8 and element["image"].shape == (SIZE, SIZE, 3)
        return {**element, "image": np.zeros_like(element["image"])}


class _RandomShift(grain.transforms.RandomMap):
    def random_map(self, element, rng):
        return {**element, "image": np.roll(element["image"], int(rng.integers(1, SIZE)), axis=1)}


@pytest.mark.parametrize("n,batch,shards", [(50, 8, 3), (7, 4, 2), (3, 4, 4)])
def test_eval_shards_padded_disjoint_covering(n, batch, shards):
    src = memory_source(n)
    c = cfg()
    seen = []
    counts = []
    for s in range(shards):
        batches = list(
            pipeline.eval_batches(
                c, batch_size=batch, shard_index=s, shard_count=shards, data_source=src
            )
        )
        counts.append(len(batches))
        for b in batches:
            assert b["image"].shape == (batch, SIZE, SIZE, 3) and b["mask"].dtype == np.float32
        labels = np.concatenate([b["label"] for b in batches])
        mask = np.concatenate([b["mask"] for b in batches])
        real = labels[mask == 1]
        assert np.all(np.diff(real) == 1)  # One ordered, contiguous slice.
        # Padding only at the end.
        assert np.all(mask[: len(real)] == 1) and np.all(mask[len(real) :] == 0)
        seen.extend(real.tolist())
    assert len(set(counts)) == 1 and counts[0] == pipeline.eval_num_batches(n, batch, shards)
    assert sorted(seen) == list(range(n))  # Every example exactly once.


def test_eval_extra_transforms_apply_to_the_uint8_crops_the_eval_step_normalises():
    src = memory_source(6)
    c = cfg()
    b = next(
        pipeline.eval_batches(
            c,
            batch_size=6,
            shard_index=0,
            shard_count=1,
            extra_transforms=[_Blackout()],
            data_source=src,
        )
    )
    assert b["image"].dtype == np.uint8  # the host ships crops; the eval step normalises
    np.testing.assert_array_equal(b["image"], 0)
    expected = -np.asarray(c.mean) / np.asarray(c.std)
    got = np.asarray(photometric.eval_images(b["image"], c))
    np.testing.assert_allclose(got, np.broadcast_to(expected, got.shape), atol=1e-5)

    def shifted(seed):
        return next(
            pipeline.eval_batches(
                c,
                batch_size=6,
                shard_index=0,
                shard_count=1,
                extra_transforms=[_RandomShift()],
                seed=seed,
                data_source=src,
            )
        )["image"]

    np.testing.assert_array_equal(shifted(0), shifted(0))
    assert not np.array_equal(shifted(0), shifted(1))


def test_state_json_round_trip():
    state = {"next_index": 3, "nested": [{"a": 1}]}
    assert pipeline.state_from_json(pipeline.state_to_json(state)) == state
    assert pipeline.state_from_json(pipeline.state_to_json(b'{"x": 1}')) == {"x": 1}


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    c = cfg()
    c.data_dir = str(tmp_path_factory.mktemp("tfds"))
    return c


def test_synthetic_tiny_end_to_end(tiny_cfg):
    facts = datasets.prepare(tiny_cfg)
    assert facts.name == "synthetic_food" and facts.builder_config == "tiny"
    assert facts.image_shape == (SIZE, SIZE, 3)
    assert len(facts.class_names) == facts.num_classes
    assert len(facts.ingredient_names) == facts.num_ingredients
    assert set(facts.split_sizes) == {"train", "validation", "test"}
    assert datasets.prepare(tiny_cfg) == facts  # Second call reads what the first built.

    src = datasets.source(tiny_cfg, "train")
    assert len(src) == facts.split_sizes["train"]
    kwargs = dict(batch_size=8, seed=0, shard_index=0, shard_count=2)
    it = pipeline.train_iterator(tiny_cfg, "train", **kwargs)
    batches = take(it, 3)
    b = batches[0]
    assert b["image"].shape == (8, SIZE, SIZE, 3) and b["image"].dtype == np.uint8
    assert steps.model_input(b, tiny_cfg).dtype == np.float32
    assert b["ingredients"].shape == (8, facts.num_ingredients)
    assert np.all(b["ingredients"].sum(-1) >= 1) and np.all(b["label"] < facts.num_classes)
    it = pipeline.train_iterator(tiny_cfg, "train", **kwargs)
    take(it, 1)
    restored = pipeline.train_iterator(tiny_cfg, "train", **kwargs)
    restored.set_state(pipeline.state_from_json(pipeline.state_to_json(it.get_state())))
    assert_same_batches(take(restored, 2), batches[1:])

    n_val = facts.split_sizes["validation"]
    total = 0.0
    for s in range(3):
        for eb in pipeline.eval_batches(
            tiny_cfg, "validation", batch_size=10, shard_index=s, shard_count=3
        ):
            total += float(eb["mask"].sum())
    assert total == n_val


def test_real_layout_fixture_end_to_end(tmp_path):
    """Vireo fixture: variable-size JPEGs (one greyscale) through prepare, train and eval."""
    fx = fixtures.write_vireo_food172(tmp_path / "manual")
    c = data_config.get_data_config("vireo_food172")
    c.data_dir, c.manual_dir, c.image_size, c.read_threads = (
        str(tmp_path / "tfds"),
        str(fx.manual_dir),
        SIZE,
        0,
    )
    facts = datasets.prepare(c)
    assert facts.image_shape is None  # Photos of any size.
    assert facts.class_names == tuple(fx.class_names)
    assert facts.ingredient_names == tuple(fx.ingredient_names["default"])
    n_train = len(fx.splits["train"])
    assert facts.split_sizes["train"] == n_train

    b = next(pipeline.train_iterator(c, batch_size=n_train, seed=0, shard_index=0, shard_count=1))
    assert b["image"].shape == (n_train, SIZE, SIZE, 3)
    assert b["ingredients"].shape == (n_train, facts.num_ingredients)
    expected = {
        (e.label, e.ingredients["default"].astype(np.float32).tobytes()) for e in fx.splits["train"]
    }
    got = {(int(lab), ing.tobytes()) for lab, ing in zip(b["label"], b["ingredients"])}
    assert got == expected

    test = list(pipeline.eval_batches(c, "test", batch_size=4, shard_index=0, shard_count=1))
    assert sum(float(t["mask"].sum()) for t in test) == len(fx.splits["test"])


_TWO_PROCESS_CHILD = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
port, pid, data_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
    coordinator_bind_address=f"127.0.0.1:{port}", initialization_timeout=60,
)
from marnet_jax.data import config, datasets, pipeline
built = []
real_build = datasets._build
datasets._build = lambda *a: (built.append(jax.process_index()), real_build(*a))
c = config.get_data_config("synthetic_food/tiny")
c.data_dir, c.read_threads, c.augment.random_resized_crop = data_dir, 0, False
facts = datasets.prepare(c)
it = pipeline.train_iterator(c, batch_size=10, seed=0)  # Shard from jax.process_index().
assert next(it)["image"].shape == (10, 32, 32, 3)
ev = pipeline.eval_batches(c, "validation", batch_size=8)
mask = sum(float(b["mask"].sum()) for b in ev)
print("RESULT", json.dumps(dict(built=built, train=facts.split_sizes["train"], mask=mask)))
jax.distributed.shutdown()
"""


@pytest.mark.slow
def test_two_processes_build_once_and_shard(tmp_path):
    """Two jax processes: only process 0 builds, both read it, eval masks sum to the split."""
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TWO_PROCESS_CHILD, str(port), str(i), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
        line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT ") :]))
    assert results[0]["built"] == [0] and results[1]["built"] == []
    assert results[0]["train"] == results[1]["train"]
    assert results[0]["mask"] + results[1]["mask"] == 64  # 'tiny' validation size.
