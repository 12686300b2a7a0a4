"""Documented defaults for the input pipeline (``config.data``).

``get_data_config()`` gives the embedded synthetic dataset. Pass a dataset name (optionally with its
tfds builder config, ``'name/config'``) to get the defaults that suit that dataset: the synthetic
images are already rendered at the training size, must keep their small ingredient patches and fit
in memory, so they use mild crops, no eval centre crop and a training split decoded once; the real
photographs (Vireo Food-172, Ingredient-101) use the usual ImageNet-style random-resized-crop and
resize-then-centre-crop evaluation at 224 px.
"""

from __future__ import annotations

import os

import ml_collections

# name -> default builder config (None: the builder has none), image size per builder config, eval
# crop ratio, random-crop area range, whether to decode the training split once into memory.
_PRESETS: dict[str, dict] = {
    "synthetic_food": {
        "builder_config": "default",
        "image_size": {"default": 64, "tiny": 32},
        "eval_crop_ratio": 1.0,
        "crop_scale": (0.35, 1.0),
        "cache_decoded": True,
    },
    "vireo_food172": {
        "builder_config": None,
        "image_size": {None: 224},
        "eval_crop_ratio": 0.875,
        "crop_scale": (0.08, 1.0),
        "cache_decoded": False,
    },
    "ingredient101": {
        "builder_config": "full",
        "image_size": {"full": 224, "simplified": 224},
        "eval_crop_ratio": 0.875,
        "crop_scale": (0.08, 1.0),
        "cache_decoded": False,
    },
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_data_config(dataset: str = "synthetic_food") -> ml_collections.ConfigDict:
    """Returns the data section of the experiment config.

    Args:
      dataset: 'synthetic_food' | 'vireo_food172' | 'ingredient101', optionally '/<builder config>'
        (e.g. 'synthetic_food/tiny', 'ingredient101/simplified'). Selects dataset-appropriate
        defaults.
    """
    name, _, builder_config = dataset.partition("/")
    if name not in _PRESETS:
        raise ValueError(f"Unknown dataset {name!r}; expected one of {sorted(_PRESETS)}.")
    preset = _PRESETS[name]
    builder_config = builder_config or preset["builder_config"]
    if builder_config not in preset["image_size"]:
        raise ValueError(f"Unknown builder config {builder_config!r} for {name!r}.")

    c = ml_collections.ConfigDict()
    # --- Which data ---------------------------------------------------------------------------
    c.name = name  # tfds builder: 'synthetic_food' | 'vireo_food172' | 'ingredient101'.
    # tfds builder config: synthetic default | tiny; ingredient101 full | simplified; vireo None.
    c.builder_config = builder_config
    # Where tfds writes and reads the prepared ArrayRecord files ('~' is expanded).
    c.data_dir = os.environ.get("MARNET_DATA_DIR", "~/tensorflow_datasets")
    c.manual_dir = ml_collections.config_dict.placeholder(
        str
    )  # Folder with the extracted real-dataset releases (unused by synthetic).
    # Real datasets: leave out unreadable records (listed in the dataset metadata) instead of
    # stopping the build.
    c.skip_bad_records = False
    # Real datasets: store each image whose shorter side exceeds this many pixels shrunk to it
    # (re-encoded as JPEG) for a smaller dataset that decodes faster; None keeps the bytes as
    # shipped. A prepared dataset is only read with the value it was built with.
    c.max_shorter_side = ml_collections.config_dict.placeholder(int)
    # Multi-host: False = only process 0 builds (data_dir shared by all hosts, e.g. GCS or NFS)
    # while the others wait at a barrier; True = every process builds its own copy (host-local
    # data_dir).
    c.build_on_all_processes = False
    c.train_split = "train"  # Training split (any tfds split string, e.g. 'train[:90%]').
    # Train on this fraction of the training split: a fixed uniform random subset, the same for every
    # seed and variant, nested across fractions (the low-data study); 1.0 = all of it.
    c.train_fraction = 1.0
    c.eval_split = "validation"  # Split evaluated during training.
    c.test_split = "test"  # Split of the final evaluation.

    # --- Image geometry -----------------------------------------------------------------------
    c.image_size = preset["image_size"][builder_config]  # Output height = width in pixels.
    # Side of the training crops in pixels; None = image_size. Smaller crops make a cheaper train
    # step for a backbone that pools globally (ResNet, EfficientNet; not a ViT's fixed grid), and
    # a random-resized crop then shows the dish at about the size the evaluation's full view shows
    # it (FixRes: Touvron et al., NeurIPS 2019, arXiv 1906.06423). Evaluation stays at image_size.
    c.train_image_size = ml_collections.config_dict.placeholder(int)
    # Eval: resize the shorter side to image_size / eval_crop_ratio, then take the central
    # image_size crop. 0.875 is the ImageNet convention for photos; 1.0 keeps the whole shorter
    # side (the identity for synthetic images, which are rendered at image_size).
    c.eval_crop_ratio = preset["eval_crop_ratio"]
    c.interpolation = "bilinear"  # PIL resampling of every resize: bilinear | bicubic | lanczos.

    # --- Training augmentation (each part switchable) -----------------------------------------
    a = ml_collections.ConfigDict()
    # Inception-style random resized crop; False = the eval resize + centre crop.
    a.random_resized_crop = True
    # Crop area as a fraction of the image (synthetic keeps >= 35% so ingredient patches survive).
    a.crop_scale = preset["crop_scale"]
    a.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)  # Crop aspect (width / height), drawn log-uniformly.
    a.horizontal_flip = True  # Random left-right flip with probability 0.5.
    a.color_jitter = True  # Light colour jitter with the strengths below (0 turns a part off).
    a.brightness = 0.2  # Brightness factor drawn from [1 - b, 1 + b].
    a.contrast = 0.2  # Contrast factor from [1 - c, 1 + c] (blend with the mean grey level).
    a.saturation = 0.2  # Saturation factor from [1 - s, 1 + s] (blend with the greyscale image).
    c.augment = a

    # --- Normalisation and output -------------------------------------------------------------
    c.mean = IMAGENET_MEAN  # Per-channel mean of RGB in [0, 1], subtracted (ImageNet).
    c.std = IMAGENET_STD  # Per-channel std of RGB in [0, 1], divided by (ImageNet).
    # The model input's dtype, 'float32' | 'bfloat16': eval batches arrive in it; train batches
    # arrive as uint8 crops and the train step normalises them into it.
    c.dtype = "float32"

    # --- Reading and parallelism --------------------------------------------------------------
    c.shuffle = True  # Shuffle the training split (globally, anew every epoch, by seed).
    # Worker processes for decoding and augmentation (grain mp_prefetch); 0 = none. The batch
    # sequence does not depend on it, but a saved iterator state does: resume with the same value.
    c.worker_count = 0
    c.worker_buffer_size = 2  # Batches each worker process prepares ahead.
    # Threads per process preparing whole batches ahead (decoding and augmentation run in them;
    # PIL and numpy release the GIL); 0 = synchronous.
    c.read_threads = 2
    c.prefetch_buffer_size = 4  # Batches buffered by those threads (host memory: this x a batch).
    # Decode the training split once, when the run starts, and keep the pixels in host memory
    # (each process holds the whole split: for small datasets such as synthetic_food). The batches
    # are those of the encoded records (PNG; a JPEG decoded at full scale), for less host work per
    # step, which on a CPU-only machine shares the cores with the train step.
    c.cache_decoded = preset["cache_decoded"]
    # Where training crops are decoded and resized: 'cpu' (both in the threads and workers
    # above), 'cpu_decode' (decoded there, resized by the train step on the accelerator with
    # PIL's filter and rounding: about half the host's work per JPEG; each crop ships in a
    # (2 S + 16)^2 canvas) or 'dali' (NVIDIA DALI on each of the process's GPUs; needs
    # nvidia-dali-cuda120 or -cuda130, matching the CUDA of jax). Boxes, flips and jitter are
    # drawn alike on each; the pixels differ by decoder and resampler. Evaluation always decodes
    # and resizes on the CPU.
    c.decoder = "cpu"
    c.dali_threads = 4  # DALI's CPU threads per GPU (JPEG parsing, host decoding of PNG).
    return c


def train_image_size(data_cfg: ml_collections.ConfigDict) -> int:
    """Side of the training crops: data.train_image_size, or data.image_size where it is None."""
    size = data_cfg.train_image_size
    size = data_cfg.image_size if size is None else size
    if int(size) < 1:
        raise ValueError(f"config.data.train_image_size must be a positive int, got {size!r}.")
    return int(size)
