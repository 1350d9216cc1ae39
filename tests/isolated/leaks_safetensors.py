"""Leak loops over the safetensors-format reader and writer (direct and staged
writes, verified reads, header reads, a malformed file): no objects, traced bytes,
file descriptors, mappings or RSS left behind per call.
Run by tests/test_isolated.py: python tests/isolated/leaks_safetensors.py TMPDIR"""

import gc
import os
import sys

from _leakcheck import SANITIZED, expect, leak_check

import torch

from modelopt_c import _conversion as C

tmp = sys.argv[1]
path = os.path.join(tmp, "leak.safetensors")
bad = os.path.join(tmp, "bad.safetensors")
header = b'{"a": {"dtype":"U8","shape":[3],"data_offsets":[0,2]}}'
with open(bad, "wb") as f:
    f.write(len(header).to_bytes(8, "little") + header + b"\0\0")
src = {"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.int8)}


def cycle():
    C.st_write(path, src, {"k": "v"})
    C.st_write(path, src, {"k": "v"}, _stage_bytes=2)
    C.st_read(path, verify=True)
    C.st_read_header(path)
    expect(ValueError, C.st_read, bad)
    expect(ValueError, C.st_read_header, bad)


def maps():
    with open("/proc/self/maps") as f:
        return len(f.readlines())


# references and traced memory (release builds too: gc objects and tracemalloc, not
# sys.gettotalrefcount, which only debug builds have)
leak_check("st_write/st_read", cycle, rounds=60)

# file descriptors and mappings
for _ in range(20):
    cycle()
gc.collect()
fds_before, maps_before = len(os.listdir("/proc/self/fd")), maps()
for _ in range(200):
    cycle()
gc.collect()
assert len(os.listdir("/proc/self/fd")) == fds_before, "file descriptors leak"
if not SANITIZED:  # ASan's allocator maps regions of its own
    assert maps() <= maps_before + 2, f"mappings leak: {maps_before} -> {maps()}"
print("ok fds and mappings", flush=True)

# RSS over larger tensors, with 2 x 64 KiB staging buffers a call and a tensor that
# outlives its dict (the mapping must go when the tensor does)
if not SANITIZED:  # ASan's quarantine holds freed memory
    with open(bad, "wb") as f:
        f.write((20).to_bytes(8, "little") + b'{"a": {"dtype": 1}}')
    big = {"a": torch.randn(256, 256), "b": torch.ones(1000, dtype=torch.int8)}

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def big_cycle():
        C.st_write(path, big, {"k": "v"})
        C.st_write(path, big, {"k": "v"}, _stage_bytes=1 << 16)
        md, t = C.st_read(path, verify=True)
        keep = t["a"]
        del t
        keep.sum()
        C.st_read_header(path)
        expect(ValueError, C.st_read, bad)
        expect(ValueError, C.st_read_header, bad)

    for _ in range(50):
        big_cycle()
    gc.collect()
    before = rss()
    for _ in range(500):
        big_cycle()
    gc.collect()
    grown = (rss() - before) >> 20
    assert grown < 16, f"RSS grew by {grown} MiB over 500 cycles"
    print(f"ok rss\t{grown} MiB", flush=True)
