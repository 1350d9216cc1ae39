"""Regenerate the adversarial corpus: python tests/st_corpus/make_corpus.py

Every file here must make st_read / st_read_header raise a ValueError (never crash,
hang or allocate by what the file claims)."""

import json
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent


def raw(header: bytes, data: bytes = b"", n: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if n is None else n) + header + data


def h(obj) -> bytes:
    return json.dumps(obj).encode()


T = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
CASES = {
    "empty": b"",
    "short_len": b"\x10\x00\x00",
    "len_only": struct.pack("<Q", 0),
    "len_huge": struct.pack("<Q", 2**64 - 1) + b"{}",
    "len_over_cap": struct.pack("<Q", 100_000_001) + b"{}",
    "len_past_end": raw(b"{}", n=1000),
    "not_object": raw(b"[1, 2]"),
    "bad_json": raw(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'),
    "trailing_garbage": raw(h({}) + b"xx"),
    "nul_in_header": raw(b'{"a\x00": 1}'),
    "bad_utf8": raw(b'{"\xff\xfe": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'),
    "lone_surrogate": raw(b'{"\\ud800": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'),
    "dup_tensor": raw(b'{"a": {"dtype":"U8","shape":[0],"data_offsets":[0,0]}, "a": {"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'),
    "dup_field": raw(b'{"a": {"dtype":"U8","dtype":"U8","shape":[0],"data_offsets":[0,0]}}'),
    "dup_metadata": raw(b'{"__metadata__": {"k": "1", "k": "2"}}'),
    "metadata_not_str": raw(h({"__metadata__": {"k": 1}})),
    "unknown_dtype": raw(h({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}), b"\0"),
    "negative_shape": raw(b'{"a": {"dtype":"U8","shape":[-1],"data_offsets":[0,0]}}'),
    "float_shape": raw(b'{"a": {"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}}', b"\0"),
    "shape_overflow": raw(h({"a": {"dtype": "F64", "shape": [2**62, 2**62, 4], "data_offsets": [0, 0]}})),
    "shape_mismatch": raw(h({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}), b"\0" * 8),
    "offsets_reversed": raw(h({"a": {"dtype": "U8", "shape": [0], "data_offsets": [8, 0]}}), b"\0" * 8),
    "offsets_oob": raw(h({"a": {"dtype": "U8", "shape": [100], "data_offsets": [0, 100]}}), b"\0" * 8),
    "offsets_huge": raw(h({"a": {"dtype": "U8", "shape": [1], "data_offsets": [2**63 - 1, 2**63]}}), b"\0"),
    "number_too_big": raw(b'{"a": {"dtype":"U8","shape":[99999999999999999999],"data_offsets":[0,0]}}'),
    "overlap": raw(h({"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
                      "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}), b"\0" * 8),
    "gap": raw(h({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                  "b": {"dtype": "U8", "shape": [2], "data_offsets": [6, 8]}}), b"\0" * 8),
    "uncovered_tail": raw(h({"a": T}), b"\0" * 12),
    "missing_field": raw(h({"a": {"dtype": "F32", "shape": [2]}}), b"\0" * 8),
    "unknown_field": raw(h({"a": {**T, "extra": 1}}), b"\0" * 8),
    "entry_not_object": raw(h({"a": [1, 2]})),
    "three_offsets": raw(b'{"a": {"dtype":"U8","shape":[0],"data_offsets":[0,0,0]}}'),
    "too_many_dims": raw(h({"a": {"dtype": "U8", "shape": [1] * 65, "data_offsets": [0, 1]}}), b"\0"),
    "deep_nesting": raw(b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
    "unterminated_string": raw(b'{"abc'),
    "bad_escape": raw(b'{"a\\x": 1}'),
}

if __name__ == "__main__":
    for name, content in CASES.items():
        (HERE / f"{name}.safetensors").write_bytes(content)
    print(f"wrote {len(CASES)} files to {HERE}")
