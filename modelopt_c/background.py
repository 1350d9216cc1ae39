"""Saves that block a training loop only while the tensors are copied.

``async_save(model, path)`` takes the modelopt state and a snapshot of every tensor
(model weights, non-persistent buffers for the safetensors format, the ``extra``
training state), then returns a :class:`SaveHandle` while a background thread writes
the file through the same crash-safe writer as ``save`` (temp file, fsync, rename):
a crash or ``kill -9`` at any moment leaves the previous file or the new one.

One save is in flight at a time: the next ``async_save`` (or ``save``, or
:func:`wait_for_saves`) first waits for the one before.  A background save that
failed raises its error from ``handle.result()`` and, if nobody has looked at it yet,
from the next save or ``wait_for_saves()`` (a ``CheckpointError`` naming the file, the
cause chained), so a failure is never silent.  Pending saves finish before the
interpreter exits.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from . import _conversion, _runtime, distributed
from .checkpoint import CheckpointError, FileLike, _is_path, checkpoint_format, describe_file, write_checkpoint

__all__ = ["SaveHandle", "async_save", "wait_for_saves"]

_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_last: SaveHandle | None = None
# The host buffers of the last finished save, by size, for the next snapshot to copy into:
# memory already mapped copies about 3x faster than fresh pages (docs/benchmarks.md).
_pool: dict[tuple[int, bool], list[torch.Tensor]] = {}
_pool_lock = threading.Lock()


_unpinned_noted = False  # the fallback below was announced (once per process)


def _buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    """A uint8 host tensor of nbytes: one kept from the last save, or a new one.

    ``pinned`` (for a device source) asks for page-locked memory, which lets the copy
    run without waiting; when none can be had the buffer is plain memory (the copy then
    waits for the device), said once per process with the reason."""
    with _pool_lock:
        free = _pool.get((nbytes, pinned))
        if not free and pinned and _unpinned_noted:  # no pinned memory in this process: plain will do
            free = _pool.get((nbytes, False))
        if free:
            return free.pop()
    if pinned:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as exc:
            _note_unpinned(exc)
    return torch.empty(nbytes, dtype=torch.uint8)


def _note_unpinned(exc: BaseException) -> None:
    global _unpinned_noted
    if _unpinned_noted:
        return
    _unpinned_noted = True
    reason = " ".join(str(exc).split()).rstrip(".")
    warnings.warn(
        f"modelopt_c: no page-locked (pinned) host memory for async_save's copies ({reason}): tensors on the device "
        "are copied into plain host memory, synchronously (async_save returns later; the file is the same). "
        "Said once per process.",
        UserWarning,
        stacklevel=2,
    )


def _keep(buffers: list[torch.Tensor]) -> None:
    with _pool_lock:
        _pool.clear()
        for b in buffers:
            _pool.setdefault((b.numel(), b.is_pinned()), []).append(b)


class SaveHandle:
    """A background save: ``done()``, ``result(timeout)`` (None, or the save's error raised)."""

    def __init__(self, future: Future, name: str) -> None:
        self._future, self.name, self._seen = future, name, False

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> None:
        """Wait for the save; raise its error (a CheckpointError naming the file, cause chained)."""
        self._seen = True
        try:
            self._future.result(timeout)
        except TimeoutError:
            raise
        except BaseException as exc:  # noqa: BLE001 - re-raised, with the file named
            raise CheckpointError(f"the background save to {self.name} failed: {exc}") from exc

    def __repr__(self) -> str:
        state = "running" if not self.done() else ("failed" if self._future.exception() else "done")
        return f"<modelopt_c.SaveHandle {self.name}: {state}>"


def _copy_storage(src: torch.Tensor) -> torch.Tensor:
    """A host copy of src's whole storage, as a uint8 tensor (from the pool when it can)."""
    storage = src.untyped_storage()
    whole = torch.empty(0, dtype=torch.uint8, device=src.device).set_(storage)
    buf = _buffer(storage.nbytes(), whole.device.type == "cuda")
    buf.copy_(whole, non_blocking=buf.is_pinned())  # into plain memory the copy waits for the device
    return buf


def _snapshot(obj: Any, copies: dict[int, torch.Tensor]) -> Any:
    """obj with every tensor copied to CPU memory of its own; views and ties kept (one copy
    per storage, each tensor rebuilt over it with its offset, shape and strides)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) or obj.layout is not torch.strided:
            raise TypeError(f"async_save copies plain strided tensors only, not {type(obj).__name__} ({obj.layout})")
        src = obj.detach()
        storage = src.untyped_storage()
        key = storage.data_ptr() if storage.nbytes() else -id(src)
        base = copies.get(key)
        if base is None:
            base = copies[key] = _copy_storage(src)
        copy = torch.empty(0, dtype=src.dtype).set_(base.untyped_storage(), src.storage_offset(), src.shape,
                                                     src.stride())
        return torch.nn.Parameter(copy, requires_grad=obj.requires_grad) if isinstance(obj, torch.nn.Parameter) else copy
    if isinstance(obj, dict):
        out: dict = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _snapshot(v, copies)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # a state dict's versions
        return out
    if isinstance(obj, list):
        return [_snapshot(v, copies) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_snapshot(v, copies) for v in obj)
    return obj


def _write(copies: list[torch.Tensor], *args: Any) -> None:
    """The background half: the crash-safe write, then the host buffers kept for the next save."""
    write_checkpoint(*args)
    _keep(copies)


def _raise_unseen_failure() -> None:
    """Wait for the save in flight; raise its error if nobody has seen it."""
    global _last
    last, _last = _last, None
    if last is None:
        return
    try:
        last._future.result()
    except BaseException as exc:  # noqa: BLE001
        if not last._seen:
            last._seen = True
            raise CheckpointError(
                f"the background save to {last.name} failed: {exc} (raised here, at the next save, "
                "because nothing called its handle's result())"
            ) from exc


def wait_for_saves(release: bool = False) -> None:
    """Wait for the background save in flight, if any; raise its error if nobody has seen it.

    ``release=True`` also frees the host copy of the tensors that async_save keeps for
    the next save (the size of the model's tensors)."""
    with _lock:
        try:
            _raise_unseen_failure()
        finally:
            if release:
                _keep([])


def async_save(model: torch.nn.Module, f: FileLike, *, format: str | None = None, **kwargs: Any) -> SaveHandle:
    """``save`` that returns once the tensors are copied; the file is written in the background.

    Same arguments, formats and files as :func:`modelopt_c.save` (``extra``,
    ``keep_last``, ``progress`` included; paths only).  The call first waits for the
    previous background save.  The copy costs host memory the size of the model's
    tensors; it is kept after the write for the next save to copy into (pages already
    mapped copy about 3x faster), until ``wait_for_saves(release=True)``.  Under a torch.distributed process group use
    ``save`` (DCP's own ``async_save`` is the tool for sharded models).
    """
    global _executor, _last
    if not _is_path(f):
        raise TypeError("async_save needs a file path (the file is written later, from another thread).")
    if distributed.process_group_active():
        raise NotImplementedError(
            "async_save under a torch.distributed process group is not supported: use save() "
            "(or torch.distributed.checkpoint.async_save for a sharded model)."
        )
    progress, extra, keep_last = kwargs.pop("progress", False), kwargs.pop("extra", None), kwargs.pop("keep_last", None)
    if keep_last is not None:
        from .periodic import checkpoint_series

        checkpoint_series(f)  # a name without a number fails now, not in the background
    with _lock:
        _raise_unseen_failure()
        model = _runtime.unwrap(model, "warn")
        fmt = checkpoint_format(f, format)
        state = _conversion.modelopt_state(model)
        copies: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            weights = _snapshot(model.state_dict(), copies)
            buffers = _snapshot(_runtime.non_persistent_buffers(model), copies) if fmt == "safetensors" else None
            state = _snapshot(state, copies)  # tensors inside mode metadata (quantizer amax...)
            extra = _snapshot(extra, copies) if extra is not None else None
        if any(b.is_pinned() for b in copies.values()):
            torch.cuda.synchronize()  # the device-to-host copies were queued without waiting
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelopt_c-save")
        path = os.fspath(f)
        future = _executor.submit(_write, list(copies.values()), path, fmt, state, weights, buffers, kwargs, progress,
                                  extra, keep_last)
        _last = SaveHandle(future, describe_file(path))
        return _last
