"""Backbone variables written as the files users bring (numpy only, no torch): for tests."""

from __future__ import annotations

from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict


def torchvision_names(params: Any, stats: Any) -> dict[str, np.ndarray]:
    """Backbone variables under torchvision's state-dict names (the inverse of the import), plus
    the `fc` classifier and the BatchNorm counters a torchvision file holds. Contiguous arrays:
    safetensors.numpy.save_file writes a transposed view's memory, not its values."""
    out = {"fc.weight": np.ones((10, 64), np.float32), "fc.bias": np.zeros(10, np.float32)}
    leaf_names = {"kernel": "weight", "scale": "weight", "bias": "bias"}
    leaf_names |= {"mean": "running_mean", "var": "running_var"}
    flat = flatten_dict(params) | flatten_dict(stats)
    for (*module, leaf), value in flat.items():
        if module[0] in ("conv_init", "bn_init"):
            name = "conv1" if module[0] == "conv_init" else "bn1"
        else:
            stage, block, layer = module
            layer = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(
                layer, layer
            )
            name = f"{stage}.{block.removeprefix('block')}.{layer}"
        out[f"{name}.{leaf_names[leaf]}"] = (
            np.ascontiguousarray(value.transpose(3, 2, 0, 1)) if leaf == "kernel" else value
        )
        if leaf == "var":
            out[f"{name}.num_batches_tracked"] = np.array(5, np.int64)
    return out
