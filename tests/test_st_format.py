"""The safetensors-compatible format: round trips, peer compatibility with the
safetensors package, zero-copy reads, crash-safe writes and hostile files."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _optional import optional_import
from _st_support import ROOT, Tiny, _conversion, sample_state

from modelopt_c import CheckpointError, st_format

safetensors_torch = optional_import("safetensors.torch", "safetensors")
from safetensors import safe_open  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "st_corpus"


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN-safe, any dtype)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def raw_file(path: Path, header: bytes, data: bytes = b"", n: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if n is None else n) + header + data)
    return path


def _dlpack_has_float8() -> bool:
    """Whether this torch's DLPack exports float8 (2.13 does, 2.9 does not)."""
    try:
        torch.utils.dlpack.to_dlpack(torch.zeros(1, dtype=torch.float8_e4m3fn))
        return True
    except (RuntimeError, BufferError):  # 2.9 raises BufferError
        return False


DLPACK_FLOAT8 = _dlpack_has_float8()


def many_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = torch.randn(5, 7, generator=g)
    out = {
        "f32": r,
        "f16": r.half(),
        "bf16": r.bfloat16(),
        "f64": r.double(),
        "i8": torch.randint(-128, 127, (9,), dtype=torch.int8, generator=g),
        "i16": torch.randint(-(2**15), 2**15 - 1, (3, 3), dtype=torch.int16, generator=g),
        "i32": torch.randint(-(2**31), 2**31 - 1, (4,), dtype=torch.int32, generator=g),
        "i64": torch.tensor([-(2**63), 2**63 - 1, 0]),
        "u8": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=g),
        "bool": torch.tensor([True, False, True]),
        "f8": (r * 3).to(torch.float8_e4m3fn),
        "f8b": r.to(torch.float8_e5m2),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "empty_i8": torch.zeros(3, 0, dtype=torch.int8),
        "noncontig": r.t(),
        "strided": r[::2, 1::3],
        "nan": torch.tensor([float("nan"), float("inf"), -0.0]),
        "unicode ключ/é": torch.ones(2),
        'quote"and\\back\nslash': torch.ones(1, dtype=torch.int16),
    }
    if not DLPACK_FLOAT8:  # test_float8_needs_a_dlpack_that_has_it says what happens instead
        del out["f8"], out["f8b"]
    return out


# ----------------------------------------------------------------- round trips


def test_round_trip_bit_exact(tmp_path):
    src = many_tensors()
    path = tmp_path / "m.safetensors"
    _conversion.st_write(str(path), src, {"k": "v", "é": "ü"})
    metadata, out = _conversion.st_read(str(path), verify=True)
    assert list(out) == list(src)  # header order is the caller's order
    for name, t in src.items():
        assert same(t, out[name]), name
        assert out[name].device.type == "cpu"
    assert metadata["k"] == "v" and metadata["é"] == "ü"
    assert metadata["checksum_algorithm"] == "xxh64"
    assert set(json.loads(metadata["checksums"])) == set(src)


def test_data_starts_aligned_and_tensors_naturally_aligned(tmp_path):
    path = tmp_path / "a.safetensors"
    _conversion.st_write(path, many_tensors(), {})
    _, header, data_start = _conversion.st_read_header(path)
    assert data_start % 64 == 0
    sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}
    for name, (dtype, _, begin, _) in header.items():
        assert begin % sizes.get(dtype, 1) == 0, name


# The pipeline that device tensors take (two host buffers, the next chunk's copy
# queued before the current one is written) run on CPU tensors: `_stage_bytes`
# sends every tensor through it in chunks of that size.  The file must be the
# same, byte for byte, as the one written straight from memory.
@pytest.mark.parametrize("chunk", [1, 3, 64, 4096, 1 << 20])
def test_staged_writes_are_byte_identical(tmp_path, chunk):
    src = many_tensors()
    # many chunks and an odd tail at every chunk size (smaller for the 1- and 3-byte chunks,
    # which stage a chunk per byte: still thousands of chunks, in a fraction of the time)
    scale = 100 if chunk < 64 else 1
    src["big"] = torch.arange(300_001 // scale, dtype=torch.float32)
    src["big_strided"] = torch.arange(2 * (70_003 // scale), dtype=torch.int16)[::2]  # gathered chunk by chunk
    direct, staged = tmp_path / "direct.safetensors", tmp_path / "staged.safetensors"
    _conversion.st_write(direct, src, {"k": "v"})
    calls = []
    _conversion.st_write(staged, src, {"k": "v"}, _stage_bytes=chunk, progress=lambda d, t: calls.append((d, t)))
    assert staged.read_bytes() == direct.read_bytes()
    _, out = _conversion.st_read(staged, verify=True)
    for name, t in src.items():
        assert same(t, out[name]), name
    total = sum(t.numel() * t.element_size() for t in src.values())
    assert calls[-1] == (total, total)


def non_contiguous_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "transposed": torch.randn(37, 29, generator=g).t(),
        "permuted": torch.randn(3, 5, 7, 11, generator=g).permute(3, 1, 0, 2),
        "sliced": torch.arange(1000, dtype=torch.int16)[3::7],
        "rows_sliced": torch.randn(9, 13, generator=g)[:, 2:11],  # inner rows cut, each a run of its own
        "expanded": torch.arange(6.0).reshape(1, 6).expand(40, 6),  # stride 0: never made whole
        "expanded_inner": torch.arange(5, dtype=torch.float64).reshape(5, 1).expand(5, 9),
        "stepped_view": torch.randn(8, 8, generator=g).t()[1:7, ::2],
        "bool": (torch.randn(11, 7, generator=g) > 0).t(),
        "half": torch.randn(6, 17, generator=g).to(torch.float16).t(),
        "scalar_view": torch.arange(10.0)[4],  # 0-dim
        "one_element": torch.randn(3, 4, generator=g)[1:2, 2:3],
        "empty": torch.empty(0, 4).t(),
        "empty_expanded": torch.ones(1, 0).expand(3, 0),
    }


# Non-contiguous tensors are written chunk by chunk, each chunk gathering only the
# elements it holds (never a contiguous copy of the whole tensor: on a GPU that was a
# second copy of it).  Pieces start and end mid-element at odd chunk sizes.  The file
# must be the one the contiguous tensors give, byte for byte.
@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 5, 7, 64, 1000, 1 << 20])
def test_non_contiguous_tensors_are_written_byte_identically(tmp_path, chunk):
    src = non_contiguous_tensors()
    # (a 0-dim or one-element view, and empty tensors, count as contiguous whatever their strides)
    assert [k for k, t in src.items() if t.is_contiguous()] == ["scalar_view", "one_element", "empty", "empty_expanded"]
    direct, written = tmp_path / "contiguous.safetensors", tmp_path / "views.safetensors"
    _conversion.st_write(direct, {k: t.contiguous() for k, t in src.items()}, {"k": "v"})
    kwargs = {} if chunk is None else {"_stage_bytes": chunk}
    _conversion.st_write(written, src, {"k": "v"}, **kwargs)
    assert written.read_bytes() == direct.read_bytes()
    _, out = _conversion.st_read(written, verify=True)
    for name, t in src.items():
        assert same(t, out[name]), name


def test_a_non_contiguous_tensor_of_several_default_chunks(tmp_path):
    # 12 MB across the 8 MiB chunk: the second chunk starts inside a row of the transposed view
    big = torch.arange(3001 * 1000, dtype=torch.float32).reshape(3001, 1000).t()
    direct, written = tmp_path / "contiguous.safetensors", tmp_path / "view.safetensors"
    _conversion.st_write(direct, {"big": big.contiguous(), "tail": torch.ones(3)}, {})
    _conversion.st_write(written, {"big": big, "tail": torch.ones(3)}, {})
    assert written.read_bytes() == direct.read_bytes()


def test_without_pinned_memory_staging_falls_back_and_says_so_once(tmp_path):
    # _stage_pinned asks for page-locked staging buffers as a device tensor does; without an
    # accelerator there are none, so the writer falls back to plain buffers: one UserWarning
    # per process (a fresh interpreter), the files unchanged
    script = f"""
import warnings, torch
from modelopt_c import _conversion
src = {{"a": torch.arange(100.0).reshape(10, 10).t(), "b": torch.ones(7)}}
_conversion.st_write({str(tmp_path / 'ref.safetensors')!r}, {{k: v.contiguous() for k, v in src.items()}}, {{}})
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for name in ("one", "two"):
        _conversion.st_write({str(tmp_path)!r} + "/" + name + ".safetensors", src, {{}}, _stage_bytes=64,
                             _stage_pinned=True)
print(torch.cuda.is_available())
for w in caught:
    print(w.category.__name__, w.message)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    ref = (tmp_path / "ref.safetensors").read_bytes()
    assert (tmp_path / "one.safetensors").read_bytes() == ref == (tmp_path / "two.safetensors").read_bytes()
    if out[0] == "True":  # pinned buffers were had
        assert out[1:] == []
        return
    # one warning; torch's reason in the parentheses varies with the build (CPU wheel, CUDA wheel without a driver)
    assert len(out) == 2 and re.fullmatch(
        r"UserWarning modelopt_c: no page-locked \(pinned\) host memory for the staging buffers \(.+\): "
        r"tensors on the device are saved through plain host buffers, with synchronous copies that no longer "
        r"overlap the writes \(slower; the file is the same\)\. Said once per process\.", out[1]), out


def test_staged_write_errors_leave_the_old_file(tmp_path):
    path = tmp_path / "m.safetensors"
    _conversion.st_write(path, {"old": torch.ones(3)}, {})
    old = path.read_bytes()

    def boom(done, total):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):  # aborted with a copy in flight
        _conversion.st_write(path, {"a": torch.zeros(70 << 18), "b": torch.ones(4)}, {}, progress=boom,
                             _stage_bytes=1 << 20)
    with pytest.raises(ValueError, match="_stage_bytes must be between 0 and 2\\*\\*30"):
        _conversion.st_write(path, {"a": torch.ones(2)}, {}, _stage_bytes=-1)
    assert path.read_bytes() == old and _no_temp_files(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_staged_through_pinned_buffers(tmp_path):
    src = many_tensors()
    src["big"] = torch.randn(5_000_001)  # several 8 MiB chunks
    on_gpu = {k: v.cuda() for k, v in src.items()}
    on_gpu["mixed_cpu"] = src["mixed_cpu"] = torch.arange(10)  # CPU and device tensors in one file
    _conversion.st_write(tmp_path / "cpu.safetensors", src, {})
    _conversion.st_write(tmp_path / "gpu.safetensors", on_gpu, {})
    assert (tmp_path / "gpu.safetensors").read_bytes() == (tmp_path / "cpu.safetensors").read_bytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_non_contiguous_tensors_are_gathered_chunk_by_chunk(tmp_path):
    src = non_contiguous_tensors()
    src["big"] = torch.randn(4001, 1000).t()  # 16 MB across the 8 MiB chunks
    on_gpu = {k: v.cuda() for k, v in src.items()}
    _conversion.st_write(tmp_path / "cpu.safetensors", {k: v.contiguous() for k, v in src.items()}, {})
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _conversion.st_write(tmp_path / "gpu.safetensors", on_gpu, {})
    grown = torch.cuda.max_memory_allocated() - before
    assert (tmp_path / "gpu.safetensors").read_bytes() == (tmp_path / "cpu.safetensors").read_bytes()
    # at most a chunk (plus two elements) gathered at a time: never a contiguous copy of "big"
    assert grown <= (8 << 20) + 4096 < src["big"].nbytes, grown


def test_pathlike_and_progress(tmp_path):
    calls = []
    big = {"w": torch.zeros(70 << 18)}  # 70 MiB: one mid-write report and the final one
    _conversion.st_write(tmp_path / "p.safetensors", big, {}, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (70 << 20, 70 << 20)
    assert len(calls) >= 2


def test_safetensors_package_reads_our_file(tmp_path):
    src = many_tensors()
    path = tmp_path / "m.safetensors"
    _conversion.st_write(str(path), src, {"format": "x"})
    loaded = safetensors_torch.load_file(str(path))
    assert set(loaded) == set(src)
    for name, t in src.items():
        assert same(t, loaded[name]), name
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "x"
        assert "checksums" in f.metadata()


def test_we_read_files_of_the_safetensors_package(tmp_path):
    src = {k: v.contiguous() for k, v in many_tensors().items() if k not in ("noncontig", "strided")}
    path = tmp_path / "theirs.safetensors"
    safetensors_torch.save_file(src, str(path), metadata={"a": "b"})
    metadata, out = _conversion.st_read(str(path))
    assert metadata == {"a": "b"}
    for name, t in src.items():
        assert same(t, out[name]), name
    with pytest.raises(ValueError, match="no checksums to verify"):
        _conversion.st_read(str(path), verify=True)
    safetensors_torch.save_file({"x": torch.ones(2)}, str(path))  # no metadata at all
    assert _conversion.st_read(str(path))[0] == {}


@pytest.mark.skipif(DLPACK_FLOAT8, reason="this torch's DLPack exports float8")
def test_float8_needs_a_dlpack_that_has_it(tmp_path):
    # torch before DLPack knew float8 (2.9): a clear error naming the tensor, both ways
    path = tmp_path / "f8.safetensors"
    with pytest.raises(CheckpointError, match="'f8'.*float8 types are not supported by dlpack"):
        _conversion.st_write(path, {"f8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, {})
    safetensors_torch.save_file({"f8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, str(path))
    with pytest.raises(CheckpointError, match="'f8'.*float8 types are not supported by dlpack"):
        _conversion.st_read(str(path))


def test_files_of_scalars_only(tmp_path):
    # No tensor has a dimension, so the header has no shape pool at all (a fuzzer
    # found the reader doing arithmetic on that null pool: undefined behaviour).
    src = {"step": torch.tensor(7, dtype=torch.int64), "lr": torch.tensor(0.5), "flag": torch.tensor(True)}
    path = tmp_path / "scalars.safetensors"
    safetensors_torch.save_file(src, str(path))
    metadata, out = _conversion.st_read(str(path))
    assert metadata == {}
    for name, t in src.items():
        assert out[name].shape == () and same(t, out[name]), name
    _, header, _ = _conversion.st_read_header(str(path))
    assert {name: info[1] for name, info in header.items()} == {"step": (), "lr": (), "flag": ()}
    _conversion.st_write(path, src, {})
    assert set(_conversion.st_read(path, verify=True)[1]) == set(src)


def test_xxh64_known_vectors():
    assert _conversion.st_xxh64(b"") == 0xEF46DB3751D8E999
    assert _conversion.st_xxh64(b"abc") == 0x44BC2CF5AD770999
    assert _conversion.st_xxh64(b"Nobody inspects the spammish repetition") == 0xFBCEA83C8A378BF1
    # Every tail length goes through the same digest as a one-shot call.
    data = bytes(range(256)) * 3
    assert len({_conversion.st_xxh64(data[:n]) for n in range(0, 100)}) == 100


# ----------------------------------------------------------------- zero copy


def test_tensors_are_views_over_the_mapping(tmp_path):
    path = tmp_path / "z.safetensors"
    src = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.arange(10, dtype=torch.int64)}
    _conversion.st_write(path, src, {})
    _, out = _conversion.st_read(path)
    _, header, data_start = _conversion.st_read_header(path)
    # The two tensors sit exactly as far apart in memory as in the file.
    ptr_a, ptr_b = out["a"].data_ptr(), out["b"].data_ptr()
    assert ptr_a - ptr_b == header["a"][2] - header["b"][2]
    maps = Path("/proc/self/maps").read_text().splitlines()
    hits = [m for m in maps if m.endswith(str(path))]
    assert hits, "the file is not mapped"
    spans = [tuple(int(x, 16) for x in m.split()[0].split("-")) for m in hits]
    assert any(lo <= ptr_a < hi for lo, hi in spans)
    # Writes stay private (copy-on-write): the file never changes.
    before = path.read_bytes()
    out["a"].add_(1)
    assert path.read_bytes() == before
    assert same(_conversion.st_read(path)[1]["a"], src["a"])


def test_mapping_outlives_the_dict(tmp_path):
    path = tmp_path / "z.safetensors"
    _conversion.st_write(path, {"a": torch.arange(4096.0), "b": torch.ones(3)}, {})
    _, out = _conversion.st_read(path)
    keep = out["a"]
    del out
    import gc

    gc.collect()
    assert keep.sum().item() == sum(range(4096))
    assert any(m.endswith(str(path)) for m in Path("/proc/self/maps").read_text().splitlines())
    del keep
    gc.collect()
    assert not any(m.endswith(str(path)) for m in Path("/proc/self/maps").read_text().splitlines())


# ----------------------------------------------------------------- modelopt layer


def test_save_load_file_modelopt(tmp_path):
    model = Tiny()
    state = sample_state()
    path = tmp_path / "model.safetensors"
    st_format.save_file(path, model.state_dict(), state)
    got_state, sd = st_format.load_file(path, verify=True)
    assert got_state["modelopt_version"] == "0.1.0"
    (name0, body0), (name1, body1) = got_state["modelopt_state_dict"]
    assert (name0, name1) == ("quantize", "sparsity")
    assert body0["config"] == {"num_bits": 8, "axis": None, "names": ["a", "b"]}
    assert same(body0["metadata"]["amax"], torch.tensor([1.5, 2.0]))
    assert same(body1["metadata"]["masks"]["w"], torch.ones(2, 2, dtype=torch.bool))
    ref = model.state_dict()
    assert list(sd) == list(ref)
    assert all(same(ref[k], sd[k]) for k in ref)
    # Any safetensors reader sees the weights plus the reserved-prefix extras.
    plain = safetensors_torch.load_file(str(path))
    weights = {k: v for k, v in plain.items() if not k.startswith(st_format.RESERVED_PREFIX)}
    assert set(weights) == set(ref) and all(same(ref[k], weights[k]) for k in ref)
    assert sorted(k for k in plain if k.startswith(st_format.RESERVED_PREFIX)) == [
        "__modelopt_state__.0", "__modelopt_state__.1"]
    model2 = Tiny()
    model2.load_state_dict(sd)
    assert all(same(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_load_file_rejects_plain_and_foreign_versions(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors_torch.save_file({"x": torch.ones(2)}, str(path))
    with pytest.raises(ValueError, match="not a modelopt_c checkpoint"):
        st_format.load_file(path)
    _conversion.st_write(path, {}, {"format": "modelopt_c", "format_version": "9", "modelopt_state": ""})
    with pytest.raises(ValueError, match=r"format_version '9' is not supported \(this modelopt_c reads '1' and '2'\); upgrade"):
        st_format.load_file(path)
    _conversion.st_write(path, {}, {"format": "modelopt_c", "format_version": "1", "modelopt_state": "!!"})
    with pytest.raises(ValueError, match="not valid base64"):
        st_format.load_file(path)
    with pytest.raises(ValueError, match="reserved prefix"):
        st_format.save_file(path, {"__modelopt_state__.0": torch.ones(1)}, sample_state())


def test_is_safetensors_file(tmp_path):
    path = tmp_path / "m.safetensors"
    st_format.save_file(path, {"w": torch.ones(2)}, sample_state())
    assert st_format.is_safetensors_file(path)
    assert st_format.is_safetensors_file(path.read_bytes()[:9])
    with open(path, "rb") as f:
        assert st_format.is_safetensors_file(f) and f.tell() == 0
    pt = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, pt)
    assert not st_format.is_safetensors_file(pt)
    assert st_format.is_torch_zip(pt) and not st_format.is_torch_zip(path)
    assert not st_format.is_safetensors_file(b"\xff" * 8 + b"{")
    assert not st_format.is_safetensors_file(b"short")
    assert not st_format.is_safetensors_file(tmp_path / "missing")


# ----------------------------------------------------------------- crash safety


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp-" in p.name]


def test_failed_write_leaves_old_file(tmp_path):
    path = tmp_path / "m.safetensors"
    _conversion.st_write(path, {"old": torch.ones(3)}, {})
    old = path.read_bytes()

    def boom(done, total):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        _conversion.st_write(path, {"a": torch.zeros(70 << 18), "b": torch.ones(4)}, {}, progress=boom)
    assert path.read_bytes() == old and _no_temp_files(tmp_path)
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        _conversion.st_write(path, {"a": torch.ones(2), "b": [1, 2]}, {})
    with pytest.raises(ValueError, match="reserved"):
        _conversion.st_write(path, {"a": torch.ones(2)}, {"checksums": "x"})
    with pytest.raises(ValueError, match="cannot store|cannot read"):
        _conversion.st_write(path, {"c": torch.ones(2, dtype=torch.complex64)}, {})
    with pytest.raises(CheckpointError, match=r"m\.safetensors: tensor 'm' is on the meta device and has no data: "
                                              r"materialise it \(e\.g\. `to_empty\(\)`"):
        _conversion.st_write(path, {"m": torch.ones(2, device="meta")}, {})
    assert path.read_bytes() == old and _no_temp_files(tmp_path)


def test_disk_full_leaves_old_file(tmp_path):
    path = tmp_path / "m.safetensors"
    _conversion.st_write(path, {"old": torch.ones(3)}, {})
    old = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # writes past 1 MiB fail with EFBIG
    try:
        with pytest.raises(OSError) as info:
            _conversion.st_write(path, {"big": torch.zeros(1 << 20)}, {})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(path) in str(info.value)
    assert path.read_bytes() == old and _no_temp_files(tmp_path)


def test_rename_failure_cleans_up(tmp_path):
    target = tmp_path / "adir"
    target.mkdir()
    with pytest.raises(OSError):
        _conversion.st_write(target, {"a": torch.ones(2)}, {})
    assert target.is_dir() and _no_temp_files(tmp_path)
    with pytest.raises(OSError, match="missing"):
        _conversion.st_write(tmp_path / "missing" / "x.safetensors", {}, {})


def test_overwrite_keeps_mode(tmp_path):
    path = tmp_path / "m.safetensors"
    _conversion.st_write(path, {"a": torch.ones(1)}, {})
    os.chmod(path, 0o600)
    _conversion.st_write(path, {"a": torch.zeros(1)}, {})
    assert path.stat().st_mode & 0o777 == 0o600


# ----------------------------------------------------------------- hostile files


def test_every_truncation_is_a_clean_error(tmp_path):
    src = tmp_path / "full.safetensors"
    _conversion.st_write(src, {"a": torch.arange(6.0), "b": torch.ones(2, dtype=torch.int16)}, {"k": "v"})
    data = src.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for n in range(len(data)):
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError) as info:
            _conversion.st_read(cut)
        assert str(info.value).startswith(f"{cut}: "), (n, str(info.value))


@pytest.mark.parametrize(
    "header, data, n, message",
    [
        (b"{}", b"", 2**64 - 1, "over the 100000000-byte limit"),
        (b"{}", b"", 100, "runs past the end of the file"),
        (b"[]", b"", None, "not a JSON object"),
        (b'{"a":', b"", None, "invalid header JSON"),
        (b'"abc"', b"", None, "not a JSON object"),
        (b'{"a": {"dtype":"U8","shape":[1],"data_offsets":[0,1]}, "a": {"dtype":"U8","shape":[0],"data_offsets":[1,1]}}',
         b"\0", None, "duplicate tensor name 'a'"),
        (b'{"__metadata__": {"k":"1","k":"2"}}', b"", None, "duplicate metadata key 'k'"),
        (json.dumps({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}}).encode(), b"\0", None,
         "unknown dtype 'X9'"),
        (json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(), b"\0" * 8, None,
         "need 12 bytes but data_offsets span 8"),
        (json.dumps({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                     "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}).encode(), b"\0" * 6, None,
         "overlap tensor 'a'"),
        (json.dumps({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                     "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}).encode(), b"\0" * 6, None,
         "a gap of 2 bytes"),
        (json.dumps({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 200]}}).encode(), b"\0" * 2, None,
         "run past the 2-byte data section"),
        (json.dumps({"a": {"dtype": "U8", "shape": [0], "data_offsets": [2, 0]}}).encode(), b"\0" * 2, None,
         "end before they begin"),
        (json.dumps({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}).encode(), b"\0" * 5, None,
         "3 bytes that no tensor covers"),
        (json.dumps({"a": {"dtype": "U8", "shape": [-2], "data_offsets": [0, 2]}}).encode(), b"\0" * 2, None,
         "non-negative integers"),
        (json.dumps({"a": {"dtype": "I64", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}).encode(), b"\0" * 8,
         None, "need over"),
        (json.dumps({"a": 5}).encode(), b"", None, "entry must be an object"),
    ],
)
def test_lying_headers(tmp_path, header, data, n, message):
    path = raw_file(tmp_path / "bad.safetensors", header, data, n)
    for reader in (_conversion.st_read, _conversion.st_read_header):
        with pytest.raises(ValueError) as info:
            reader(path)
        text = str(info.value)
        assert text.startswith(f"{path}: ") and message in text, text


def test_checksum_mismatch_names_the_tensor(tmp_path):
    path = tmp_path / "c.safetensors"
    _conversion.st_write(path, {"first": torch.zeros(16), "second": torch.ones(16, dtype=torch.float64)}, {})
    _, header, data_start = _conversion.st_read_header(path)
    blob = bytearray(path.read_bytes())
    blob[data_start + header["first"][2] + 5] ^= 0x01
    path.write_bytes(bytes(blob))
    _conversion.st_read(path)  # the layout is still valid
    with pytest.raises(ValueError, match=r"tensor 'first': checksum mismatch"):
        _conversion.st_read(path, verify=True)


def test_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        _conversion.st_read(fifo)  # must not block on open
    with pytest.raises(ValueError, match="not a regular file"):
        _conversion.st_read(tmp_path)
    with pytest.raises(FileNotFoundError):
        _conversion.st_read(tmp_path / "nope")


def test_adversarial_corpus_in_a_subprocess():
    # by path, under its own name: fuzz/make_corpus.py (the codec's) has the same file name
    spec = importlib.util.spec_from_file_location("st_make_corpus", CORPUS / "make_corpus.py")
    make_corpus = sys.modules["st_make_corpus"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    files = sorted(CORPUS.glob("*.safetensors"))
    assert len(files) >= 45 and {f.stem for f in files} == set(make_corpus.CASES) == set(make_corpus.EXPECT)
    # In a child: a crash there fails this test instead of the whole run.  For each
    # file, each stage prints OK or the exception's type name and message.
    script = (
        "import sys; sys.path.insert(0, 'tests'); import _st_support\n"
        "from modelopt_c import _conversion as C\n"
        "stages = [('header', C.st_read_header), ('read', C.st_read),\n"
        "          ('verify', lambda f: C.st_read(f, verify=True))]\n"
        "for f in sys.argv[1:]:\n"
        "    for stage, fn in stages:\n"
        "        try:\n"
        "            fn(f)\n"
        "            print(repr((f, stage, 'OK', '')))\n"
        "        except Exception as e:\n"
        "            print(repr((f, stage, type(e).__name__, str(e))))\n"
        "print('DONE')\n"
    )
    run = subprocess.run([sys.executable, "-c", script, *map(str, files)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert lines[-1] == "DONE"
    import ast
    import re

    order = ["header", "read", "verify"]
    for line in lines[:-1]:
        f, stage, kind, msg = ast.literal_eval(line)
        fails_at, pattern = make_corpus.EXPECT[Path(f).stem]
        if order.index(stage) < order.index(fails_at):
            assert kind == "OK", (f, stage, kind, msg)
            continue
        assert kind == "CheckpointError", (f, stage, kind, msg)
        assert msg.startswith(f + ": "), msg
        if stage == fails_at:  # later stages may stop at an earlier check (verify precedes mapping)
            assert re.search(pattern, msg[len(f) + 2:]), (f, stage, msg)


# the leak loops over the reader and writer: tests/isolated/safetensors.py (tests/test_isolated.py)


# ----------------------------------------------------------------- tensor kinds (issue 9)


class _Subclass(torch.Tensor):
    """A plain tensor subclass (torch.Tensor._make_subclass)."""


class _Wrapper(torch.Tensor):
    """A __torch_dispatch__ wrapper subclass whose own storage holds nothing."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.inner if isinstance(t, _Wrapper) else t  # noqa: E731
        return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})


def test_writer_refuses_tensor_kinds_dlpack_cannot_describe(tmp_path):
    path = tmp_path / "k.safetensors"
    _conversion.st_write(path, {"old": torch.ones(3)}, {})
    old = path.read_bytes()
    base = torch.arange(6.0).reshape(2, 3)
    p = str(path)
    cases = [
        (TypeError, {"s": torch.Tensor._make_subclass(_Subclass, base)},
         rf"{p}: tensor 's' is a _Subclass, a torch.Tensor subclass whose storage need not hold its values: "
         r"save a plain tensor"),
        (TypeError, {"w": _Wrapper(base)}, rf"{p}: tensor 'w' is a _Wrapper, a torch.Tensor subclass"),
        (CheckpointError, {"sp": base.to_sparse()},
         rf"{p}: tensor 'sp' is sparse: save `to_dense\(\)`, or its indices and values as separate tensors"),
        (CheckpointError, {"csr": base.to_sparse_csr()},
         rf"{p}: tensor 'csr' has layout torch.sparse_csr: only strided \(dense\) tensors can be stored"),
        (CheckpointError, {"q": torch.quantize_per_tensor(base, 0.1, 0, torch.qint8)},
         rf"{p}: tensor 'q' is quantized: save `int_repr\(\)` with its scale and zero point, or `dequantize\(\)`"),
        (CheckpointError, {"m": torch.empty(2, device="meta")}, rf"{p}: tensor 'm' is on the meta device"),
        (CheckpointError, {"n": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])},
         rf"{p}: tensor 'n' is a nested tensor: save its components \(`unbind\(\)`\)"),
    ]
    for exc, tensors, message in cases:
        with pytest.raises(exc, match=message):
            _conversion.st_write(path, {"ok": torch.ones(2), **tensors}, {})
        assert path.read_bytes() == old and _no_temp_files(tmp_path)
    # a Parameter is a plain tensor
    _conversion.st_write(path, {"p": torch.nn.Parameter(base.clone())}, {})
    assert same(_conversion.st_read(path)[1]["p"], base)


def test_save_refuses_a_dtensor_in_a_one_rank_process_group(tmp_path):
    script = (
        "import os, sys; sys.path.insert(0, 'tests'); import _st_support, torch\n"
        "import torch.distributed as dist\n"
        "from torch.distributed.device_mesh import init_device_mesh\n"
        "from torch.distributed.tensor import Shard, distribute_tensor\n"
        "from modelopt_c import st_format\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=sys.argv[2])\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "mesh = init_device_mesh('cpu', (1,))\n"
        "dt = distribute_tensor(torch.arange(4.0), mesh, [Shard(0)])\n"
        "for sd in ({'w': dt}, {'w': torch.nn.Parameter(dt)}):\n"
        "    try:\n"
        "        st_format.save_file(sys.argv[1], sd, {'modelopt_state_dict': [], 'modelopt_version': '0'})\n"
        "        print('SAVED')\n"
        "    except TypeError as e:\n"
        "        print('TypeError', e)\n"
        "dist.destroy_process_group()\n"
    )
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "d.safetensors"
    run = subprocess.run([sys.executable, "-c", script, str(path), str(port)], cwd=ROOT, capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [ln for ln in run.stdout.strip().splitlines() if not ln.startswith("[Gloo]")]  # torch < 2.13 logs
    assert len(lines) == 2 and not path.exists()
    for line in lines:
        assert line.startswith(f"TypeError {path}: tensor 'w' is a DTensor (a sharded tensor): gather it, e.g. "
                               "`full_tensor()`, or save with the torch format / DCP; sharded saves are not "
                               "supported yet"), line


def test_conjugate_and_negative_views_keep_their_sign(tmp_path):
    z = torch.complex(torch.tensor([1.0, -2.0, 3.5]), torch.tensor([0.5, 4.0, -6.0]))
    neg = z.conj().imag  # a negative-bit view
    assert neg.is_neg()
    neg2 = torch.arange(4.0)._neg_view()
    assert neg2.is_neg()
    path = tmp_path / "c.safetensors"
    _conversion.st_write(path, {"neg": neg, "neg2": neg2, "real": z.conj().real}, {})
    _, got = _conversion.st_read(path, verify=True)
    assert got["neg"].tolist() == [-0.5, -4.0, 6.0]
    assert got["neg2"].tolist() == [-0.0, -1.0, -2.0, -3.0]
    assert got["real"].tolist() == [1.0, -2.0, 3.5]
    # complex itself is not a safetensors dtype here: refused, whatever its conj bit
    with pytest.raises(CheckpointError, match=r"tensor 'c' has dtype torch.complex64, which the format cannot store"):
        _conversion.st_write(path, {"c": z.conj()}, {})


# ----------------------------------------------------------------- integrity (issue 9)


def test_load_file_verifies_checksums_by_default(tmp_path):
    path = tmp_path / "v.safetensors"
    st_format.save_file(path, {"w": torch.arange(64.0)}, sample_state())
    _, info, start = st_format.read_header(path)
    data = bytearray(path.read_bytes())
    data[start + info["w"][3] - 2] ^= 0x40  # one bit of w's last element
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{path}: tensor 'w': checksum mismatch \(stored xxh64 [0-9a-f]{{16}}, "
                                              r"data has [0-9a-f]{16}\): the file is corrupt"):
        st_format.load_file(path)
    _, sd = st_format.load_file(path, verify=False)
    assert sd["w"][:63].tolist() == list(map(float, range(63))) and sd["w"][63].item() != 63.0
    # a modelopt_c file stripped of its checksums is refused unless verify=False
    metadata, tensors = _conversion.st_read(path)
    metadata = {k: v for k, v in metadata.items() if not k.startswith("checksum")}
    _conversion.st_write(path, {k: v.clone() for k, v in tensors.items()}, metadata)
    del tensors
    from safetensors.torch import load_file as plain_load, save_file as plain_save

    plain_save(plain_load(str(path)), str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=rf"{path}: the file has no checksums to verify \(modelopt_c always "
                                              r"writes them.*pass verify=False to load it unchecked"):
        st_format.load_file(path)
    assert st_format.load_file(path, verify=False)[1]["w"].shape == (64,)


def test_a_huge_header_of_empty_tensors_costs_linear_memory(tmp_path):
    # 200k zero-element tensors (a 12 MB header): memory per entry stays small and the
    # whole read finishes (no quadratic step); checked in a child with a bounded heap.
    script = (
        "import resource, struct, sys; sys.path.insert(0, 'tests'); import _st_support\n"
        "from modelopt_c import _conversion as C\n"
        "n = 200_000; p = sys.argv[1]\n"
        "hdr = b'{' + b','.join(b'\"t%d\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}' % i\n"
        "                       for i in range(n)) + b'}'\n"
        "open(p, 'wb').write(struct.pack('<Q', len(hdr)) + hdr); del hdr\n"
        "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "md, t, _ = C.st_read_header(p); assert len(t) == n; del md, t\n"
        "r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "md, t = C.st_read(p); assert len(t) == n and t['t7'].shape == (0,)\n"
        "r2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((r1 - r0) * 1024 // n, (r2 - r0) * 1024 // n)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "h.safetensors")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    header_per_entry, read_per_entry = map(int, run.stdout.split())
    if not os.environ.get("MODELOPT_C_SANITIZE"):  # ASan's allocator has its own overheads
        assert header_per_entry < 400, header_per_entry  # bytes per 59-byte header entry
        assert read_per_entry < 1500, read_per_entry  # + one torch tensor object each


def test_verify_hashes_large_files_on_several_threads_and_finds_each_damage(tmp_path):
    # > 64 MiB spread over several tensors: the hash pass runs on worker threads
    path = tmp_path / "big.safetensors"
    src = {f"t{i}": torch.full((6 << 20,), float(i)) for i in range(4)}  # 4 x 24 MiB
    src["small"] = torch.arange(10, dtype=torch.int16)
    _conversion.st_write(path, src, {})
    _, got = _conversion.st_read(path, verify=True)
    assert all(same(src[k], got[k]) for k in src)
    del got
    _, info, start = _conversion.st_read_header(path)
    for victim in ("t0", "t3", "small"):
        with open(path, "r+b") as f:
            f.seek(start + info[victim][3] - 1)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x80]))
        with pytest.raises(CheckpointError, match=rf"{path}: tensor '{victim}': checksum mismatch"):
            _conversion.st_read(path, verify=True)
        with open(path, "r+b") as f:  # repair, so the next victim is the only damage
            f.seek(start + info[victim][3] - 1)
            f.write(byte)
    _conversion.st_read(path, verify=True)
