"""The torch-format writer (modelopt_c/torch_zip.py ``save``, csrc/stream_sink.c, csrc/stream_file.c).

It must write what torch.save writes: the same records (torch pickles them), laid out so
that torch.load (with and without mmap), Python's zipfile (CRCs checked), our own reader
and nvidia-modelopt read them, with every record's data 64-byte aligned.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import zipfile
import zlib

import pytest
import torch

import modelopt_c as mto
from modelopt_c import _conversion, checkpoint, torch_zip
from tests.test_torch_zip import fast_load, same, sample_objects, storages_shared


def records(path):
    """name (without the archive folder) -> bytes, for every record but the random id."""
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every CRC-32 matches its bytes
        return {n.split("/", 1)[1]: z.read(n) for n in z.namelist() if not n.endswith("serialization_id")}


def data_offsets(path):
    """name -> where its data starts (from the local headers)."""
    raw = open(path, "rb").read()
    out = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            o = info.header_offset
            name_len, extra_len = struct.unpack_from("<HH", raw, o + 26)
            out[info.filename] = o + 30 + name_len + extra_len
    return out


def big_objects():
    yield from sample_objects()
    # more than one 8 MiB buffer of the writer, and a size that is no multiple of 4096
    yield "bigger_than_a_buffer", {"big": torch.randn(5_000_001), "small": torch.ones(3)}


@pytest.mark.parametrize("label,obj", list(big_objects()), ids=[label for label, _ in big_objects()])
def test_the_same_records_as_torch_save(tmp_path, label, obj):
    ours, theirs = tmp_path / f"{label}.pt", tmp_path / "theirs" / f"{label}.pt"
    theirs.parent.mkdir()
    assert torch_zip.save(obj, ours, torch_zip.archive_name(ours)) is True
    torch.save(obj, theirs)
    assert records(ours) == records(theirs)
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(theirs) as b:
        assert a.namelist() == b.namelist()  # the same folder name, records in the same order
    assert all(at % 64 == 0 for at in data_offsets(ours).values())
    with torch.serialization.safe_globals([slice]):
        for mmap in (False, True):
            loaded = torch.load(ours, mmap=mmap, weights_only=True)
            same(loaded, torch.load(theirs, mmap=mmap, weights_only=True))
            assert storages_shared(loaded) == storages_shared(obj)
    fast = fast_load(ours)
    assert fast is not None, "our reader refused our writer's file"
    same(fast, loaded)


def test_save_writes_it_and_both_libraries_restore_it(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    mto.save(model, tmp_path / "model.v2.pt")
    with zipfile.ZipFile(tmp_path / "model.v2.pt") as z:
        names = z.namelist()
    assert names[0] == "model.v2/data.pkl" and "model.v2/.data/serialization_id" in names
    again = mto.restore(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
                        tmp_path / "model.v2.pt")
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    nvidia = pytest.importorskip("modelopt.torch.opt")
    theirs = nvidia.restore(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
                            str(tmp_path / "model.v2.pt"))
    for a, b in zip(model.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name,archive", [("model.pt", "model"), ("a.b.c", "a.b"), ("noext", "noext"),
                                          ("modèle.pt", "archive"), (".hidden", "archive")])
def test_archive_names_as_torch_save_names_them(name, archive):
    assert torch_zip.archive_name(f"/some/folder/{name}") == archive


def test_zip64_fields_read_by_every_reader(tmp_path, monkeypatch):
    """Records and offsets past 4 GiB need zip64 fields; the threshold is lowered so a
    small file has them everywhere (local headers, descriptors, the directory)."""
    monkeypatch.setattr(torch_zip, "_ZIP64_AT", 100)
    obj = {"w": torch.arange(300, dtype=torch.float32), "b": torch.ones(2), "meta": [1, "x"]}
    path = tmp_path / "z64.pt"
    assert torch_zip.save(obj, path, "z64")
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("z64/data/0")
        assert info.file_size == 1200 and info.extra[:2] == b"\x01\x00"  # the zip64 field
        assert z.testzip() is None
    at = data_offsets(path)["z64/data/0"]
    assert raw[at + 1200 : at + 1224] == struct.pack("<IIQQ", 0x08074B50, zlib.crc32(raw[at : at + 1200]), 1200, 1200)
    for mmap in (False, True):
        same(torch.load(path, mmap=mmap, weights_only=True), obj)
    same(fast_load(path), obj)


def _takes_o_direct(folder):
    try:
        os.close(os.open(folder / "o_direct_probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
        return True
    except OSError:
        return False
    finally:
        (folder / "o_direct_probe").unlink(missing_ok=True)


def test_buffered_and_direct_writes_give_the_same_file(tmp_path, monkeypatch):
    obj = {"x": torch.randn(3_000_000), "y": torch.arange(5)}
    with _conversion.StreamFile(tmp_path / "probe") as probe:  # O_DIRECT wherever the file system has it
        assert probe.direct is _takes_o_direct(tmp_path)
    torch_zip.save(obj, tmp_path / "a.pt", "m")
    monkeypatch.setenv("MODELOPT_C_DIRECT_IO", "0")
    with _conversion.StreamFile(tmp_path / "probe") as probe:
        assert probe.direct is False
    torch_zip.save(obj, tmp_path / "b.pt", "m")
    assert records(tmp_path / "a.pt") == records(tmp_path / "b.pt")


def test_the_writer_option_of_the_native_save(tmp_path):
    seen = []
    _conversion._save_torch_file(tmp_path / "w.pt", {"x": 1}, _writer=lambda obj, temp: seen.append((obj, temp)))
    assert seen[0][0] == {"x": 1} and os.path.basename(seen[0][1]).startswith(".w.pt.tmp-")
    assert (tmp_path / "w.pt").read_bytes() == b""  # what the writer wrote: nothing
    with pytest.raises(TypeError, match="^_save_torch_file: _writer must be callable or None, not int$"):
        _conversion._save_torch_file(tmp_path / "v.pt", {"x": 1}, _writer=3)
    assert os.listdir(tmp_path) == ["w.pt"]  # nothing written, no temp file left


def test_torch_save_options_and_skip_data_go_to_torch_save(tmp_path):
    t = torch.arange(4.0)
    checkpoint.save_torch_file(tmp_path / "p.pt", {"t": t}, pickle_protocol=4)
    assert records(tmp_path / "p.pt")["data.pkl"][:2] == b"\x80\x04"  # torch.save's, protocol 4
    with torch.serialization.skip_data():
        assert torch_zip.save({"t": t}, tmp_path / "s.pt", "s") is False
        checkpoint.save_torch_file(tmp_path / "s2.pt", {"t": t})  # torch.save writes it instead
    with zipfile.ZipFile(tmp_path / "s2.pt") as z:  # torch.save names the folder after the temp file
        assert [n.split("/", 1)[1] for n in z.namelist()][:5] == [
            "data.pkl", ".format_version", ".storage_alignment", "byteorder", "data/0"]


# ---- StreamFile, the byte pump -------------------------------------------------------------------


def test_stream_file_crcs_and_bytes(tmp_path):
    path = tmp_path / "s.bin"
    payload = torch.randint(0, 255, (9_000_123,), dtype=torch.uint8)
    with _conversion.StreamFile(path, chunk=1 << 20) as f:
        assert f.write(b"head") == zlib.crc32(b"head")
        assert f.write_storage(payload.untyped_storage()) == zlib.crc32(payload.numpy().tobytes())
        assert f.write(memoryview(b"")) == 0 and f.tell() == 4 + 9_000_123
        f.finish()
        assert f.direct is False  # finished
        with pytest.raises(ValueError, match=r"^StreamFile .*s\.bin'\) is finished or closed$"):
            f.write(b"x")
    assert path.read_bytes() == b"head" + payload.numpy().tobytes()


def test_stream_file_refuses_what_it_cannot_read(tmp_path):
    with _conversion.StreamFile(tmp_path / "r.bin") as f:
        with pytest.raises(TypeError, match=r"^write_storage: expected a torch\.UntypedStorage, not Tensor$"):
            f.write_storage(torch.ones(2))
        meta = torch.empty(4, device="meta").untyped_storage()
        with pytest.raises(TypeError, match=r"^write_storage: the storage is on device\(type='meta'\), not the CPU$"):
            f.write_storage(meta)
        with pytest.raises(TypeError):
            f.write("text")  # str has no buffer
        assert f.tell() == 0
    with pytest.raises(ValueError, match="^StreamFile: chunk must be a positive multiple of 4096, at most 2\\*\\*30$"):
        _conversion.StreamFile(tmp_path / "c.bin", chunk=1000)
    with pytest.raises(FileNotFoundError) as info:
        _conversion.StreamFile(tmp_path / "no" / "such" / "f.bin")
    assert info.value.errno == errno.ENOENT and info.value.filename == tmp_path / "no" / "such" / "f.bin"


def test_stream_file_without_direct_io(tmp_path):
    with _conversion.StreamFile(tmp_path / "p.bin", direct=False) as f:
        assert f.direct is False
        f.write(b"abc" * 5000)
        f.finish()
    assert (tmp_path / "p.bin").read_bytes() == b"abc" * 5000
    if os.path.exists("/dev/shm") and os.access("/dev/shm", os.W_OK):  # tmpfs: no O_DIRECT, the same bytes
        shm = f"/dev/shm/modelopt_c_sf_{os.getpid()}"
        try:
            with _conversion.StreamFile(shm) as f:
                f.write(b"xyz" * 7000)
                f.finish()
            assert open(shm, "rb").read() == b"xyz" * 7000
        finally:
            os.unlink(shm)


def test_torchs_persistent_id_is_asked_only_about_possible_storages():
    asked = []

    class Like(torch_zip._Pickler):  # what torch.serialization._save derives from our base
        def persistent_id(self, obj):
            asked.append(type(obj).__name__)
            return ("storage", obj.nbytes()) if isinstance(obj, torch.UntypedStorage) else None

    buf = io.BytesIO()
    Like(buf, 2).dump({"n": [1, 2.5, "s", None, True, (b"x",)], "s": torch.UntypedStorage(3), "d": torch.float16})
    assert asked == ["UntypedStorage"]
    assert b"storage" in buf.getvalue()  # its answer was used
