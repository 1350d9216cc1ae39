"""What a measured process does: one task, one result.

A task is a JSON-able dict with a ``kind``; ``run(task, library, window)``
returns a JSON-able dict.  Every kind runs in a fresh process forked from its
family's zygote, so nothing one measurement allocates is seen by the next.
Times are ``time.perf_counter`` seconds; sizes are bytes.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

import libraries
import measure
import models
from libraries import CheckpointMethod, Library

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _stack(task: dict[str, Any], filled: bool) -> torch.nn.Module:
    return models.build_stack(task["layers"], task["hidden"], DTYPES[task["dtype"]], filled, task.get("fanout"))


def _warm_up(method: CheckpointMethod, library: Library) -> None:
    """Run the method once on a tiny model, untimed, so lazy one-time setup is paid."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "warmup" + os.path.splitext(method.file)[1])
        tiny = models.build_stack(2, 64, torch.float32, True)
        if method.converted:
            tiny = library.api.apply_mode(tiny, libraries.TRIVIAL_MODE)
        save_fn = method.save or _any_save(method)
        save_fn(library.api, tiny, path)
        method.restore(library.api, models.build_stack(2, 64, torch.float32, False), path)


def _any_save(method: CheckpointMethod) -> Any:
    """The save that writes the file a restore-only method reads."""
    return next(m.save for m in libraries.SAVE_METHODS if m.file == method.file)


def save(task: dict[str, Any], library: Library, window: measure.MemoryWindow) -> dict[str, Any]:
    """Save a filled model (converted with the trivial mode for modelopt methods)."""
    method = libraries.METHODS_BY_NAME[task["method"]]
    _warm_up(method, library)
    model = _stack(task, filled=True)
    if method.converted:
        model = library.api.apply_mode(model, libraries.TRIVIAL_MODE)
    measure.quiet_disk(task["path"])
    seconds, _ = measure.timed(lambda: method.save(library.api, model, task["path"]))
    return {
        "seconds": seconds,
        "fsync_seconds": measure.fsync_seconds(task["path"]),
        "file_bytes": os.path.getsize(task["path"]),
    }


def restore(task: dict[str, Any], library: Library, window: measure.MemoryWindow) -> dict[str, Any]:
    """Restore into a freshly built, zero-filled model; check every layer afterwards."""
    method = libraries.METHODS_BY_NAME[task["method"]]
    _warm_up(method, library)
    target = _stack(task, filled=False)
    measure.set_cache(task["path"], task["cache"])
    with window.open():
        seconds, restored = measure.timed(lambda: method.restore(library.api, target, task["path"]))
    models.check_stack(restored)
    if method.converted:
        assert library.api.ModeloptStateManager.is_converted(restored), "the restored model lost its mode"
    return {"seconds": seconds}


def memcpy(task: dict[str, Any], library: Library, window: measure.MemoryWindow) -> dict[str, Any]:
    """``copy_`` the model's bytes between two touched buffers (torch uses all cores)."""
    src = torch.ones(task["bytes"], dtype=torch.uint8)
    dst = torch.zeros_like(src)
    seconds, _ = measure.timed(lambda: dst.copy_(src))
    return {"seconds": seconds}


def write(task: dict[str, Any], library: Library, window: measure.MemoryWindow) -> dict[str, Any]:
    """Sequentially write the model's bytes next to the checkpoints, then fsync."""
    measure.quiet_disk(task["path"])
    write_s, fsync_s = measure.sequential_write(task["path"], task["bytes"])
    return {"seconds": write_s + fsync_s, "write_seconds": write_s, "fsync_seconds": fsync_s}


def read(task: dict[str, Any], library: Library, window: measure.MemoryWindow) -> dict[str, Any]:
    """Sequentially read the written file into a touched, preallocated buffer."""
    buf = torch.zeros(task["bytes"], dtype=torch.uint8)
    measure.set_cache(task["path"], task["cache"])
    seconds, done = measure.timed(lambda: measure.sequential_read(task["path"], memoryview(buf.numpy())))
    assert done == task["bytes"], f"read {done} of {task['bytes']} bytes"
    return {"seconds": seconds}


def bookkeeping(task: dict[str, Any], library: Library, window: measure.MemoryWindow) -> dict[str, Any]:
    """Time the state bookkeeping calls on a model with ``modules`` modules.

    ``apply_mode`` and ``restore_from_modelopt_state`` change the model, so each
    is timed once on a model of its own; the read-only calls are timed as the
    mean over a batch (``measure.per_call``).
    """
    mto = library.api
    manager_cls = mto.ModeloptStateManager
    model = models.wide_model(task["modules"])
    fresh = models.wide_model(task["modules"])
    times = {}
    times["apply_mode"], model = measure.timed(lambda: mto.apply_mode(model, libraries.TRIVIAL_MODE))
    times["is_converted"] = measure.per_call(lambda: manager_cls.is_converted(model))
    times["ModeloptStateManager(model)"] = measure.per_call(lambda: manager_cls(model))
    times["modelopt_state"] = measure.per_call(lambda: mto.modelopt_state(model))
    state = mto.modelopt_state(model)
    times["restore_from_modelopt_state"], fresh = measure.timed(
        lambda: mto.restore_from_modelopt_state(fresh, state)
    )
    assert manager_cls.is_converted(fresh), "restore_from_modelopt_state did not convert the model"
    return {"op_seconds": times}


KINDS = {f.__name__: f for f in (save, restore, memcpy, write, read, bookkeeping)}


def run(task: dict[str, Any], library: Library, window: measure.MemoryWindow) -> dict[str, Any]:
    """Run one task in this (fresh) process."""
    return KINDS[task["kind"]](task, library, window)
