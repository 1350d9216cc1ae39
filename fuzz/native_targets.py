"""The per-input checks behind fuzz/fuzz_native.c (the libFuzzer harnesses with C coverage).

Each target gets one input's bytes; it returns normally when the input is accepted
or refused with the documented exception, and raises (-> the harness aborts, and
libFuzzer saves the input) on anything else: another exception type, a refusal
without its context, a value that does not survive a round trip.

    codec(data)   the msgpack state decoder, _conversion.decode_state (the check is
                  fuzz_codec.check_one: StateDecodeError with a byte offset, or a value
                  that round-trips inline and by reference)
    header(data)  the safetensors reader on a file holding `data` (a memfd, no disk):
                  st_read_header, st_read, st_read(verify=True); ValueError naming the
                  file, or tensors whose bytes can all be read

Importable without the harness too (python -c "import native_targets; ..."), which
is how the reproducers under fuzz/regressions/ are replayed.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # this tree's package

import torch  # noqa: E402

import fuzz_codec  # noqa: E402
from modelopt_c import _conversion as C  # noqa: E402

# one memfd for the whole run: rewritten per input (regular file, so the reader mmaps it)
_FD = os.memfd_create("fuzz-header", 0)
_PATH = f"/proc/self/fd/{_FD}"


def codec(data: bytes) -> None:
    fuzz_codec.check_one(data)


def _touch(tensors: dict) -> None:
    """Read every byte of every returned tensor (ASan checks the mapping's bounds)."""
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise AssertionError(f"st_read returned {type(name)} -> {type(t)}")
        if t.numel() and t.dtype != torch.bool:
            t.reshape(-1).view(torch.uint8).sum()
        elif t.numel():
            t.reshape(-1).to(torch.uint8).sum()


def _refused(exc: BaseException) -> None:
    """A refusal must be a ValueError that names the file."""
    if not isinstance(exc, ValueError):
        raise AssertionError(f"{type(exc).__name__} instead of ValueError: {exc}") from exc
    if _PATH not in str(exc):
        raise AssertionError(f"the error does not name the file: {exc}") from exc


def header(data: bytes) -> None:
    os.ftruncate(_FD, 0)
    os.pwrite(_FD, data, 0)
    try:
        C.st_read_header(_PATH)
    except Exception as exc:  # noqa: BLE001 - classified by _refused
        _refused(exc)
    for verify in (False, True):
        try:
            metadata, tensors = C.st_read(_PATH, verify=verify)
        except Exception as exc:  # noqa: BLE001
            _refused(exc)
            continue
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise AssertionError(f"bad metadata {metadata!r}")
        _touch(tensors)
