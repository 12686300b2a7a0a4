"""The train loop's machinery: preemption flag, device prefetching, asynchronous NaN checks.

Kept apart from trainer.py so that `train_and_evaluate` reads top to bottom.
"""

from __future__ import annotations

import collections
import json
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from marnet_jax.train import sharding


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/Inf; the last good checkpoint is left as it was."""


class StopFlag:
    """Set by SIGTERM (preemption); checked by the train loop, agreed on across processes."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step: int, every: int) -> bool:
        if jax.process_count() == 1:
            return self._event.is_set()
        if step % every:
            return False
        flags = multihost_utils.process_allgather(np.int32(self._event.is_set()))
        return bool(np.any(flags))


class IteratorPosition:
    """An input-iterator state as grain's checkpoint handler writes it (JSON bytes)."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


def _serialized_state(iterator: Any) -> bytes:
    """The iterator's state now, as bytes (a copy: later batches cannot change it)."""
    state = iterator.get_state()
    return state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()


class DevicePrefetcher:
    """Global device batches (the `keys` a batch has), `size` of them transferred ahead of the
    step that reads them.

    The host copy of batch N+1 (and N+2) overlaps with step N on the device. `position()` is the
    source iterator's state after the batches returned so far, not after the ones in flight: a
    checkpoint written with it resumes with the first batch not yet given to a step.
    """

    def __init__(
        self,
        batches: Iterator[dict[str, np.ndarray]],
        mesh: jax.sharding.Mesh,
        keys: tuple[str, ...],
        size: int = 2,
    ):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}.")
        self._batches, self._mesh, self._keys = batches, mesh, keys
        self._queue: collections.deque = collections.deque()
        for _ in range(size):
            self._enqueue()

    def _enqueue(self) -> None:
        state = _serialized_state(self._batches) if hasattr(self._batches, "get_state") else None
        local = next(self._batches)
        batch = sharding.global_batch({k: local[k] for k in self._keys if k in local}, self._mesh)
        self._queue.append((state, batch))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        _, batch = self._queue.popleft()
        self._enqueue()
        return batch

    def position(self) -> IteratorPosition:
        """The state to restore so that the next batch is the first one not yet returned."""
        state = self._queue[0][0]
        if state is None:
            raise TypeError("the source iterator has no get_state(); its position is unknown.")
        return IteratorPosition(state)


class PendingMetrics:
    """Train metrics still on the device, checked for NaN/Inf without stalling the loop.

    Each step's metrics start copying to the host at once (`add`); they are checked once they
    have arrived, or at the latest when more than `max_in_flight` steps are pending (which also
    keeps the host from running ahead of the device), and all of them before a log line or a
    checkpoint (`drain`): a non-finite step stops the run before its state can be saved.
    """

    def __init__(self, max_in_flight: int = 2):
        self._queue: collections.deque = collections.deque()
        self._max = max_in_flight

    def add(self, step: int, metrics: dict[str, jax.Array], last_saved: int | None) -> None:
        for x in jax.tree.leaves(metrics):
            x.copy_to_host_async()
        self._queue.append((step, metrics))
        while self._queue and (
            len(self._queue) > self._max
            or all(x.is_ready() for x in jax.tree.leaves(self._queue[0][1]))
        ):
            self._check_oldest(last_saved)

    def drain(self, last_saved: int | None) -> None:
        while self._queue:
            self._check_oldest(last_saved)

    def _check_oldest(self, last_saved: int | None) -> None:
        step, metrics = self._queue.popleft()
        check_finite(step, jax.device_get(metrics), last_saved)


def check_finite(step: int, metrics: dict[str, float], last_saved: int | None) -> None:
    if not all(np.isfinite(metrics[k]) for k in ("loss", "grad_norm", "update_norm")):
        where = f"step {last_saved}" if last_saved is not None else "none saved yet"
        raise NonFiniteLossError(
            f"Non-finite loss, gradient or update at step {step} (loss={metrics['loss']}, "
            f"grad_norm={metrics['grad_norm']}, update_norm={metrics['update_norm']}); stopping. "
            f"Last good checkpoint: {where}."
        )
