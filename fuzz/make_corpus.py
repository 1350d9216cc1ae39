"""The codec's corpus (tests/codec_corpus/*.bin) and, in one table, what each file
must do: decode to a given value, or raise StateDecodeError with a given message
fragment.  tests/test_codec.py imports ``corpus()`` and checks both that the files
on disk are exactly these bytes and that each one has its stated outcome.

    python fuzz/make_corpus.py          # from the repo root, after a build

The files are committed (the fuzzers seed from them); rerun after adding a seed
here (names are stable, so existing files are rewritten byte for byte)."""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "tests", "codec_corpus")

# the tensors every corpus file is decoded against (for the tensor-reference seeds)
REF_TENSORS = (torch.ones(2), torch.zeros(3, dtype=torch.bfloat16))


@dataclass
class Decodes:
    """The file decodes (against REF_TENSORS) to ``value``."""

    value: Any


@dataclass
class Fails:
    """The file raises StateDecodeError whose message contains ``fragment``."""

    fragment: str
    extra: list[str] = field(default_factory=list)  # more fragments that must all appear


def ext32(code: int, payload: bytes) -> bytes:
    return b"\xc9" + len(payload).to_bytes(4, "big") + bytes([code]) + payload


def tensor_payload(dtype: str, shape: list[int], data: bytes) -> bytes:
    name = dtype.encode()
    out = b"\x93" + bytes([0xA0 | len(name)]) + name + bytes([0x90 | len(shape)])
    for dim in shape:
        out += b"\xcf" + dim.to_bytes(8, "big")
    return out + b"\xc6" + len(data).to_bytes(4, "big") + data


def nested_tuples(depth: int) -> bytes:
    data = b"\xc0"
    for _ in range(depth):
        data = ext32(1, b"\x91" + data)
    return data


# ---- allocation bombs: every level's header claims (nearly) all the bytes left ----


def array_bomb(total: int, levels: int = 255) -> bytes:
    """`levels` nested array-32 headers, each claiming as many items as there are
    bytes after it, then nils: the innermost array is complete, its parent is one
    item short.  A decoder that reserves the claimed slots per level asks for
    levels * total * 8 bytes."""
    head = b""
    for i in range(levels):
        head += b"\xdd" + (total - 5 * (i + 1)).to_bytes(4, "big")
    return head + b"\xc0" * (total - len(head))


def tuple_bomb(total: int, levels: int = 127) -> bytes:
    """The same through tuple exts (ext32 + array32 per level, 11 bytes): each
    payload is exactly the rest of the input, each array claims all of it."""
    head = b""
    for i in range(levels):
        ext_len = total - len(head) - 6
        head += b"\xc9" + ext_len.to_bytes(4, "big") + b"\x01"
        head += b"\xdd" + (total - len(head) - 5).to_bytes(4, "big")
    return head + b"\xc0" * (total - len(head))


def map_bomb(total: int, levels: int = 255) -> bytes:
    """Nested map-32 headers, each claiming half the bytes left in entries."""
    head = b""
    for i in range(levels):
        left = total - 6 * (i + 1)
        head += b"\xdf" + (left // 2).to_bytes(4, "big") + b"\x01"
    return head + b"\xc0" * (total - len(head))


def mixed_bomb(total: int) -> bytes:
    """Arrays and maps alternating, the array counts claiming all the bytes left."""
    head = b""
    for i in range(120):
        head += b"\xdd" + (total - len(head) - 5).to_bytes(4, "big")
        head += b"\xdf" + ((total - len(head) - 5) // 2).to_bytes(4, "big") + b"\x01"
    return head + b"\xc0" * (total - len(head))


BOMBS = {"array": array_bomb, "tuple": tuple_bomb, "map": map_bomb, "mixed": mixed_bomb}
# how each ends: the arrays run out of items; the maps' nil keys repeat first
BOMB_ERRORS = {"array": "truncated input: a value needs 1 bytes, 0 left",
               "tuple": "truncated input: a value needs 1 bytes, 0 left",
               "map": "duplicate map key None", "mixed": "duplicate map key None"}


def valid_seeds() -> dict[str, tuple[bytes, Decodes]]:
    from modelopt_c import _conversion as C

    enc = C.encode_state
    state = {
        "modelopt_state_dict": [
            ("quantize", {"config": {"quant_cfg": {"*weight_quantizer": {"num_bits": (4, 3), "axis": None}}},
                          "metadata": {"quantizer_state": {"l.0": {"_amax": torch.tensor([0.5, 2.0]),
                                                                   "_shape": torch.Size([2, 4]),
                                                                   "_dtype": torch.bfloat16}}}}),
        ],
        "modelopt_version": "0.29.0",
    }
    refs_tensors: list[Any] = []
    refs = enc(state, refs_tensors)  # _amax becomes reference #0: decodes to REF_TENSORS[0]
    state_refs = {**state, "modelopt_state_dict": [("quantize", {
        **state["modelopt_state_dict"][0][1],
        "metadata": {"quantizer_state": {"l.0": {**state["modelopt_state_dict"][0][1]["metadata"]
                                                 ["quantizer_state"]["l.0"], "_amax": REF_TENSORS[0]}}}})]}
    cplx = torch.tensor([1 + 2j, 3 - 4j])
    values = {
        "valid_state": state,
        "valid_scalars": [None, True, False, 0, -1, 2**64 - 1, -(2**63), 1.5, "héllo", b"\x00"],
        "valid_nonstr_keys": {1: "a", (1, 2): "b", None: "c", b"k": "d"},
        "valid_tuple": (1, (2, (3,)), []),
        "valid_tuple_long": tuple(range(40)),
        "valid_list_long": [[i] for i in range(40)],
        "valid_tensor_bf16": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "valid_tensor_fp8": torch.tensor([0.5, -1.0]).to(torch.float8_e4m3fn),
        "valid_tensor_bool": torch.tensor([True, False, True]),
        "valid_tensor_empty": torch.empty(0, 5),
        "valid_tensor_scalar": torch.tensor(3.0, dtype=torch.float64),
        "valid_tensor_conj": [cplx.conj(), cplx.conj().imag, -cplx.conj()],
        "valid_size_dtype_device": [torch.Size([1, 2]), torch.float16, torch.device("cuda:1")],
        "valid_quantized_dtypes_as_values": [torch.quint4x2, torch.quint2x4, torch.qint8],
        "valid_slices": [slice(None), slice(1, 5, 2), slice(-1, None, -1)],
    }
    seeds = {name: (enc(v), Decodes(v)) for name, v in values.items()}
    # what the bytes hold: conj/neg bits resolved
    seeds["valid_tensor_conj"] = (seeds["valid_tensor_conj"][0],
                                  Decodes([t.resolve_conj().resolve_neg() for t in values["valid_tensor_conj"]]))
    seeds["valid_state_refs"] = (refs, Decodes(state_refs))
    seeds["valid_float32"] = (b"\xca" + struct.pack(">f", 1.25), Decodes(1.25))
    seeds["valid_short_ext_forms"] = (b"\x93\xd6\x01\x93\x01\x02\x03\xc7\x03\x01\x92\x01\x02\xd6\x06cuda",
                                      Decodes([(1, 2, 3), (1, 2), torch.device("cuda")]))
    seeds["valid_tensor_ref_0"] = (b"\xd7\x02" + bytes(8), Decodes(REF_TENSORS[0]))
    seeds["valid_nest_arrays_256"] = (b"\x91" * 256 + b"\xc0", Decodes(_nested_list(256)))
    seeds["int64_min"] = (b"\xd3\x80" + bytes(7), Decodes(-(2**63)))
    seeds["float64_nan"] = (b"\xcb\x7f\xf8" + bytes(6), Decodes(float("nan")))
    # a zero-sized dimension makes any other dimension harmless
    # packed fp4 (torch >= 2.8): the same bytes on every torch; older ones refuse the dtype
    fp4 = ext32(3, b"\x93\xb0float4_e2m1fn_x2\x91\x02\xc4\x02\x12\xf0")
    if hasattr(torch, "float4_e2m1fn_x2"):
        packed = torch.tensor([0x12, 0xF0], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
        assert enc(packed) == fp4
        seeds["valid_tensor_fp4x2"] = (fp4, Decodes(packed))
    else:
        seeds["valid_tensor_fp4x2"] = (fp4, Fails("unknown dtype 'float4_e2m1fn_x2'"))
    seeds["tensor_zero_dim_huge"] = (ext32(3, b"\x93\xa5int16\x92\x00\xce\xff\xff\xff\xff\xc4\x00"),
                                     Decodes(torch.empty(0, 2**32 - 1, dtype=torch.int16)))
    return seeds


def _nested_list(depth: int) -> Any:
    value: Any = None
    for _ in range(depth):
        value = [value]
    return value


def hostile_seeds() -> dict[str, tuple[bytes, Fails]]:
    tensor_ok = b"\x93\xa5int16\x91\x02\xc4\x04\x01\x00\x02\x00"
    seeds = {
        "empty": (b"", Fails("truncated input: a value needs 1 bytes, 0 left")),
        "never_used_c1": (b"\xc1", Fails("byte 0xc1 is not a msgpack type")),
        "array32_huge": (b"\xdd\xff\xff\xff\xff", Fails("array header claims 4294967295 items but only 0 bytes")),
        "map32_huge": (b"\xdf\xff\xff\xff\xff\x01\x02", Fails("map header claims 4294967295 entries")),
        "str32_huge": (b"\xdb\xff\xff\xff\xff", Fails("truncated input: str needs 4294967295 bytes")),
        "bin32_huge": (b"\xc6\xff\xff\xff\xff", Fails("truncated input: bin needs 4294967295 bytes")),
        "ext32_huge": (b"\xc9\xff\xff\xff\xff\x01", Fails("truncated input: ext needs 4294967296 bytes")),
        "tuple_ext_huge_inner": (b"\xc9\x00\x00\x00\x05\x01\xdd\xff\xff\xff\xff",
                                 Fails("tuple payload claims 4294967295 items")),
        "array16_short": (b"\xdc\x00\x05\x01\x02", Fails("array header claims 5 items but only 2 bytes")),
        "nest_arrays": (b"\x91" * 5000 + b"\xc0", Fails("nesting deeper than 256 levels")),
        "nest_maps": (b"\x81\xc0" * 2000 + b"\xc0", Fails("nesting deeper than 256 levels")),
        "nest_tuples": (nested_tuples(400), Fails("nesting deeper than 256 levels")),
        "nest_arrays_257": (b"\x91" * 257 + b"\xc0", Fails("nesting deeper than 256 levels")),
        "utf8_invalid": (b"\xa1\xff", Fails("invalid UTF-8 in str of 1 bytes")),
        "utf8_surrogate": (b"\xa3\xed\xa0\x80", Fails("invalid UTF-8 in str of 3 bytes")),
        "utf8_overlong": (b"\xa2\xc0\x80", Fails("invalid UTF-8 in str of 2 bytes")),
        "utf8_truncated": (b"\xa2\xc3", Fails("truncated input: str needs 2 bytes, 1 left")),
        "trailing": (b"\xc0\xc0", Fails("1 trailing bytes after the encoded state")),
        "trailing_in_ext": (b"\xd6\x01\x92\x01\x02\x03", Fails("1 unexpected bytes at the end of an ext 1 payload")),
        "ext_unknown": (b"\xd4\x63\x00", Fails("unknown ext type 99")),
        "ext_timestamp": (b"\xd6\xff\x00\x00\x00\x00", Fails("unknown ext type -1")),
        "dtype_unknown": (b"\xc7\x07\x05float33", Fails("unknown dtype 'float33'")),
        "dtype_nul": (b"\xd6\x05fl\x00t", Fails("dtype name has a byte 0x0 that is not printable ASCII")),
        "device_bad": (b"\xc7\x03\x06cpx", Fails("invalid device")),
        "device_empty": (b"\xc7\x00\x06", Fails("device name of 0 bytes")),
        "slice_short": (b"\xd5\x07\x91\xc0", Fails("slice payload must be an array of 3")),
        "size_strs": (b"\xd6\x04\x92\xa1x\x01", Fails("torch.Size item 0 is a str, not an int")),
        "ref_no_8": (b"\xd4\x02\x00", Fails("tensor reference payload must be 8 bytes, not 1")),
        "ref_out_of_range": (b"\xd7\x02" + b"\xff" * 8, Fails("is out of range (2 tensors given)")),
        "tensor_len_mismatch": (ext32(3, b"\x93\xa5int16\x91\x03\xc4\x04\x01\x00\x02\x00"),
                                Fails("tensor data has 4 bytes, but 3 elements of 2 bytes need 6")),
        "tensor_bool_bad": (ext32(3, b"\x93\xa4bool\x91\x02\xc4\x02\x01\x02"),
                            Fails("bool tensor has a byte 0x2 that is neither 0 nor 1")),
        "tensor_dims_overflow": (ext32(3, b"\x93\xa5int16\x92\xcf\x7f\xff\xff\xff\xff\xff\xff\xff\x02\xc4\x00"),
                                 Fails("tensor shape has more than 2**63-1 elements")),
        "tensor_ok_truncated": (ext32(3, tensor_ok)[:-3], Fails("truncated input: ext needs")),
        "tensor_bits8": (ext32(3, tensor_payload("bits8", [4], b"abcd")), Fails("unknown dtype 'bits8'")),
        "tensor_uint4": (ext32(3, tensor_payload("uint4", [4], b"ab")), Fails("unknown dtype 'uint4'")),
        "dup_keys": (b"\x82\xa1a\x01\xa1a\x02", Fails("duplicate map key 'a'")),
        "unhashable_key": (b"\x81\x91\x01\x02", Fails("map key of type list is not hashable")),
        # a failure deep inside names the key path that leads to it
        "deep_bad_dtype_key_path": (b"\x81\xa1a\x81\xa1b\x92\x01" + b"\xc7\x07\x05float33",
                                    Fails("unknown dtype 'float33' (at key path a['b'][1])")),
    }
    # sub-byte and quantized dtypes: numel * itemsize is more than the storage holds
    # (quint4x2: N/2 bytes, quint2x4: N/4), and no dtype of this family has an
    # inline form; the data length is "right" by itemsize, so only the dtype check
    # (or the storage-size check behind it) stands between it and a heap overflow
    for dtype in ["quint4x2", "quint2x4", "qint8", "quint8", "qint32"]:
        itemsize = 4 if dtype == "qint32" else 1
        for n in [4, 4096]:
            seeds[f"tensor_{dtype}_{n}"] = (
                b"\x81\xa1q\x91" + ext32(3, tensor_payload(dtype, [n], b"\xa5" * (n * itemsize))),
                Fails(f"tensor dtype '{dtype}' is quantized", ["(at key path q[0])"]))
        seeds[f"tensor_{dtype}_empty"] = (ext32(3, tensor_payload(dtype, [0], b"")),
                                          Fails(f"tensor dtype '{dtype}' is quantized"))
    # allocation bombs, small enough to commit (the 1.4 MB ones are built by the test)
    for kind, make in BOMBS.items():
        seeds[f"bomb_{kind}_64k"] = (make(65536), Fails(BOMB_ERRORS[kind]))
    return seeds


def corpus() -> dict[str, tuple[bytes, Any]]:
    """Every corpus file: name -> (bytes, Decodes(value) | Fails(fragment))."""
    return {**valid_seeds(), **hostile_seeds()}


def main() -> None:
    sys.path.insert(0, ROOT)  # this tree's package
    os.makedirs(OUT, exist_ok=True)
    table = corpus()
    for old in os.listdir(OUT):
        if old.endswith(".bin") and old[:-4] not in table:
            os.remove(os.path.join(OUT, old))
    for name, (data, _) in table.items():
        with open(os.path.join(OUT, name + ".bin"), "wb") as f:
            f.write(data)
    print(f"wrote {len(table)} files to {OUT}")


if __name__ == "__main__":
    main()
