"""Leak loops over the state codec (encode/decode, by value and by reference, and
their error paths): gc objects, RSS and tracemalloc'd memory stay flat over 10,000
rounds.  Run by tests/test_isolated.py: python tests/isolated/leaks_codec.py TMPDIR"""

import gc
import tracemalloc

from _leakcheck import SANITIZED

import torch

from modelopt_c import _conversion as C


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


class Foo:
    pass


state = {"modelopt_state_dict": [("quantize", {"config": {"a": [1, 2.5, "x", None]},
         "metadata": {"t": torch.arange(64, dtype=torch.bfloat16), 3: (b"xy", torch.Size([2])),
                      "d": torch.float16, "dev": torch.device("cpu"), "s": slice(1, 2)}})],
         "modelopt_version": "0.29.0"}
data = C.encode_state(state)
bad_inputs = [data[:n] for n in range(0, len(data), 7)] + [
    b"\x82\xa1a\x01\xa1a\x02", b"\x81\x91\x01\x02", b"\xa2\xff\xfe", b"\x91" * 300, b"\xd7\x02" + bytes(8)]
loop = []
loop.append(loop)
bad_states = [{"k": [Foo()]}, {"k": 2**64}, loop, {"x": {frozenset(): 1}}, {"s": ["\ud800"]}]


def work(n):
    for _ in range(n):
        t = []
        C.decode_state(C.encode_state(state))
        C.decode_state(C.encode_state(state, t), t)
        for b in bad_inputs:
            try:
                C.decode_state(b, source="f")
            except C.StateDecodeError:
                pass
            else:
                raise AssertionError(f"{b!r} decoded")
        for s in bad_states:
            try:
                C.encode_state(s)
            except (TypeError, OverflowError, ValueError):
                pass
            else:
                raise AssertionError("encoded a bad state")


work(300)
gc.collect()
objs0, rss0 = len(gc.get_objects()), rss_kib()
work(1_000 if SANITIZED else 10_000)
gc.collect()
objs1, rss1 = len(gc.get_objects()), rss_kib()
tracemalloc.start()
work(200)
gc.collect()
snap0 = tracemalloc.take_snapshot()
work(1000)
gc.collect()
snap1 = tracemalloc.take_snapshot()
grown = sum(s.size_diff for s in snap1.compare_to(snap0, "filename") if s.size_diff > 0)
print("objs", objs0, objs1, "rss", rss0, rss1, "traced", grown)
assert objs1 - objs0 < 50, ("gc objects grew", objs0, objs1)
assert SANITIZED or rss1 - rss0 < 16 * 1024, ("rss grew (KiB)", rss0, rss1)
assert grown < 64 * 1024, ("traced memory grew", grown)
print("ok codec", flush=True)
