"""The hostile corpus (issue 9): every class of crafted or damaged input, generated.

    python tests/hostile/make_hostile.py OUT_DIR     # write every case's input into OUT_DIR

`CASES` is the one table: for each case the API it is given to, how its input is
built, and the EXPECTED outcome (one or more acceptable alternatives):

    Raises(types, fragment)   the call raises an instance of one of `types` (names,
                              resolved in `EXC`) whose message contains `fragment`
                              ("{path}" stands for the input's path); a restore that
                              raises must also leave the model exactly as it was
                              (parameters, buffers, modules, no _modelopt_state)
    Loads(check, what)        the call returns and CHECKS[check](result, model) holds
    Exits(status, fragment)   the CLI returns `status`, its output (stdout + stderr)
                              contains `fragment` and never a traceback, and a
                              non-zero status comes with exactly one line of output

APIs (see `call` in _child.py): restore (mto.restore into MODELS[case.model]()),
save_restore_pt / save_restore_st (mto.save MODELS[case.model](fill=True) in that format,
then mto.restore into MODELS[case.model]()),
st_load (modelopt_c.st_format.load_file), loads_state (mto.loads_state on the file's
bytes), roundtrip_state (mto.dumps_state(VALUES[...]()) then loads_state),
load_modelopt_state, cli_inspect / cli_verify (modelopt_c.cli.main).

Everything is deterministic (fixed seeds, fixed bytes); generation takes a few
seconds.  The runner is tests/hostile/test_hostile.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import modelopt_c as mto
from modelopt_c import _conversion as C

# ---------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Raises:
    types: tuple[str, ...]
    fragment: str


@dataclass(frozen=True)
class Loads:
    check: str
    what: str


@dataclass(frozen=True)
class Exits:
    status: int
    fragment: str


@dataclass(frozen=True)
class Case:
    name: str
    api: str
    build: Callable[[Path], None] | None  # writes the input at the path (None: no file)
    expect: tuple[Any, ...]  # acceptable outcomes
    why: str
    model: str = "Small"  # restore target, a MODELS key
    value: str = ""  # roundtrip_state: a VALUES key
    alone: bool = False  # may hang today: run in its own child with a short timeout


def exceptions() -> dict[str, type]:
    return {
        "StateDecodeError": mto.StateDecodeError,
        "CheckpointError": mto.CheckpointError,
        "ValueError": ValueError,
        "TypeError": TypeError,
        "RuntimeError": RuntimeError,
        "OSError": OSError,
    }


EXC = exceptions()

# ---------------------------------------------------------------- models and modes


class Small(nn.Module):
    """The restore target: two parameters and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("scale", torch.ones(2))


def _z() -> torch.Tensor:
    return torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)


class NegModel(nn.Module):
    """A buffer with the negative bit set (a view: x.conj().imag); zeros when not `fill`."""

    def __init__(self, fill: bool = False) -> None:
        super().__init__()
        self.register_buffer("neg", _z().conj().imag if fill else torch.zeros(2))


class ConjModel(nn.Module):
    """A buffer with the conjugate bit set (x.conj()); zeros when not `fill`."""

    def __init__(self, fill: bool = False) -> None:
        super().__init__()
        self.register_buffer("cj", _z().conj() if fill else torch.zeros(2, dtype=torch.complex64))


MODELS: dict[str, Callable[..., nn.Module]] = {"Small": Small, "NegModel": NegModel, "ConjModel": ConjModel}

SLICE = slice(1, 5, 2)
_REGISTRY = None


def register_modes() -> None:
    """A mode whose metadata holds a slice (registered once per process)."""
    global _REGISTRY
    if _REGISTRY is not None:
        return
    _REGISTRY = mto._ModeRegistryCls("hostile_modes")

    class EmptyConfig(mto.ModeloptBaseConfig):
        pass

    def convert(model, config, **kwargs):
        return model, {"window": SLICE, "nested": [slice(None, 3, None)]}

    def restore(model, config, metadata):
        return model

    attrs = {
        "name": property(lambda self: "hostile_slice"),
        "config_class": property(lambda self: EmptyConfig),
        "convert": property(lambda self: convert),
        "restore": property(lambda self: restore),
    }
    _REGISTRY.register_mode(type("HostileSliceMode", (mto.ModeDescriptor,), attrs))


register_modes()


def _small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Small()


# ---------------------------------------------------------------- byte helpers


def st_raw(header: bytes, data: bytes = b"", n: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if n is None else n) + header + data


def _modelopt_metadata() -> dict[str, str]:
    """The __metadata__ of a modelopt_c file holding an empty modelopt state."""
    state = {"modelopt_state_dict": [], "modelopt_version": "0.0.0"}
    return {
        "format": "modelopt_c",
        "format_version": "1",
        "modelopt_state": base64.b64encode(bytes(C.encode_state(state, []))).decode("ascii"),
    }


def st_modelopt(entries: dict[str, dict], data: bytes = b"") -> bytes:
    """A modelopt_c safetensors file (its metadata valid) with the given header entries."""
    return st_raw(json.dumps({"__metadata__": _modelopt_metadata(), **entries}).encode(), data)


def write(data: bytes) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        path.write_bytes(data)

    return build


def lazy(make: Callable[[], bytes]) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        path.write_bytes(make())

    return build


# msgpack pieces (the state codec's wire format, csrc/codec_wire.h)
def mp_str(s: str) -> bytes:
    b = s.encode()
    return (bytes([0xA0 | len(b)]) if len(b) < 32 else b"\xd9" + bytes([len(b)])) + b


def mp_uint(n: int) -> bytes:
    return bytes([n]) if n < 128 else b"\xcf" + struct.pack(">Q", n)


def mp_array(items: list[bytes]) -> bytes:
    return (bytes([0x90 | len(items)]) if len(items) < 16 else b"\xdd" + struct.pack(">I", len(items))) + b"".join(items)


def mp_bin(b: bytes) -> bytes:
    return b"\xc6" + struct.pack(">I", len(b)) + b


def mp_ext(code: int, payload: bytes) -> bytes:
    return b"\xc9" + struct.pack(">I", len(payload)) + bytes([code]) + payload


def inline_tensor(dtype: str, shape: list[int], data: bytes) -> bytes:
    return mp_ext(3, mp_array([mp_str(dtype), mp_array([mp_uint(d) for d in shape]), mp_bin(data)]))


def nested_array_bomb(total: int = 1_400_000, depth: int = 255) -> bytes:
    """`depth` array32 headers, each claiming as many items as there are bytes left
    (so every count passes a bytes-left check), then nils: a decoder that reserves
    `count` slots per level before reading asks for depth * total * 8 bytes."""
    head_len = 5 * depth
    out = bytearray()
    for level in range(depth):
        left = total - head_len + 5 * (depth - level - 1)
        out += b"\xdd" + struct.pack(">I", left)
    out += b"\xc0" * (total - len(out))
    return bytes(out)


# torch-format checkpoints, made with mto.save then edited with torch.load/torch.save
def _saved_torch(model: nn.Module) -> dict:
    buf = io.BytesIO()
    mto.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def pt_edit(edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        obj = _saved_torch(_small(1))
        obj = edit(obj) or obj
        torch.save(obj, path)

    return build


def _key_swap(new_key: Any) -> Callable[[dict], None]:
    def edit(obj: dict) -> None:
        sd = obj["model_state_dict"]
        value = sd.pop("scale")
        sd[new_key] = value

    return edit


def _last_quantized(obj: dict) -> None:
    sd = obj["model_state_dict"]
    for k in list(sd):
        sd[k] = torch.full_like(sd[k], 7.0)  # values the model must NOT end up with
    last = list(sd)[-1]
    sd[last] = torch.quantize_per_tensor(torch.ones(sd[last].shape), 0.5, 0, torch.quint8)


def _valid_pt(state_only: bool = False) -> bytes:
    """A valid torch-format checkpoint of _small(1) (mto.save), or, with `state_only`,
    a modelopt-state file (torch.save(mto.modelopt_state(model)), what
    load_modelopt_state reads)."""
    buf = io.BytesIO()
    if state_only:
        torch.save(mto.modelopt_state(_small(1)), buf)
    else:
        mto.save(_small(1), buf)
    return buf.getvalue()


def _truncate(fraction: float | None = None, keep: int | None = None, drop_tail: int | None = None,
              state_only: bool = False) -> Callable[[], bytes]:
    def make() -> bytes:
        data = _valid_pt(state_only)
        if fraction is not None:
            return data[: int(len(data) * fraction)]
        if keep is not None:
            return data[:keep]
        return data[:-drop_tail]

    return make


def _record_offset(data: bytes, suffix: str) -> tuple[int, int]:
    """(offset of the record's bytes, its length) of the first zip member ending in `suffix`."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    start = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[start + 26 : start + 30])
    return start + 30 + name_len + extra_len, info.compress_size


def _flip_tensor_record() -> bytes:
    """A bit flipped inside a tensor record: the zip CRC of that record no longer matches."""
    data = bytearray(_valid_pt())
    off, size = _record_offset(bytes(data), "data/0")
    data[off + size // 2] ^= 0x10
    return bytes(data)


def _flip_local_header_name(state_only: bool = False) -> bytes:
    """A byte of the first local header's file name changed: the central directory disagrees."""
    data = bytearray(_valid_pt(state_only))
    data[30 + 2] ^= 0x01
    return bytes(data)


def _flip_central_directory(state_only: bool = False) -> bytes:
    data = bytearray(_valid_pt(state_only))
    eocd = bytes(data).rfind(b"PK\x05\x06")
    cd_off = struct.unpack("<I", data[eocd + 16 : eocd + 20])[0]
    data[cd_off + 28] ^= 0xFF  # the first central entry's file-name length
    return bytes(data)


def _saved(model_factory: Callable[[], nn.Module], fmt: str, modes: list | None = None) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        model = model_factory()
        if modes:
            model = _apply(model, modes)
        mto.save(model, path, format=fmt)

    return build


def _apply(model: nn.Module, modes: list) -> nn.Module:
    register_modes()
    return mto.apply_mode(model, modes)


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _huge_header(n: int) -> Callable[[], bytes]:
    def make() -> bytes:
        entries = {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(n)}
        return st_modelopt(entries)

    return make


# ---------------------------------------------------------------- values for roundtrip_state


def _quint(dtype: torch.dtype) -> torch.Tensor:
    return torch.quantize_per_tensor(torch.linspace(0, 1.5, 16), 0.1, 0, dtype)


VALUES: dict[str, Callable[[], Any]] = {
    "quint4x2": lambda: {"t": _quint(torch.quint4x2)},
    "quint2x4": lambda: {"t": _quint(torch.quint2x4)},
    "neg_bit": lambda: {"t": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj().imag},
    "conj_bit": lambda: {"t": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj()},
}

# ---------------------------------------------------------------- checks for Loads


def _check_state_dict_len(n: int) -> Callable[[Any, Any], None]:
    def check(result: Any, model: Any) -> None:
        state, sd = result
        assert len(sd) == n, len(sd)
        assert all(t.numel() == 0 for t in sd.values())

    return check


def _check_stride_overflow(result: Any, model: Any) -> None:
    state, sd = result
    assert tuple(sd["a"].shape) == (0, 2**32, 2**32), sd["a"].shape


def _check_roundtrip(result: Any, model: Any) -> None:
    original, decoded = result
    a, b = original["t"], decoded["t"]
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if a.is_quantized:
        assert torch.equal(a.int_repr(), b.int_repr()), (a.int_repr(), b.int_repr())
    else:
        assert torch.equal(a.resolve_conj().resolve_neg(), b), (a, b)


def _check_neg_model(result: Any, model: Any) -> None:
    assert torch.equal(result.neg, torch.tensor([-2.0, 4.0])), result.neg


def _check_conj_model(result: Any, model: Any) -> None:
    assert torch.equal(result.cj.resolve_conj(), torch.tensor([1 - 2j, 3 + 4j], dtype=torch.complex64)), result.cj


def _check_slice(result: Any, model: Any) -> None:
    state = result._modelopt_state
    (mode, entry), = state
    assert mode == "hostile_slice", mode
    assert entry["metadata"]["window"] == SLICE, entry["metadata"]
    assert entry["metadata"]["nested"] == [slice(None, 3, None)], entry["metadata"]


def _check_quint_decoded(dtype: torch.dtype) -> Callable[[Any, Any], None]:
    def check(result: Any, model: Any) -> None:
        assert isinstance(result, torch.Tensor) and result.dtype == dtype, result

    return check


def _check_small1(result: Any, model: Any) -> None:
    want = _small(1).state_dict()
    got = result.state_dict()
    assert want.keys() == got.keys(), (want.keys(), got.keys())
    assert all(torch.equal(want[k], got[k]) for k in want), "values differ from the saved ones"


def _check_state1(result: Any, model: Any) -> None:
    assert result == mto.modelopt_state(_small(1)), result


CHECKS: dict[str, Callable[[Any, Any], None]] = {
    "small1": _check_small1,
    "state1": _check_state1,
    "huge_header_200k": _check_state_dict_len(200_000),
    "stride_overflow": _check_stride_overflow,
    "roundtrip": _check_roundtrip,
    "neg_model": _check_neg_model,
    "conj_model": _check_conj_model,
    "slice": _check_slice,
    "quint4x2": _check_quint_decoded(torch.quint4x2),
    "quint2x4": _check_quint_decoded(torch.quint2x4),
}

# ---------------------------------------------------------------- the table

CKPT = ("CheckpointError",)
VAL = ("ValueError",)
SDE = ("StateDecodeError",)
P = "{path}"

_T4 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
_ST_LIES = {
    "st_offsets_past_end": st_modelopt({"a": {"dtype": "U8", "shape": [100], "data_offsets": [0, 100]}}, b"\0" * 8),
    "st_header_len_past_eof": st_raw(b"{}", n=4096),
    "st_header_len_2e64": st_raw(b"{}", n=2**64 - 1),
    "st_offsets_reversed": st_modelopt({"a": {"dtype": "U8", "shape": [0], "data_offsets": [8, 0]}}, b"\0" * 8),
    "st_offsets_2e63": st_modelopt({"a": {"dtype": "U8", "shape": [4], "data_offsets": [2**63, 2**63 + 4]}}, b"\0" * 4),
    "st_length_vs_shape": st_modelopt({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
    "st_shape_product_overflow": st_modelopt({"a": {"dtype": "F64", "shape": [2**62, 2**62, 4], "data_offsets": [0, 0]}}),
    "st_overlapping": st_modelopt({"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
                                   "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, b"\0" * 8),
}
_ST_SHAPES = {  # wrong JSON shapes
    "st_json_list": st_raw(b"[1, 2]"),
    "st_entry_list": st_raw(json.dumps({"a": [1, 2]}).encode()),
    "st_entry_int": st_raw(json.dumps({"a": 5}).encode()),
    "st_shape_str": st_raw(json.dumps({"a": {"dtype": "U8", "shape": "2", "data_offsets": [0, 2]}}).encode(), b"\0\0"),
    "st_shape_nested": st_raw(json.dumps({"a": {"dtype": "U8", "shape": [[2]], "data_offsets": [0, 2]}}).encode(), b"\0\0"),
    "st_offsets_dict": st_raw(json.dumps({"a": {"dtype": "U8", "shape": [2], "data_offsets": {"0": 2}}}).encode(), b"\0\0"),
    "st_dtype_int": st_raw(json.dumps({"a": {"dtype": 8, "shape": [2], "data_offsets": [0, 2]}}).encode(), b"\0\0"),
    "st_metadata_list": st_raw(json.dumps({"__metadata__": ["format", "modelopt_c"]}).encode()),
    "st_metadata_value_int": st_raw(json.dumps({"__metadata__": {"format": 1}}).encode()),
    "st_metadata_state_not_base64": st_raw(json.dumps({"__metadata__": {"format": "modelopt_c", "format_version": "1", "modelopt_state": "%%%"}}).encode()),
}


def _cases() -> list[Case]:
    cases: list[Case] = []
    add = cases.append

    # -------- safetensors: the reader (load_file), restore, CLI
    stride = st_modelopt({"a": {"dtype": "F32", "shape": [0, 2**32, 2**32], "data_offsets": [0, 0]}})
    add(Case("st_zero_elem_stride_overflow", "st_load", write(stride),
             (Raises(VAL, P), Loads("stride_overflow", "an empty tensor of that shape")),
             "zero-element tensor whose strides overflow int64: at::from_blob throws; the mapping must be released once"))
    add(Case("st_zero_elem_stride_overflow_restore", "restore", write(stride), (Raises(CKPT, P),),
             "the same file through restore: a clean CheckpointError, model untouched"))
    add(Case("st_stride_overflow_nonzero", "st_load",
             write(st_modelopt({"a": {"dtype": "U8", "shape": [1, 2**40, 2**40, 0], "data_offsets": [0, 0]}})),
             (Raises(VAL, P), Loads("any", "a zero-element tensor")),
             "zero-element, 4-d, overflowing strides in the middle"))
    for name, data in _ST_LIES.items():
        add(Case(name, "st_load", write(data), (Raises(VAL, P),), "lying offsets/lengths: refused before any read"))
    add(Case("st_offsets_past_end_restore", "restore", write(_ST_LIES["st_offsets_past_end"]), (Raises(CKPT, P),),
             "a safetensors-format error through restore is a CheckpointError naming the file"))
    for name, data in _ST_SHAPES.items():
        add(Case(name, "st_load", write(data), (Raises(VAL, P),), "wrong JSON shape in the header"))
    for name in ("st_json_list", "st_entry_list", "st_shape_str", "st_metadata_list"):
        add(Case(name + "_restore", "restore", write(_ST_SHAPES[name]), (Raises(CKPT, P),),
                 "wrong JSON shape through restore: CheckpointError naming the file"))
        for cmd in ("inspect", "verify"):
            add(Case(f"{name}_cli_{cmd}", f"cli_{cmd}", write(_ST_SHAPES[name]), (Exits(1, "{name}"),),
                     "the CLI prints one line, exit 1, no traceback"))
    add(Case("st_huge_header_200k", "st_load_unverified", lazy(_huge_header(200_000)), (Loads("huge_header_200k", "200k empty tensors"),),
             "a ~10 MB header of empty tensors loads within the memory limit (work bounded by the input)"))

    # -------- state codec (loads_state on the bytes; roundtrip_state through dumps_state)
    for dtype, n in (("quint4x2", 2), ("quint2x4", 4)):
        for elems in (64, 1 << 20):
            add(Case(f"codec_inline_{dtype}_{elems}", "loads_state",
                     lazy(lambda d=dtype, e=elems: inline_tensor(d, [e], b"\xab" * e)),
                     (Raises(SDE, dtype), Loads(dtype, f"a {dtype} tensor")),
                     f"inline {dtype} tensor: storage holds N/{n} bytes, N must not be copied in"))
        add(Case(f"codec_encode_{dtype}", "roundtrip_state", None,
                 (Raises(("ValueError", "TypeError"), dtype), Loads("roundtrip", "the same int_repr")), value=dtype,
                 why=f"encoding a {dtype} tensor must not read N bytes out of its N/{n}-byte storage"))
    add(Case("codec_nested_array_bomb", "loads_state", lazy(nested_array_bomb), (Raises(SDE, "byte offset"),),
             "1.4 MB of nested array32 headers each claiming 'bytes left' items: bounded preallocation"))
    add(Case("codec_nested_array_bomb_deep", "loads_state", lazy(lambda: nested_array_bomb(depth=300)),
             (Raises(SDE, "byte offset"),), "the same, deeper than the nesting cap"))
    huge = {
        "codec_array32_huge": b"\xdd\xff\xff\xff\xff\xc0",
        "codec_map32_huge": b"\xdf\xff\xff\xff\xff\xc0\xc0",
        "codec_str32_huge": b"\xdb\xff\xff\xff\xffabc",
        "codec_bin32_huge": b"\xc6\xff\xff\xff\xffabc",
        "codec_ext32_huge": b"\xc9\xff\xff\xff\xff\x03abc",
        "codec_tensor_numel_huge": inline_tensor("float32", [2**31, 2**31], b"\0" * 8),
        "codec_tensor_shape_overflow": inline_tensor("float64", [2**62, 2**62, 4], b""),
        "codec_tensor_65_dims": inline_tensor("uint8", [1] * 65, b"\0"),
        "codec_tuple_array_huge": mp_ext(1, b"\xdd\x7f\xff\xff\xff"),
    }
    for name, data in huge.items():
        add(Case(name, "loads_state", write(data), (Raises(SDE, "byte offset"),), "a count/size far past the input"))
    for value in ("neg_bit", "conj_bit"):
        add(Case(f"codec_{value}", "roundtrip_state", None, (Loads("roundtrip", "the resolved values"),), value=value,
                 why="a tensor with the neg/conj bit: the bytes encoded are the resolved values"))

    # -------- torch format
    for label, key in (("bytes", b"scale"), ("int", 1), ("float", 1.5), ("none", None)):
        # torch's load_state_dict wording (RuntimeError) lists it as an unexpected key, with the file
        add(Case(f"pt_key_{label}", "restore", pt_edit(_key_swap(key)), (Raises(CKPT + ("TypeError", "RuntimeError"), P),),
                 f"a model_state_dict key that is {label}, legal under weights_only"))
        add(Case(f"pt_key_{label}_cli_inspect", "cli_inspect", pt_edit(_key_swap(key)), (Exits(0, ""), Exits(1, "")),
                 "inspect on a non-str key: a summary or one line, never a crash"))
    add(Case("pt_last_tensor_quantized", "restore", pt_edit(_last_quantized),
             (Raises(CKPT + ("TypeError", "RuntimeError"), "quantized"),),
             "every kind checked before the first copy: earlier tensors must not be copied"))
    trunc = {
        "pt_truncated_half": lambda state_only=False: _truncate(fraction=0.5, state_only=state_only)(),
        "pt_truncated_100": lambda state_only=False: _truncate(keep=100, state_only=state_only)(),
        "pt_truncated_tail30": lambda state_only=False: _truncate(drop_tail=30, state_only=state_only)(),
        "pt_flip_local_name": _flip_local_header_name,
        "pt_flip_central_dir": _flip_central_directory,
    }
    for name, make in trunc.items():
        # a changed local-header name with intact central directory and data may load
        # (torch reads by the central directory): then the values must be the saved ones
        ok_load = (Loads("small1", "the saved values"),) if name == "pt_flip_local_name" else ()
        ok_state = (Loads("state1", "the saved modelopt state"),) if name == "pt_flip_local_name" else ()
        add(Case(name, "restore", lazy(make), (Raises(CKPT, P),) + ok_load,
                 "damaged zip: CheckpointError naming the file"))
        add(Case(name + "_state", "load_modelopt_state", lazy(lambda m=make: m(state_only=True)),
                 (Raises(CKPT, P),) + ok_state, "damaged zip (a modelopt-state file) through load_modelopt_state"))
        add(Case(name + "_cli_verify", "cli_verify", lazy(make), (Exits(1, "{name}"),) + (
            (Exits(0, "{name}"),) if ok_load else ()), "verify: one line, exit 1"))
    add(Case("pt_flip_tensor_record_cli_verify", "cli_verify", lazy(_flip_tensor_record), (Exits(1, "{name}"),),
             "verify checks the zip records' CRCs"))
    add(Case("pt_top_list", "restore", write(_torch_bytes([1, 2])), (Raises(CKPT, P),), "a list where a dict belongs"))
    add(Case("pt_top_list_cli_inspect", "cli_inspect", write(_torch_bytes([1, 2])), (Exits(1, "{name}"),),
             "a list where a dict belongs: one line, exit 1"))
    add(Case("pt_state_int_cli_inspect", "cli_inspect",
             pt_edit(lambda o: o.__setitem__("modelopt_state", 5)), (Exits(1, "{name}"),),
             "an int where the modelopt state belongs"))
    add(Case("pt_state_dict_list_cli_inspect", "cli_inspect",
             pt_edit(lambda o: o.__setitem__("model_state_dict", [1, 2])), (Exits(1, "{name}"),),
             "a list where the model_state_dict belongs"))
    add(Case("pt_slice_metadata", "restore", _saved(_small, "torch", ["hostile_slice"]), (Loads("slice", "the slice back"),),
             "a slice in a mode's metadata is saved and restored (torch format)"))
    add(Case("st_slice_metadata", "restore", _saved(_small, "safetensors", ["hostile_slice"]), (Loads("slice", "the slice back"),),
             "a slice in a mode's metadata is saved and restored (safetensors format)"))
    for fmt, prefix in (("torch", "pt"), ("safetensors", "st")):
        add(Case(f"{prefix}_neg_bit_buffer", f"save_restore_{prefix}", None, (Loads("neg_model", "[-2, 4]"),),
                 "save a model whose buffer has the neg bit, restore into a fresh one: the resolved values",
                 model="NegModel"))
        # safetensors has no complex dtypes: there the save refuses the tensor, naming it
        conj_expect = (Loads("conj_model", "[1-2j, 3+4j]"),) if fmt == "torch" else (Raises(CKPT, "cannot store"),)
        add(Case(f"{prefix}_conj_bit_buffer", f"save_restore_{prefix}", None, conj_expect,
                 "save a model whose buffer has the conj bit, restore into a fresh one: the resolved values",
                 model="ConjModel"))

    # -------- non-regular files
    add(Case("fifo_restore", "restore", _fifo, (Raises(CKPT + VAL + ("OSError",), P),), "a FIFO must not hang restore",
             alone=True))
    add(Case("fifo_load_modelopt_state", "load_modelopt_state", _fifo, (Raises(CKPT + VAL + ("OSError",), P),),
             "a FIFO must not hang load_modelopt_state", alone=True))
    return cases


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


CHECKS["any"] = lambda result, model: None
_ALL = _cases()
CASES: dict[str, Case] = {c.name: c for c in _ALL}
assert len(CASES) == len(_ALL), "duplicate case names"


def input_path(out_dir: Path, case: Case) -> Path:
    return out_dir / f"{case.name}.bin"


def generate(out_dir: Path, names: list[str] | None = None) -> None:
    """Write the inputs of `names` (default: all cases) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names or list(CASES):
        case = CASES[name]
        if case.build is not None:
            path = input_path(out_dir, case)
            if path.exists() or path.is_fifo():
                path.unlink()
            case.build(path)


if __name__ == "__main__":
    generate(Path(sys.argv[1]))
    print(f"{len(CASES)} cases written to {sys.argv[1]}")
