"""Shared by the leak-loop scripts in this folder (each runs in a fresh interpreter,
started by tests/test_isolated.py): this tree's package first on the path, the test
modes registered, and the growth measure every script uses."""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
sys.path[:0] = [ROOT, TESTS]  # this tree's package and tests/modes.py, not an installed copy

warnings.simplefilter("ignore")

# ASan+UBSan build (.ci/sanitize.sh): slow, and RSS is its quarantine
SANITIZED = bool(os.environ.get("MODELOPT_C_SANITIZE"))


def _growth(fn, rounds):
    gc.collect()
    tracemalloc.start()
    objects = len(gc.get_objects())
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(rounds):
        fn()
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return len(gc.get_objects()) - objects, grown


def _per_call(fn, rounds):
    for _ in range(rounds):
        fn()
    objs_short, bytes_short = _growth(fn, rounds)
    objs_long, bytes_long = _growth(fn, 4 * rounds)
    return (objs_long - objs_short) / (3 * rounds), (bytes_long - bytes_short) / (3 * rounds)


def leak_check(name, fn, rounds=300, baseline=None):
    """Bounded caches (torch, pydantic) grow once; a leak grows with every call.  So
    compare the growth over 4N calls with that over N: a leak of one small object per
    call shows as ~1 object or >= 32 bytes per extra call (what tracemalloc counts for
    the smallest object); the bound, 24, leaves room for cache noise.  torch.save/load
    themselves grow a little per call here; `baseline` (the same torch calls without
    modelopt_c) is measured alike and subtracted."""
    objs, size = _per_call(fn, rounds)
    if baseline is not None:
        base_objs, base_size = _per_call(baseline, rounds)
        objs, size = objs - base_objs, size - base_size
    assert objs < 0.3, f"{name}: {objs:.2f} more objects per call"
    assert size < 24, f"{name}: {size:.1f} more bytes per call"
    print(f"ok {name}\t{objs:.2f} objects, {size:.1f} bytes per call", flush=True)


def expect(exc, fn, *args, **kwargs):
    """Call fn and require it to raise exc (a leak check over an error path)."""
    try:
        fn(*args, **kwargs)
    except exc:
        return
    raise AssertionError(f"{getattr(fn, '__name__', fn)} raised no {exc.__name__}")
