"""Training crops decoded on the GPU by NVIDIA DALI (data.decoder = 'dali').

grain still reads, shuffles and shards the split and draws every random choice (the crop box in
decoders.CropBox, the jitter factors, the flip), so a seed and position give the same choices as
on the CPU path and a checkpointed iterator resumes alike. DALI only decodes each image's box and
resizes it to S x S: on a GPU with nvJPEG (and the hardware JPEG decoder where the GPU has one),
each local device decoding the rows of the process's batch that it holds under the batch
sharding, so no pixels cross from the host. The crop then enters the train step as a uint8 device
array, like the CPU path's.

The pixels differ from the CPU path's by decoder and resampler (DALI decodes the box at full
scale and resizes it with an antialiased filter; the CPU path decodes at a reduced DCT scale and
resizes with PIL), not by what is cropped.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from marnet_jax.data.config import train_image_size

_INTERPOLATION = {
    "nearest": "INTERP_NN",
    "bilinear": "INTERP_LINEAR",
    "bicubic": "INTERP_CUBIC",
    "lanczos": "INTERP_LANCZOS3",
}


def require_dali() -> types.ModuleType:
    """The nvidia.dali module, or an ImportError that says how to install it."""
    try:
        import nvidia.dali
    except ImportError as e:
        raise ImportError(
            "data.decoder='dali' needs NVIDIA DALI, which is not installed: pip install "
            "nvidia-dali-cuda120 (CUDA 12) or nvidia-dali-cuda130 (CUDA 13), the CUDA that jax "
            "uses; or set data.decoder='cpu'."
        ) from e
    return nvidia.dali


def not_on_gpus(devices: Iterable[jax.Device]) -> str | None:
    """Why DALI cannot decode for `devices` (this process's) when they are not all GPUs, or None."""
    platforms = sorted({d.platform for d in devices})
    if platforms == ["gpu"]:
        return None
    return (
        f"data.decoder='dali' decodes on GPUs; this process's JAX devices are {platforms}: set "
        "data.decoder='cpu'."
    )


def crop_pipeline(
    batch_size: int, size: int, interpolation: str, device_id: int | None, num_threads: int
) -> Any:
    """A built DALI pipeline that takes, per run, 'encoded' (uint8 byte arrays), 'anchor' and
    'shape' (float32 [x, y] and [w, h] of the box, in pixels) and outputs the boxes decoded and
    resized to size x size uint8 RGB. device_id None: everything on the CPU (DALI's CPU-only mode,
    for checks on a machine without a GPU)."""
    dali = require_dali()
    fn, dtypes = dali.fn, dali.types
    if interpolation not in _INTERPOLATION:
        raise ValueError(
            f"Unknown interpolation {interpolation!r}; expected one of {sorted(_INTERPOLATION)}."
        )
    pipe = dali.Pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=1,  # fed one batch at a time by GpuCrops
    )
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=dtypes.UINT8, ndim=1)
        anchor = fn.external_source(name="anchor", dtype=dtypes.FLOAT, ndim=1)
        shape = fn.external_source(name="shape", dtype=dtypes.FLOAT, ndim=1)
        images = fn.decoders.image_slice(
            encoded,
            anchor,
            shape,
            device="cpu" if device_id is None else "mixed",
            output_type=dtypes.RGB,
            normalized_anchor=False,
            normalized_shape=False,
            adjust_orientation=False,  # as PIL's decode on the CPU path: no EXIF rotation
            jpeg_fancy_upsampling=True,  # chroma upsampled as libjpeg-turbo does
        )
        images = fn.resize(
            images,
            resize_x=size,
            resize_y=size,
            interp_type=getattr(dtypes, _INTERPOLATION[interpolation]),
            antialias=True,
        )
        pipe.set_outputs(images)
    pipe.build()
    return pipe


def _device_rows(
    batch_sharding: jax.sharding.Sharding, local_batch: int
) -> list[tuple[Any, slice]]:
    """(device, rows of the process batch it holds) for each of this process's devices under
    `batch_sharding`, in the layout `jax.make_array_from_process_local_data` gives the batch."""
    global_rows = local_batch * jax.process_count()
    index_map = batch_sharding.addressable_devices_indices_map((global_rows,))
    starts = [index[0].indices(global_rows)[:2] for index in index_map.values()]
    first = min(start for start, _ in starts)
    if max(stop for _, stop in starts) - first != local_batch:
        raise ValueError(
            f"This process's devices hold rows {sorted(starts)} of the global batch: not one "
            f"block of its {local_batch}; data.decoder='dali' needs each process's devices "
            "contiguous along the batch axes."
        )
    return [
        (device, slice(start - first, stop - first))
        for device, (start, stop) in zip(index_map, starts, strict=True)
    ]


class GpuCrops:
    """`pipeline.train_iterator` batches (data.decoder 'dali': decoders.Dali.on_devices wraps them)
    with 'encoded' and 'crop' replaced by
    'image': the crops decoded by DALI on each of this process's devices, as one global uint8
    [B, S, S, 3] jax.Array under `batch_sharding` (the trainer's sharding.batch_sharding;
    sharding.global_batch passes the array through).
    get_state() / set_state() are grain's: positions resume exactly.

    on_cpu: decode with DALI's CPU operators and place the crops on the (CPU) devices: the same
    graph without a GPU, for checks; training on a CPU uses data.decoder 'cpu'.
    """

    def __init__(
        self,
        batches: Iterator[dict[str, Any]],
        batch_sharding: jax.sharding.Sharding,
        data_cfg: ml_collections.ConfigDict,
        *,
        on_cpu: bool = False,
    ):
        require_dali()
        problem = None if on_cpu else not_on_gpus(batch_sharding.addressable_devices)
        if problem:
            raise RuntimeError(problem)
        self._batches, self._sharding, self._cfg = batches, batch_sharding, data_cfg
        self._on_cpu = on_cpu
        self._decoders: list[tuple[Any, slice, Any]] | None = None  # built at the first batch

    def _build(self, local_batch: int) -> None:
        self._decoders = [
            (
                device,
                rows,
                crop_pipeline(
                    rows.stop - rows.start,
                    train_image_size(self._cfg),
                    self._cfg.interpolation,
                    None if self._on_cpu else device.local_hardware_id,
                    int(self._cfg.dali_threads),
                ),
            )
            for device, rows in _device_rows(self._sharding, local_batch)
        ]

    def __iter__(self) -> GpuCrops:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = dict(next(self._batches))
        encoded, crop = batch.pop("encoded"), batch.pop("crop")
        local_batch, size = len(encoded), train_image_size(self._cfg)
        if self._decoders is None:
            self._build(local_batch)
        anchor = crop[:, :2].astype(np.float32)
        shape = (crop[:, 2:] - crop[:, :2]).astype(np.float32)
        for _, rows, pipe in self._decoders:
            pipe.feed_input("encoded", encoded[rows])
            pipe.feed_input("anchor", list(anchor[rows]))
            pipe.feed_input("shape", list(shape[rows]))
            pipe.schedule_run()
        shards = [self._to_device(pipe.outputs()[0], device) for device, _, pipe in self._decoders]
        # The copies must land before the next run reuses DALI's output buffers.
        jax.block_until_ready(shards)
        global_shape = (local_batch * jax.process_count(), size, size, 3)
        batch["image"] = jax.make_array_from_single_device_arrays(
            global_shape, self._sharding, shards
        )
        return batch

    def _to_device(self, images: Any, device: Any) -> jax.Array:
        """DALI's output batch as a uint8 array of its own on `device`."""
        if self._on_cpu:
            return jax.device_put(np.array(images.as_array()), device)
        return jax.dlpack.from_dlpack(images.as_tensor()).copy()

    def get_state(self) -> Any:
        return self._batches.get_state()

    def set_state(self, state: Any) -> None:
        """grain's state; as JSON bytes from grain's checkpoint handler, which takes this wrapper
        for a foreign iterator (and then calls start_prefetch)."""
        self._batches.set_state(json.loads(state) if isinstance(state, bytes) else state)

    def start_prefetch(self) -> None:
        if hasattr(self._batches, "start_prefetch"):
            self._batches.start_prefetch()

    def close(self) -> None:
        if hasattr(self._batches, "close"):
            self._batches.close()
