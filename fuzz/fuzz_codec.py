"""Fuzz the state codec's decoder with hostile bytes.

Every input must either decode to a value or raise StateDecodeError; any other
exception, a crash or a hang is a bug.  A decoded value must also survive
encode -> decode unchanged (inline tensors and tensor references both).

    python fuzz/fuzz_codec.py CORPUS_DIR [libFuzzer flags, e.g. -max_total_time=60]
    python fuzz/fuzz_codec.py --random SECONDS CORPUS_DIR   # no atheris: built-in mutator

With atheris, libFuzzer drives the mutations (the extension is built by gcc without
libFuzzer's coverage hooks, so only the Python side feeds coverage back; for C
coverage feedback use fuzz/fuzz_native.c, which calls check_one, see docs/FUZZING.md).  Without
it, --random runs a bounded mutation loop over the corpus (bit flips, byte edits,
splices, boundary lengths) seeded from the same files.
"""

from __future__ import annotations

import math
import os
import random
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this tree's package

import torch  # noqa: E402

from modelopt_c import _conversion as C  # noqa: E402

# FUZZ_CODEC_SELFTEST=1 makes every successful decode a failure: checks that the CI
# plumbing (.ci/fuzz.sh) really reports a crash.
_SELFTEST = bool(os.environ.get("FUZZ_CODEC_SELFTEST"))
TENSORS = [torch.ones(2), torch.zeros(3, dtype=torch.bfloat16), torch.tensor(True)]


def _same(a, b) -> bool:
    """Structural equality with exact types; NaN equals NaN, tensors bitwise."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            _same(ka, kb) and _same(va, vb) for (ka, va), (kb, vb) in zip(a.items(), b.items())
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, slice):
        return _same((a.start, a.stop, a.step), (b.start, b.stop, b.step))
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b) or (math.isnan(a) and math.isnan(b))
    return a == b


def _classify(what: str) -> int:
    """Which decoder check fired.  Unrolled on purpose: the extension carries no
    libFuzzer coverage hooks, so these Python branches are the feedback that tells
    libFuzzer one rejection from another."""
    if what.startswith("truncated input"):
        return 1
    elif "array header claims" in what:
        return 2
    elif "map header claims" in what:
        return 3
    elif "invalid UTF-8" in what:
        return 4
    elif "trailing bytes" in what:
        return 5
    elif "unknown ext type" in what:
        return 6
    elif "nesting deeper" in what:
        return 7
    elif "unknown dtype" in what:
        return 8
    elif "dtype name" in what:
        return 9
    elif "device name" in what:
        return 10
    elif "invalid device" in what:
        return 11
    elif "slice payload" in what:
        return 12
    elif "torch.Size" in what:
        return 13
    elif "tuple payload" in what:
        return 14
    elif "tensor reference payload" in what:
        return 15
    elif "no tensors were given" in what:
        return 16
    elif "out of range" in what:
        return 17
    elif "not a tensor" in what:
        return 18
    elif "tensor payload" in what:
        return 19
    elif "tensor dtype" in what:
        return 20
    elif "tensor shape" in what:
        return 21
    elif "tensor dimension" in what:
        return 22
    elif "tensor data" in what:
        return 23
    elif "bool tensor" in what:
        return 24
    elif "cannot create the tensor" in what:
        return 25
    elif "duplicate map key" in what:
        return 26
    elif "not hashable" in what:
        return 27
    elif "not a msgpack type" in what:
        return 28
    elif "unexpected bytes at the end" in what:
        return 29
    return 0


def _walk(value, depth: int = 0) -> None:
    """Touch each decoded type on its own branch (coverage feedback, see _classify)."""
    if depth > 300:
        return
    if value is None:
        pass
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if value < 0:
            pass
        elif value > 2**32:
            pass
    elif isinstance(value, float):
        if value != value:
            pass
    elif isinstance(value, str):
        if not value.isascii():
            pass
    elif isinstance(value, bytes):
        pass
    elif isinstance(value, torch.Size):
        pass
    elif isinstance(value, tuple):
        for v in value:
            _walk(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _walk(v, depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            _walk(k, depth + 1)
            _walk(v, depth + 1)
    elif isinstance(value, torch.Tensor):
        if value.dtype == torch.bool:
            pass
        elif value.numel() == 0:
            pass
        elif value.dim() == 0:
            pass
    elif isinstance(value, torch.dtype):
        pass
    elif isinstance(value, torch.device):
        pass
    elif isinstance(value, slice):
        pass
    else:
        raise AssertionError(f"decoder produced an unexpected type {type(value)}")


def check_one(data: bytes) -> None:
    try:
        value = C.decode_state(data, TENSORS, source="fuzz")
    except C.StateDecodeError as exc:
        msg = str(exc)
        if "at byte offset" not in msg:
            raise AssertionError(f"decode error without an offset: {msg}")
        _classify(msg.split(": ", 1)[-1])
        return
    _walk(value)
    if _SELFTEST:
        raise AssertionError("FUZZ_CODEC_SELFTEST: a decoded value counts as a failure")
    again = C.decode_state(C.encode_state(value))
    if not _same(value, again):
        raise AssertionError(f"inline round trip changed the value: {value!r} -> {again!r}")
    refs: list = []
    again = C.decode_state(C.encode_state(value, refs), refs)
    if not _same(value, again):
        raise AssertionError(f"by-reference round trip changed the value: {value!r} -> {again!r}")


# ---------------------------------------------------------------- fallback mutator

_BOUNDARY = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF]


def _mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # set a byte (msgpack type bytes are the interesting ones)
            buf[rng.randrange(len(buf))] = rng.choice([rng.randrange(256), 0xC1, 0xDD, 0xDF, 0xC9, 0xD7, 0x91, 0x81])
        elif op == 2:  # insert bytes
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and buf:  # delete a range
            del buf[pos : pos + rng.randint(1, 8)]
        elif op == 4 and buf:  # overwrite with a boundary length, big-endian
            width = rng.choice([1, 2, 4])
            buf[pos : pos + width] = (rng.choice(_BOUNDARY) & ((1 << (8 * width)) - 1)).to_bytes(width, "big")
        elif op == 5:  # splice with another seed
            other = rng.choice(corpus)
            j = rng.randrange(len(other) + 1)
            buf[pos:] = other[j:]
        elif op == 6 and buf:  # truncate
            del buf[pos:]
    return bytes(buf[:65536])


def random_fuzz(seconds: float, corpus_dir: str, seed: int = 0) -> int:
    corpus = [open(os.path.join(corpus_dir, n), "rb").read() for n in sorted(os.listdir(corpus_dir))]
    corpus = [c for c in corpus if len(c) <= 65536] or [b"\xc0"]
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    runs = 0
    while time.monotonic() < deadline:
        data = _mutate(rng, rng.choice(corpus), corpus)
        try:
            check_one(data)
        except Exception:
            path = os.path.abspath(f"crash-random-{seed}-{runs}.bin")
            with open(path, "wb") as f:
                f.write(data)
            print(f"CRASH after {runs} runs; input saved to {path}", file=sys.stderr)
            raise
        runs += 1
    print(f"random fuzz: {runs} inputs in {seconds:.0f}s, no failure")
    return 0


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "--random":
        return random_fuzz(float(sys.argv[2]), sys.argv[3])
    import atheris

    def test_one_input(data: bytes) -> None:
        check_one(data)

    for func in (check_one, _same, _classify, _walk):
        atheris.instrument_func(func)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
