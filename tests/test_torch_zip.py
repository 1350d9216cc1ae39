"""The fast reader of torch's zip format (modelopt_c.torch_zip).

Two promises: on the files ``save`` and ``torch.save`` write it gives exactly what
``torch.load(mmap=True, weights_only=True, map_location="cpu")`` gives (types, values,
dtypes, strides, shared storages, requires_grad); and on anything else it answers None
(the caller then uses torch.load) without running anything the file names.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict

import pytest
import torch

import modelopt_c as mto
from modelopt_c import torch_zip


def fast_load(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return torch_zip.load(fd)
    finally:
        os.close(fd)


def same(a, b, path="root"):
    """a and b equal as torch.load would make them: types, values, tensor layouts."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride(), a.storage_offset()) == (b.dtype, b.shape, b.stride(), b.storage_offset()), path
        assert a.requires_grad == b.requires_grad, path
        assert a.device == b.device == torch.device("cpu"), path
        assert a.untyped_storage().nbytes() == b.untyped_storage().nbytes(), path
        assert torch.equal(a.view(torch.uint8) if a.dtype.is_floating_point and a.dtype.itemsize == 1 else a,
                           b.view(torch.uint8) if b.dtype.is_floating_point and b.dtype.itemsize == 1 else b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            same(a[k], b[k], f"{path}[{k!r}]")
        assert getattr(a, "__dict__", {}).keys() == getattr(b, "__dict__", {}).keys(), path
        if isinstance(a, OrderedDict) and hasattr(a, "_metadata"):
            assert a._metadata == b._metadata, path
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def storages_shared(obj):
    """The pattern of storage sharing among the tensors of obj, as index pairs."""
    tensors = []

    def walk(o):
        if isinstance(o, torch.Tensor):
            tensors.append(o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(obj)
    ptrs = [t.untyped_storage().data_ptr() for t in tensors if t.untyped_storage().nbytes()]
    return {(i, j) for i in range(len(ptrs)) for j in range(i) if ptrs[i] == ptrs[j]}


def _saveable(t):
    """Whether this torch can torch.save a tensor of t's dtype (older ones lack some)."""
    try:
        torch.save(t, io.BytesIO())
        return True
    except (KeyError, RuntimeError):
        return False


def sample_objects():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tied = torch.nn.Parameter(torch.randn(3, 5))
    sd = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).state_dict()
    yield "state_dict", sd
    yield "dtypes", {
        str(dt): t
        for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                   torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
                   torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2)
        if _saveable(t := (torch.arange(6) % 2).to(dt) if dt is not torch.bool else torch.tensor([True, False]))
    }
    yield "views", {"base": base, "row": base[1], "col": base[:, 2], "t": base.t(), "tail": base.view(-1)[5:]}
    yield "shared_and_tied", {"w": tied, "again": tied, "detached": tied.detach(), "list": [tied, base]}
    yield "empty_and_scalars", {"e": torch.empty(0, 3), "s": torch.tensor(3.5), "z": torch.zeros(2, 0, 4)}
    yield "grad", {"p": torch.nn.Parameter(torch.ones(2)), "req": torch.ones(3, requires_grad=True)}
    yield "modelopt_like", {
        "modelopt_state": {
            "modelopt_state_dict": [
                ("quantize", {"config": {"quant_cfg": {"*weight": {"num_bits": 8, "axis": None}}, "algorithm": "max"},
                              "metadata": {"amax": torch.tensor([1.5, 2.0]), "sl": slice(1, None, 2),
                                           "shape": torch.Size([4, 2]), "names": {"a", "b"}, "raw": b"\x00\xff"}}),
            ],
            "modelopt_version": "0.47.0",
        },
        "model_state_dict": sd,
    }


@pytest.mark.parametrize("label,obj", list(sample_objects()), ids=[label for label, _ in sample_objects()])
def test_same_objects_as_torch_load(tmp_path, label, obj):
    path = tmp_path / f"{label}.pt"
    torch.save(obj, path)
    ours = fast_load(path)
    assert ours is not None, "the fast reader refused a plain torch.save file"
    with torch.serialization.safe_globals([slice]):  # as modelopt_c's own torch.load allows
        theirs = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    same(ours, theirs)
    assert storages_shared(ours) == storages_shared(theirs)


def test_checkpoints_of_both_libraries_take_the_fast_path(tmp_path):
    nvidia = pytest.importorskip("modelopt.torch.opt")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    for writer, name in ((mto.save, "ours.pt"), (nvidia.save, "theirs.pt")):
        writer(model, tmp_path / name)
        got = fast_load(tmp_path / name)
        assert got is not None, name
        same(got, torch.load(tmp_path / name, weights_only=True, mmap=True, map_location="cpu"))
        restored = mto.restore(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)),
                               tmp_path / name)
        for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
            assert torch.equal(a, b)


def test_tensors_are_private_views_that_outlive_everything(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"a": torch.arange(1000, dtype=torch.int32)}, path)
    before = path.read_bytes()
    t = fast_load(path)["a"]
    import gc

    gc.collect()
    t += 1  # copy-on-write: the file keeps its bytes
    assert torch.equal(t, torch.arange(1, 1001, dtype=torch.int32))
    assert path.read_bytes() == before
    path.unlink()
    gc.collect()
    assert int(t.sum()) == sum(range(1, 1001))


# ---- files the fast reader must leave to torch.load ----------------------------------------


class _T:
    """A stand-in for a tensor in a crafted pickle: how it reduces is up to the test."""

    def __init__(self, reduce):
        self.reduce = reduce


def _storage(key="0", numel=4, kind=None, location="cpu"):
    return ("storage", kind or torch.ByteStorage, key, location, numel)


def _tensor(size=(4,), stride=(1,), offset=0, state=None, key="0", numel=4, location="cpu", hooks=None):
    args = (_Pid(_storage(key, numel, location=location)), offset, size, stride, False, hooks or OrderedDict())
    return _T((torch._utils._rebuild_tensor_v2, args) + ((state,) if state is not None else ()))


class _Pid:
    def __init__(self, pid):
        self.pid = pid


class _Crafter(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Pid) else None

    def reducer_override(self, obj):
        return obj.reduce if isinstance(obj, _T) else NotImplemented


def crafted(tmp_path, obj, data=b"\x01\x02\x03\x04", name="c.pt", version=b"3\n"):
    """A zip laid out as torch's: archive/data.pkl, archive/data/0, version, byteorder."""
    buf = io.BytesIO()
    _Crafter(buf, protocol=2).dump(obj)
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", data)
        if version is not None:
            z.writestr("archive/version", version)
    return path


def test_crafted_baseline_loads(tmp_path):
    # the crafting itself is right: a well-formed crafted file takes the fast path
    got = fast_load(crafted(tmp_path, {"a": _tensor(), "b": [_tensor(size=(2,), stride=(2,), offset=1)]}))
    assert got["a"].tolist() == [1, 2, 3, 4] and got["b"][0].tolist() == [2, 4]
    assert got["a"].untyped_storage().data_ptr() == got["b"][0].untyped_storage().data_ptr()


@pytest.mark.parametrize(
    "label,obj",
    [
        ("build_on_a_tensor", {"a": _tensor(state=(1, 2, 3, 4))}),
        ("build_on_a_tensor_dict", {"a": _tensor(state={"x": 1})}),
        ("tensor_in_a_tuple", {"a": (_tensor(),)}),
        ("tensor_in_a_set", {"a": _T((set, ([_tensor()],)))}),
        ("tensor_as_a_key", {"a": {_tensor(): 1}}),
        ("out_of_bounds_view", {"a": _tensor(size=(5,))}),
        ("negative_stride", {"a": _tensor(size=(2,), stride=(-1,), offset=3)}),
        ("list_as_shape", {"a": _T((torch._utils._rebuild_tensor_v2, (_Pid(_storage()), 0, [4], (1,), False,
                                                                      OrderedDict())))}),
        ("storage_bigger_than_its_record", {"a": _tensor(numel=5)}),
        ("missing_record", {"a": _tensor(key="7")}),
        ("cuda_location", {"a": _tensor(location="cuda:0")}),
        ("backward_hooks", {"a": _tensor(hooks=OrderedDict(h=1))}),
        ("other_global", {"a": torch.device("cpu")}),
        ("os_system", {"a": _T((os.system, ("echo owned > /dev/null",)))}),
        ("quantized_storage", {"a": _T((torch._utils._rebuild_tensor_v2, (
            _Pid(_storage(kind=torch.QUInt8Storage)), 0, (4,), (1,), False, OrderedDict())))}),
    ],
)
def test_anything_unusual_goes_to_torch_load(tmp_path, label, obj):
    assert fast_load(crafted(tmp_path, obj)) is None


def test_damaged_archives_go_to_torch_load(tmp_path):
    good = crafted(tmp_path, {"a": _tensor()})
    assert fast_load(good) is not None
    assert fast_load(crafted(tmp_path, {"a": _tensor()}, version=None, name="nover.pt")) is None
    assert fast_load(crafted(tmp_path, {"a": _tensor()}, version=b"99\n", name="v99.pt")) is None
    raw = good.read_bytes()
    pkl_at = raw.index(b"\x80\x02")
    for label, data in {
        "pickle_byte": raw[: pkl_at + 3] + bytes([raw[pkl_at + 3] ^ 0x40]) + raw[pkl_at + 4 :],  # crc catches it
        "truncated": raw[: len(raw) // 2],
        "no_directory": raw[: raw.rindex(b"PK\x01\x02")],
        "garbage": b"PK\x03\x04" + b"\xff" * 200,
    }.items():
        p = tmp_path / f"{label}.pt"
        p.write_bytes(data)
        assert fast_load(p) is None, label
    # compressed members: torch never writes them
    with zipfile.ZipFile(good) as z, zipfile.ZipFile(tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as out:
        for info in z.infolist():
            out.writestr(info.filename, z.read(info))
    assert fast_load(tmp_path / "deflated.pt") is None


def test_self_reference_and_deep_nesting_terminate(tmp_path):
    loop: list = []
    loop.append(loop)
    got = fast_load(crafted(tmp_path, {"loop": loop, "t": _tensor()}, name="loop.pt"))
    assert got["loop"][0] is got["loop"] and got["t"].tolist() == [1, 2, 3, 4]
    # 50,000 nested lists (pickling them would need as deep a Python recursion: opcodes by hand)
    body = b"\x80\x02}q\x00X\x04\x00\x00\x00deepq\x01" + b"]" * 50_000 + b"K\x01" + b"a" * 50_000 + b"s."
    path = tmp_path / "deep.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", body)
        z.writestr("archive/version", b"3\n")
    got = fast_load(path)
    depth, node = 0, got["deep"]
    while isinstance(node, list) and node and isinstance(node[0], list):
        node, depth = node[0], depth + 1
    assert depth == 49_999 and node == [1]


def test_nothing_named_by_the_file_runs(tmp_path):
    marker = tmp_path / "ran"
    path = crafted(tmp_path, {"a": _T((os.system, (f"touch {marker}",)))})
    assert fast_load(path) is None
    with pytest.raises(mto.CheckpointError, match="refused to load with weights_only=True"):
        mto.load_modelopt_state(path)
    assert not marker.exists()


def test_fast_path_only_for_the_default_options(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 3)
    path = tmp_path / "m.pt"
    mto.save(model, path)
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    mto.restore(torch.nn.Linear(3, 3), path)
    assert calls == []  # the default restore never reaches torch.load
    mto.restore(torch.nn.Linear(3, 3), path, mmap=False)
    mto.restore(torch.nn.Linear(3, 3), path, map_location=lambda s, loc: s)
    assert [sorted(k) for k in calls] == [["map_location", "mmap", "weights_only"]] * 2
    assert calls[0]["mmap"] is False and callable(calls[1]["map_location"])


def test_a_killed_reader_leaves_no_trace(tmp_path):
    # the mapping is private: a child that loads and writes into every tensor changes no byte
    path = tmp_path / "m.pt"
    torch.save({"a": torch.zeros(1 << 16)}, path)
    before = path.read_bytes()
    code = (
        "import os, sys, torch; from modelopt_c import torch_zip\n"
        f"fd = os.open({str(path)!r}, os.O_RDONLY); t = torch_zip.load(fd)['a']; t.fill_(7.0)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert path.read_bytes() == before


def _with_pickle_bytes(raw: bytes, pkl: bytes) -> bytes:
    """raw (a torch.save file) with its data.pkl bytes replaced in place, CRCs patched."""
    import struct
    import zlib

    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
    local = info.header_offset
    nlen, xlen = struct.unpack_from("<HH", raw, local + 26)
    at = local + 30 + nlen + xlen
    assert len(pkl) == info.file_size
    out = bytearray(raw)
    out[at : at + len(pkl)] = pkl
    crc = struct.pack("<I", zlib.crc32(pkl))
    out[local + 14 : local + 18] = crc
    central = raw.index(b"PK\x01\x02")  # the first central entry; then the one with this name
    while raw[central + 46 : central + 46 + len(info.filename)] != info.filename.encode():
        central = raw.index(b"PK\x01\x02", central + 4)
    out[central + 16 : central + 20] = crc
    return bytes(out)


def test_mutated_pickles_never_load_what_torch_refuses(tmp_path):
    """Seeded mutations of the pickle, CRC fixed so they reach the unpickler: whenever the
    fast reader accepts one, torch.load accepts it too and gives the same objects."""
    import random

    obj = {
        "modelopt_state": {"modelopt_state_dict": [("m", {"config": {"r": 0.5, "s": slice(1, 2)}, "metadata": {}})],
                           "modelopt_version": "0.47.0"},
        "model_state_dict": OrderedDict(a=torch.arange(6, dtype=torch.uint8), b=torch.ones(2, 2, dtype=torch.int8)),
    }
    base = tmp_path / "base.pt"
    torch.save(obj, base)
    raw = base.read_bytes()
    with zipfile.ZipFile(base) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    rng = random.Random(20261129)
    accepted = refused = 0
    for i in range(400):
        mutated = bytearray(pkl)
        for _ in range(rng.choice((1, 1, 2, 3))):
            pos = rng.randrange(len(mutated))
            mutated[pos] = rng.choice((mutated[pos] ^ (1 << rng.randrange(8)), rng.randrange(256)))
        path = tmp_path / f"m{i}.pt"
        path.write_bytes(_with_pickle_bytes(raw, bytes(mutated)))
        ours = fast_load(path)
        if ours is None:
            refused += 1
            continue
        accepted += 1
        with torch.serialization.safe_globals([slice]):
            theirs = torch.load(path, mmap=True, weights_only=True, map_location="cpu")  # must not raise
        same(ours, theirs)
    assert accepted > 20 and refused > 20  # both sides of the property were exercised
