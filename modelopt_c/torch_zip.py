"""A fast, restricted reader for torch's zip checkpoint format (what ``torch.save`` writes).

``torch.load(weights_only=True)`` unpickles with a pure-Python interpreter whose cost per
tensor grows with the file (50,000 tensors: 12 s here, most of a restore).  This reader
gets the same objects from the same bytes with CPython's C unpickler, restricted to the
handful of globals a checkpoint of ``save`` holds, and tensors that are views over one
private (copy-on-write) mapping of the file, as ``torch.load(mmap=True)`` gives.

It is a fast path, not a second loader: :func:`load` returns ``None`` whenever a file
uses anything outside that small subset (another global, a tensor on another device, a
storage that is not where the zip directory says, a damaged archive...), and the caller
then loads the file with ``torch.load(weights_only=True)`` as before, with torch's own
checks and messages.  Nothing a file says is ever called except the allowed constructors
below; no object of the file's choosing has ``__setstate__`` run on it (tensors are
placeholders until the whole pickle has been read).
"""

from __future__ import annotations

import gc
import hashlib
import io
import mmap
import os
import pickle
import struct
import types
import zlib
from collections import OrderedDict
from typing import Any

import torch

__all__ = ["load", "save"]

_MAX_PICKLE = 1 << 31  # data.pkl is read into memory; more than 2 GiB of pickle is not a state dict
_VERSIONS = (b"1", b"2", b"3")  # the record formats torch.save has written (others: torch.load)


class _Unsupported(Exception):
    """The file needs more than this reader does: load it with torch.load instead."""


# ---- the zip directory ---------------------------------------------------------------------

_EOCD = struct.Struct("<IHHHHIIH")  # end of central directory
_EOCD64_LOC = struct.Struct("<IIQI")
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_CDIR = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory file header
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header


def _zip_index(buf: mmap.mmap) -> dict[str, tuple[int, int, int]]:
    """name -> (data offset, size, crc32) for every stored (uncompressed) member.

    Every offset and size is checked against the file; anything torch does not write
    (compression, encryption, multi-disk, sizes that disagree) is _Unsupported.
    """
    size = len(buf)
    tail = max(0, size - (1 << 16) - _EOCD.size)
    at = buf.rfind(b"PK\x05\x06", tail)
    if at < 0 or at + _EOCD.size > size:
        raise _Unsupported("no end-of-directory record")
    _, disk, cd_disk, _, count, cd_size, cd_off, _ = _EOCD.unpack_from(buf, at)
    if disk or cd_disk:
        raise _Unsupported("multi-disk archive")
    if count == 0xFFFF or 0xFFFFFFFF in (cd_size, cd_off):
        loc = at - _EOCD64_LOC.size
        if loc < 0 or buf[loc : loc + 4] != b"PK\x06\x07":
            raise _Unsupported("zip64 locator missing")
        _, _, rec, _ = _EOCD64_LOC.unpack_from(buf, loc)
        if rec + _EOCD64.size > size or buf[rec : rec + 4] != b"PK\x06\x06":
            raise _Unsupported("zip64 record out of range")
        _, _, _, _, disk, cd_disk, _, count, cd_size, cd_off = _EOCD64.unpack_from(buf, rec)
        if disk or cd_disk:
            raise _Unsupported("multi-disk archive")
    if cd_off + cd_size > size or count > cd_size // _CDIR.size + 1:
        raise _Unsupported("central directory out of range")
    index: dict[str, tuple[int, int, int]] = {}
    pos, end = cd_off, cd_off + cd_size
    for _ in range(count):
        if pos + _CDIR.size > end:
            raise _Unsupported("central directory truncated")
        (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, xlen, clen, _, _, _, local) = _CDIR.unpack_from(
            buf, pos
        )
        name_at = pos + _CDIR.size
        pos = name_at + nlen + xlen + clen
        if sig != 0x02014B50 or pos > end:
            raise _Unsupported("bad central directory entry")
        if method != 0 or flags & 0x1:
            raise _Unsupported("compressed or encrypted member")
        if 0xFFFFFFFF in (csize, usize, local):
            csize, usize, local = _zip64_extra(buf, name_at + nlen, xlen, csize, usize, local)
        if csize != usize or local + _LOCAL.size > size:
            raise _Unsupported("member sizes disagree or header out of range")
        lsig, *_, lnlen, lxlen = _LOCAL.unpack_from(buf, local)
        data = local + _LOCAL.size + lnlen + lxlen
        raw = buf[name_at : name_at + nlen]
        if lsig != 0x04034B50 or data + usize > size or buf[local + _LOCAL.size : local + _LOCAL.size + lnlen] != raw:
            raise _Unsupported("member data out of range, or local and central names differ")
        name = raw.decode("utf-8", "replace")
        if name in index:
            raise _Unsupported("duplicate member")
        index[name] = (data, usize, crc)
    return index


def _zip64_extra(buf: mmap.mmap, at: int, n: int, csize: int, usize: int, local: int) -> tuple[int, int, int]:
    end = at + n
    while at + 4 <= end:
        tag, length = struct.unpack_from("<HH", buf, at)
        body, at = at + 4, at + 4 + length
        if at > end:
            break
        if tag != 0x0001:
            continue
        fields = []
        for wanted in (usize, csize, local):
            if wanted == 0xFFFFFFFF:
                if body + 8 > at:
                    raise _Unsupported("zip64 extra field truncated")
                fields.append(struct.unpack_from("<Q", buf, body)[0])
                body += 8
            else:
                fields.append(wanted)
        return fields[1], fields[0], fields[2]
    raise _Unsupported("zip64 extra field missing")


# ---- the restricted unpickler ---------------------------------------------------------------


class _Frozen:
    """Placeholders the file can name but never change: BUILD on them is refused."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise _Unsupported("state set on a placeholder")


class _StorageType(_Frozen):
    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _Storage(_Frozen):
    __slots__ = ("dtype", "key", "numel")

    def __init__(self, dtype: torch.dtype, key: str, numel: int) -> None:
        self.dtype, self.key, self.numel = dtype, key, numel


class _TensorRef(_Frozen):
    """A tensor to be made once the whole pickle is read, so no opcode reaches a real tensor."""

    __slots__ = ("storage", "offset", "size", "stride", "requires_grad", "dtype")

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, dtype: Any) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.requires_grad, self.dtype = requires_grad, dtype


def _rebuild_tensor_v2(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, metadata: Any = None
) -> _TensorRef:
    if not isinstance(storage, _Storage) or hooks or metadata:
        raise _Unsupported("tensor with hooks or metadata")
    return _TensorRef(storage, offset, size, stride, requires_grad, storage.dtype)


class _ParamRef(_Frozen):
    """An nn.Parameter over a _TensorRef, made with it."""

    __slots__ = ("data", "requires_grad")

    def __init__(self, data: _TensorRef, requires_grad: Any) -> None:
        self.data, self.requires_grad = data, requires_grad


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any) -> _ParamRef:
    if type(data) is not _TensorRef or type(requires_grad) is not bool or hooks:
        raise _Unsupported("parameter")
    return _ParamRef(data, requires_grad)


def _rebuild_tensor_v3(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> _TensorRef:
    """torch.save's form for dtypes newer than the typed storages (float8, uint16...)."""
    if not isinstance(storage, _Storage) or storage.dtype != torch.uint8 or hooks or metadata:
        raise _Unsupported("tensor with hooks or metadata")
    if not isinstance(dtype, torch.dtype) or dtype not in _DTYPES.values():  # type: ignore[union-attr]
        raise _Unsupported("dtype")
    return _TensorRef(storage, offset, size, stride, requires_grad, dtype)


def _bytes(text: Any, encoding: Any) -> bytes:
    """How protocol 2 writes bytes: _codecs.encode(text, "latin1"); nothing else."""
    if type(text) is not str or encoding != "latin1":
        raise _Unsupported("codecs")
    return text.encode("latin1")


def _tables() -> tuple[dict[str, torch.dtype], dict[str, torch.dtype]]:
    """(typed storage class name -> dtype, dtype name -> dtype): plain dtypes only.

    Quantized dtypes (and any dtype torch cannot make an element of) are left out, so
    files holding them go through torch.load.
    """
    storages, dtypes = {}, {}
    for dtype in list(torch.storage._dtype_to_storage_type_map()) + list(torch.storage._new_dtypes()):
        name = str(dtype).removeprefix("torch.")
        if name.startswith(("q", "bits")) or dtype.itemsize < 1:
            continue  # quantized and opaque bit dtypes
        dtypes[name] = dtype
        legacy = torch.storage._dtype_to_storage_type_map().get(dtype)
        if legacy is not None:
            storages[legacy] = dtype
    return storages, dtypes


_STORAGES: dict[str, torch.dtype] | None = None
_DTYPES: dict[str, torch.dtype] | None = None

_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("_codecs", "encode"): _bytes,
    ("builtins", "slice"): slice,
    ("__builtin__", "slice"): slice,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
}


def _torch_allows(module: str, name: str) -> bool:
    """Whether torch's own weights_only loader allows this global (slice: modelopt_c allows it).

    The fast path must never accept a file that torch.load would refuse, on whichever
    torch is installed (older releases allow fewer globals, e.g. no ``set`` before 2.6).
    """
    if module == "__builtin__":
        module = "builtins"
    if (module, name) == ("builtins", "slice"):
        return True
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
    except ImportError:  # a torch without it: only what every weights_only loader has had
        return (module, name) in {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2")}
    return f"{module}.{name}" in _get_allowed_globals()


class _Unpickler(pickle.Unpickler):
    """CPython's C unpickler, able to name only the globals above, storages and dtypes."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if not _torch_allows(module, name):
            raise _Unsupported(f"global {module}.{name}")
        found = _GLOBALS.get((module, name))
        if found is not None:
            return found
        if module == "torch" and name in _STORAGES:  # type: ignore[operator]
            return _StorageType(_STORAGES[name])  # type: ignore[index]
        if module == "torch" and name in _DTYPES:  # type: ignore[operator]
            return _DTYPES[name]  # type: ignore[index]
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return _StorageType(torch.uint8)
        raise _Unsupported(f"global {module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise _Unsupported("persistent id")
        _, kind, key, location, numel = pid
        if not (type(kind) is _StorageType and type(key) is str and type(numel) is int and location == "cpu"):
            raise _Unsupported("storage")
        seen = self.storages.get(key)
        if seen is None:
            seen = self.storages[key] = _Storage(kind.dtype, key, numel)
        elif (seen.dtype, seen.numel) != (kind.dtype, numel):
            raise _Unsupported("one storage, two descriptions")
        return seen


# ---- tensors over the mapping -----------------------------------------------------------------

# What a checkpoint's objects may be made of besides dicts and lists (which may hold
# tensors) and tuples, sets and slices (which may not: they cannot be changed in place).
_SCALARS = (str, int, float, bool, type(None), bytes, bytearray, complex, torch.dtype)
_FROZEN = (tuple, torch.Size, set, frozenset)
_REFS = (_TensorRef, _ParamRef)


class _Maker:
    """Makes each _TensorRef a tensor over its storage's bytes in the mapping, once."""

    def __init__(self, buf: mmap.mmap, index: dict, prefix: str, storages: dict[str, _Storage]) -> None:
        self.bases: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self.made: dict[int, torch.Tensor] = {}
        self.buf, self.index, self.prefix, self.storages = buf, index, prefix, storages

    def base(self, st: _Storage, dtype: torch.dtype) -> torch.Tensor:
        got = self.bases.get((st.key, dtype))
        if got is not None:
            return got
        entry = self.index.get(f"{self.prefix}data/{st.key}")
        if entry is None:
            raise _Unsupported("storage record missing")
        offset, nbytes, _ = entry
        storage_item, itemsize = st.dtype.itemsize, dtype.itemsize
        if st.numel * storage_item != nbytes or nbytes % itemsize or offset % itemsize:
            raise _Unsupported("storage size or alignment")
        if nbytes == 0:
            got = torch.empty(0, dtype=dtype)
        else:
            got = torch.frombuffer(self.buf, dtype=dtype, count=nbytes // itemsize, offset=offset)
        self.bases[(st.key, dtype)] = got
        return got

    def tensor(self, ref: _TensorRef | _ParamRef) -> torch.Tensor:
        t = self.made.get(id(ref))
        if t is not None:
            return t
        if type(ref) is _ParamRef:
            t = self.made[id(ref)] = torch.nn.Parameter(self.tensor(ref.data), requires_grad=ref.requires_grad)
            return t
        size, stride, offset = ref.size, ref.stride, ref.offset
        if not (
            type(size) in (tuple, torch.Size)
            and type(stride) is tuple
            and type(offset) is int
            and len(size) == len(stride)
            and all(type(v) is int for v in (*size, *stride))
            and type(ref.requires_grad) is bool
        ):
            raise _Unsupported("tensor layout")
        t = self.base(ref.storage, ref.dtype).as_strided(size, stride, offset)  # bounds: ATen checks
        if ref.requires_grad:
            t.requires_grad_(True)
        self.made[id(ref)] = t
        return t

    def fill(self, root: Any) -> Any:
        """root with every placeholder replaced; every reachable object is of a known kind.

        Iterative (a crafted pickle can nest deeply or refer to itself).
        """
        if type(root) in _REFS:
            return self.tensor(root)
        seen: set[int] = set()
        todo = [root]
        while todo:
            c = todo.pop()
            if id(c) in seen or type(c) in _SCALARS:
                continue
            seen.add(id(c))
            kind = type(c)
            if kind is dict or kind is OrderedDict:
                for k, v in c.items():
                    if type(v) in _REFS:
                        c[k] = self.tensor(v)
                    elif type(v) not in _SCALARS:
                        todo.append(v)
                    if type(k) not in _SCALARS:
                        todo.append(k)
                if kind is OrderedDict and c.__dict__:
                    todo.append(c.__dict__)  # a state dict's _metadata
            elif kind is list:
                for i, v in enumerate(c):
                    if type(v) in _REFS:
                        c[i] = self.tensor(v)
                    elif type(v) not in _SCALARS:
                        todo.append(v)
            elif kind in _FROZEN or kind is slice:
                items = (c.start, c.stop, c.step) if kind is slice else c
                for v in items:
                    if type(v) in _REFS:
                        raise _Unsupported("tensor inside a tuple, set or slice")
                    if type(v) not in _SCALARS:
                        todo.append(v)
            else:
                raise _Unsupported(f"object of type {kind.__name__}")
        return root


def load(fd: int) -> Any | None:
    """The object in the torch zip file open at ``fd``, or None if it needs torch.load.

    Tensors are CPU views over a private mapping of the file (writes to them never reach
    the file), as with ``torch.load(path, mmap=True, weights_only=True, map_location="cpu")``.
    """
    global _STORAGES, _DTYPES
    if _STORAGES is None:
        _STORAGES, _DTYPES = _tables()
    try:
        size = os.fstat(fd).st_size
        if size < 22:
            return None
        buf = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError):
        return None
    try:
        index = _zip_index(buf)
        pkl = [n for n in index if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise _Unsupported("data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        # What torch's own reader insists on (a file it refuses must not load here):
        # every member under the one archive folder, and a file-format version it reads.
        if not all(name.startswith(prefix) for name in index):
            raise _Unsupported("member outside the archive folder")
        version = index.get(prefix + ".data/version", index.get(prefix + "version"))
        if version is None or bytes(buf[version[0] : version[0] + version[1]]).strip() not in _VERSIONS:
            raise _Unsupported("file-format version")
        order = index.get(prefix + "byteorder")
        if order is not None and bytes(buf[order[0] : order[0] + order[1]]) != b"little":
            raise _Unsupported("big-endian file")
        at, n, crc = index[pkl[0]]
        if n > _MAX_PICKLE:
            raise _Unsupported("pickle too large")
        data = bytes(buf[at : at + n])
        if zlib.crc32(data) != crc:
            raise _Unsupported("data.pkl checksum")
        # The objects made here are acyclic containers; the cycle collector, run again
        # and again as they are made, would be a third of the time.
        collecting = gc.isenabled()
        gc.disable()
        try:
            unpickler = _Unpickler(data)
            obj = unpickler.load()
            return _Maker(buf, index, prefix, unpickler.storages).fill(obj)
        finally:
            if collecting:
                gc.enable()
    except Exception:  # noqa: BLE001 - any surprise: torch.load reads it, with its own errors
        return None
    # The mapping is never closed here: torch.frombuffer keeps a reference to it, not
    # a buffer export, so closing it would unmap memory that tensors still point to.
    # It is unmapped when the last tensor over it is freed.


# ---- the writer ------------------------------------------------------------------------------

_ALIGN = 64  # where torch.save puts every record's data (.storage_alignment); mmap loads rely on it
_FLAGS = 0x0808  # sizes and CRC in a descriptor after the data (streamed), UTF-8 names: as torch writes
_ZIP64_AT = 0xFFFFFFFF  # a size or offset this large goes in zip64 fields (tests lower it)
_MARK = 0xFFFFFFFF  # what a 32-bit field then holds: "see the zip64 field"
_DESCRIPTOR = struct.Struct("<IIII")
_DESCRIPTOR64 = struct.Struct("<IIQQ")


def _field32(value: int) -> int:
    """What a 32-bit size or offset field holds for ``value``: itself, or the zip64 mark."""
    return _MARK if value >= _ZIP64_AT else value


class _ZipWriter:
    """The zip file object ``torch.serialization._save`` writes its records to.

    ``_save`` pickles the object (torch's own pickling: the same data.pkl) and hands
    over each record; this writes them as torch's writer lays them out (data aligned to
    64 bytes by a padding field, streamed with a descriptor after the data, zip64 where
    a size or offset needs it, a zip64 end record always), every byte through a
    :class:`StreamFile` (the CRC-32 computed as the bytes are copied, O_DIRECT writes).
    """

    def __init__(self, sink: Any, archive: str) -> None:
        self.sink, self.archive = sink, archive
        self.entries: list[tuple[bytes, int, int, int]] = []  # (name, header offset, size, crc)

    def write_record(self, name: str, data: Any, nbytes: int) -> None:
        if isinstance(data, str):
            data = data.encode()
        full = f"{self.archive}/{name}".encode()
        offset, big = self.sink.tell(), nbytes >= _ZIP64_AT
        zip64 = struct.pack("<HHQQ", 1, 16, 0, 0) if big else b""
        fixed = offset + _LOCAL.size + len(full) + len(zip64) + 4
        pad = -fixed % _ALIGN
        sizes = _MARK if big else 0  # in the descriptor; the mark says "see the zip64 field" here
        self.sink.write(
            _LOCAL.pack(0x04034B50, 45 if big else 20, _FLAGS, 0, 0, 0, 0, sizes, sizes, len(full), len(zip64) + 4 + pad)
            + full + zip64 + struct.pack("<HH", 0x4246, pad) + bytes(pad)
        )
        if isinstance(data, torch.UntypedStorage):
            if data.nbytes() != nbytes:
                raise ValueError(f"record {name!r}: a storage of {data.nbytes()} bytes, announced as {nbytes}")
            crc = self.sink.write_storage(data)
        else:
            view = memoryview(data).cast("B")
            if view.nbytes != nbytes:
                raise ValueError(f"record {name!r}: {view.nbytes} bytes, announced as {nbytes}")
            crc = self.sink.write(view)
        self.sink.write((_DESCRIPTOR64 if big else _DESCRIPTOR).pack(0x08074B50, crc, nbytes, nbytes))
        self.entries.append((full, offset, nbytes, crc))

    def write_record_metadata(self, name: str, nbytes: int) -> None:
        raise _Unsupported("skip_data: torch.save writes headers without data")

    def write_end_of_file(self) -> None:
        """torch's closing records (format version, a serialization id), then the directory."""
        self.write_record("version", b"3\n", 2)
        # torch derives its id from the records (the same object, the same file); so do we
        digest = hashlib.blake2b(digest_size=16)
        for full, _, nbytes, crc in self.entries:
            digest.update(struct.pack("<IQ", crc, nbytes) + full + b"\0")
        high, low = struct.unpack("<QQ", digest.digest())
        self.write_record(".data/serialization_id", f"{high:020d}{low:020d}".encode(), 40)
        start, directory = self.sink.tell(), []
        for full, offset, nbytes, crc in self.entries:
            values = [v for v in (nbytes, nbytes, offset) if v >= _ZIP64_AT]
            extra = struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""
            version = 45 if values else 20
            directory.append(
                _CDIR.pack(0x02014B50, version, version, _FLAGS, 0, 0, 0, crc, _field32(nbytes), _field32(nbytes),
                           len(full), len(extra), 0, 0, 0, 0, _field32(offset))
                + full + extra
            )
        body = b"".join(directory)
        end, count = start + len(body), len(self.entries)
        tail = _EOCD64.pack(0x06064B50, _EOCD64.size - 12, 45, 45, 0, 0, count, count, len(body), start)
        tail += _EOCD64_LOC.pack(0x07064B50, 0, end, 1)
        tail += _EOCD.pack(0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF), _field32(len(body)),
                           _field32(start), 0)
        self.sink.write(body + tail)


# What a checkpoint's pickle holds by the million: never a storage (torch's persistent_id
# answers None for them), so the pickler need not ask it (1.1 M calls at 50,000 tensors,
# 3.9 s of a 9 s save under the profiler).
_NEVER_STORAGES = frozenset({int, float, str, bytes, bool, type(None), tuple, list, dict, OrderedDict, torch.Size,
                             torch.dtype, torch.device, types.FunctionType, types.BuiltinFunctionType, type})


class _Pickler(pickle.Pickler):
    """The base of the pickler ``torch.serialization._save`` defines: its ``persistent_id``
    (torch's own, unchanged) is asked only about objects that could be storages."""

    def __init__(self, file: Any, protocol: int) -> None:
        torch_persistent_id = self.persistent_id  # torch's subclass method, bound

        def persistent_id(obj: Any) -> Any:
            return None if obj.__class__ in _NEVER_STORAGES else torch_persistent_id(obj)

        self.persistent_id = persistent_id  # type: ignore[method-assign]  # what the C pickler calls
        super().__init__(file, protocol)


_PICKLE_MODULE = types.SimpleNamespace(Pickler=_Pickler)


def archive_name(path: Any) -> str:
    """The folder torch.save names inside the zip: the file's name without its extension;
    "archive" for a name that is not ASCII (torch writes those through a file object) or
    has nothing before its last dot (which torch.save refuses)."""
    base = os.path.basename(os.fsdecode(os.fspath(path)))
    stem = base[: base.rfind(".")] if "." in base else base
    return stem if stem and stem.isascii() else "archive"


def save(obj: Any, path: Any, archive: str) -> bool:
    """Write ``obj`` to the new file ``path`` as ``torch.save(obj, path)`` would (the same
    records: torch pickles them), the zip folder named ``archive``.

    False (``path`` then untouched or partly written: the caller's temp file) when the
    object needs what this writer does not do (``skip_data``): save it with torch.save.
    Write errors raise OSError with the errno.
    """
    from ._conversion import StreamFile

    with StreamFile(path) as sink:  # O_DIRECT unless MODELOPT_C_DIRECT_IO=0
        writer = _ZipWriter(sink, archive)
        try:
            torch.serialization._save(obj, writer, _PICKLE_MODULE, 2, False)
        except _Unsupported:
            return False
        writer.write_end_of_file()
        sink.finish()
    return True
