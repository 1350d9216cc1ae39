"""Measuring primitives: clocks, private memory, the page cache, the machine's limits.

Peak memory is **RssAnon** (anonymous resident pages: heap, tensors built in
memory), not RSS, which also counts the file pages of a memory-mapped checkpoint
that the kernel can drop at will.  A measured process marks its window with
``MemoryWindow``; its parent (the zygote, a separate single-threaded process)
samples the child's ``/proc/<pid>/status`` while the window is open, so native
code that holds the GIL cannot hide a peak from the sampler.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

DROP_CACHES = "/proc/sys/vm/drop_caches"
CHUNK = 64 << 20  # bytes per read/write call for the machine-limit measurements


def rss_anon_bytes(pid: int | str = "self") -> int:
    """RssAnon of a process, in bytes (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class MemoryWindow:
    """The measured process's side of the RssAnon protocol (see ``zygote.py``).

    ``with window.open(): op()`` sends ``start`` and ``stop`` lines on the
    channel fd; ``baseline`` and ``end`` are this process's own RssAnon just
    before and just after the operation.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.baseline = 0
        self.end = 0

    @contextmanager
    def open(self) -> Iterator[None]:
        self.baseline = rss_anon_bytes()
        os.write(self.fd, b"start\n")
        yield
        self.end = rss_anon_bytes()
        os.write(self.fd, b"stop\n")


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds one call of ``fn`` takes, and what it returned (after a ``gc.collect``)."""
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def per_call(fn: Callable[[], object], min_seconds: float = 0.05) -> float:
    """Mean seconds per call of ``fn``, over a batch long enough to time well.

    Like ``timeit.Timer.autorange``: the batch grows 1, 2, 5, 10, ... calls until
    it lasts ``min_seconds``; the last batch is the figure.
    """
    gc.collect()
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / number
        number = number * 5 // 2 if str(number)[0] == "2" else number * 2


def can_drop_page_cache() -> bool:
    """Whether this process may drop the page cache (root and a writable knob)."""
    try:
        drop_page_cache()
    except OSError:
        return False
    return True


def drop_page_cache() -> None:
    """Write dirty pages back, then drop clean page cache (``echo 1 > drop_caches``)."""
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("1")


def read_through(path: str) -> None:
    """Read a file once, untimed, so its pages are in the page cache."""
    buf = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def set_cache(path: str, cache: str) -> None:
    """Bring ``path`` into the page cache (``warm``) or drop the cache (``cold``)."""
    if cache == "cold":
        drop_page_cache()
    else:
        read_through(path)


def fsync_seconds(path: str) -> float:
    """Seconds an ``fsync`` of an already written file takes (its data not yet durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        os.fsync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)


def quiet_disk(path: str) -> None:
    """Remove ``path`` (an earlier repetition's file) and sync the disk; untimed.

    On a file system that discards freed blocks at the next journal commit (ext4
    mounted with ``discard``, as on this project's machines), removing or replacing
    a large file costs whoever commits the journal next.  Left in place, the
    previous repetition's file would bill its removal to whichever measurement
    came next, at random; so every save and write starts with its target absent
    and the disk synced.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.sync()


def sequential_write(path: str, nbytes: int) -> tuple[float, float]:
    """Write ``nbytes`` to ``path`` in large chunks, then fsync: (write seconds, fsync seconds)."""
    chunk = memoryview(os.urandom(1 << 20) * (CHUNK >> 20))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        start = time.perf_counter()
        left = nbytes
        while left:
            left -= os.write(fd, chunk[: min(left, CHUNK)])
        written = time.perf_counter()
        os.fsync(fd)
        return written - start, time.perf_counter() - written
    finally:
        os.close(fd)


def sequential_read(path: str, into: memoryview) -> int:
    """Read ``path`` into the preallocated buffer ``into`` with large ``readinto`` calls; bytes read."""
    view = into.cast("B")
    done = 0
    with open(path, "rb", buffering=0) as f:
        while done < len(view):
            n = f.readinto(view[done : done + CHUNK])
            if not n:
                break
            done += n
    return done


_IMPORT_SCRIPT = """
import sys, time
sys.path[:0] = {paths!r}
import hf_stub
hf_stub.install_if_missing()
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import {module}
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def import_seconds(module: str, paths: list[str]) -> tuple[float, float]:
    """Import ``torch`` then ``module`` in a fresh interpreter: (torch seconds, module seconds).

    ``paths`` go first on ``sys.path`` (the repository root for ``modelopt_c``,
    this folder for ``hf_stub``).  A failed import raises ``RuntimeError`` with
    the interpreter's last error line.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_SCRIPT.format(paths=paths, module=module)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["no output"]
        raise RuntimeError(f"import {module} failed: {lines[-1]}")
    torch_s, module_s = proc.stdout.split()
    return float(torch_s), float(module_s)
