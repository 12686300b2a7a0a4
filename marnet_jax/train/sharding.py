"""Device mesh, parameter partitioning rules and global batches.

One mesh with two axes: 'data' (pure data parallelism) and 'fsdp' (data parallelism whose devices also
split large parameters and their optimizer state). The batch is sharded over both axes; a parameter is
sharded over 'fsdp' along its largest divisible dimension when a partition rule selects it and it is large
enough, otherwise replicated. XLA inserts the all-gathers and reduce-scatters.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger("marnet_jax")

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the ('data', 'fsdp') mesh; `data=-1` takes every device not used by fsdp."""
    devices = list(jax.devices() if devices is None else devices)
    if mesh_cfg.num_devices != -1:
        if jax.process_count() > 1 or not 1 <= mesh_cfg.num_devices <= len(devices):
            raise ValueError(
                f"config.mesh.num_devices={mesh_cfg.num_devices} must be -1 (all) or, in a "
                f"single-process run, between 1 and {len(devices)}."
            )
        devices = devices[: mesh_cfg.num_devices]
    n = len(devices)
    fsdp = int(mesh_cfg.fsdp)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"config.mesh.fsdp={fsdp} must be >= 1 and divide the {n} devices.")
    data = n // fsdp if int(mesh_cfg.data) == -1 else int(mesh_cfg.data)
    if data * fsdp != n:
        raise ValueError(
            f"config.mesh.data={mesh_cfg.data} x config.mesh.fsdp={fsdp} must equal the device "
            f"count {n} (use data=-1 to fill)."
        )
    try:
        grid = mesh_utils.create_device_mesh((data, fsdp), devices)
    except (ValueError, NotImplementedError, AssertionError) as e:
        # A mesh shape that does not map onto the chips' torus still runs, with slower collectives.
        log.warning(
            "Mesh data=%d x fsdp=%d does not map onto the devices' physical layout (%s); using "
            "device order.",
            data,
            fsdp,
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
        grid = np.asarray(devices).reshape(data, fsdp)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every mesh axis."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def partition_spec(
    path: str,
    shape: tuple[int, ...],
    fsdp_size: int,
    rules: Sequence[tuple[str, str]],
    min_size: int,
) -> P:
    """PartitionSpec of one array: the first rule whose regex matches `path` decides.

    A rule's action is 'fsdp' (shard the largest dimension divisible by the fsdp axis size) or
    'replicate'. Arrays below `min_size` elements, or with no divisible dimension, are replicated.
    """
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return P()
    for pattern, action in rules:
        if not re.search(pattern, path):
            continue
        if action == "replicate":
            return P()
        if action != "fsdp":
            raise ValueError(f"Unknown partition action {action!r} for rule {pattern!r}.")
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % fsdp_size == 0:
                spec = [None] * len(shape)
                spec[dim] = "fsdp"
                return P(*spec)
        return P()
    return P()


def tree_shardings(tree: Any, mesh: Mesh, mesh_cfg: ml_collections.ConfigDict) -> Any:
    """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by the config's rules."""
    fsdp_size = mesh.shape["fsdp"]
    rules = [tuple(rule) for rule in mesh_cfg.fsdp_rules]

    def one(path, leaf):
        spec = partition_spec(
            jax.tree_util.keystr(path), tuple(leaf.shape), fsdp_size, rules, mesh_cfg.fsdp_min_size
        )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def describe_shardings(shardings: Any, tree: Any) -> list[str]:
    """One line per sharded (non-replicated) leaf: path, shape, spec. For the start-up log."""
    lines = []
    for (path, sharding), leaf in zip(
        jax.tree_util.tree_leaves_with_path(shardings), jax.tree_util.tree_leaves(tree), strict=True
    ):
        if any(axis is not None for axis in sharding.spec):
            lines.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} -> {sharding.spec}")
    return lines


def per_process_batch(global_size: int, mesh: Mesh, what: str) -> int:
    """This process's share of a global batch; `what` names the config field in the error."""
    if global_size % mesh.size:
        raise ValueError(f"{what}={global_size} must be divisible by the {mesh.size} devices.")
    return global_size // jax.process_count()


def global_batch(
    local_batch: dict[str, np.ndarray | jax.Array], mesh: Mesh
) -> dict[str, jax.Array]:
    """Stitches each process's slice of the batch into global arrays sharded over the batch axes;
    a value that is already a jax.Array (dali.GpuCrops' crops) is taken as the global array."""
    sharding = batch_sharding(mesh)
    return {
        k: v
        if isinstance(v, jax.Array)
        else jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
