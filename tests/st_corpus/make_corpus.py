"""Regenerate the adversarial corpus: python tests/st_corpus/make_corpus.py

Every file here must make the reader raise modelopt_c.CheckpointError (a ValueError)
"<path>: <what>" -- never crash, hang or allocate by what the file claims.  EXPECT
says where each file fails and how: (stage, message regex).  Stages, in order:
"header" (st_read_header), "read" (st_read: the header is well-formed but the
tensors cannot be made), "verify" (st_read(verify=True): checksums).  A file fails
at its stage (with that message) and at every later one (with CheckpointError),
and passes the earlier ones.  Every file has its entry."""

import json
import re
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
    # zero elements, but the contiguous strides overflow int64: at::from_blob throws
    # after it built the storage (the mapping was once released twice here)
    "stride_overflow_empty": raw(h({"a": {"dtype": "F32", "shape": [0, 2**32, 2**32], "data_offsets": [0, 0]}})),
    "stride_overflow_empty_inner": raw(h({"a": {"dtype": "U8", "shape": [1, 0, 2**63 - 1, 2],
                                                "data_offsets": [0, 0]}})),
    "stride_overflow_after_good": raw(h({"g": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                                         "z": {"dtype": "I64", "shape": [0, 2**40, 2**40], "data_offsets": [4, 4]}}),
                                      b"\1\2\3\4"),
    "unknown_dtype_escaped": raw(b'{"a": {"dtype":"F\\u0033\\u0032x","shape":[0],"data_offsets":[0,0]}}'),
    "unknown_field_escaped": raw(b'{"a": {"dtyp\\u0065s":"F32","shape":[0],"data_offsets":[0,0]}}'),
    "dup_tensor_far_apart": raw(h({"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]},
                                   **{f"x{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(50)}})
                                [:-1] + b', "a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}'),
    # well-formed files whose checksums (modelopt_c metadata) are wrong or malformed
    "checksum_mismatch": raw(h({"__metadata__": {"checksum_algorithm": "xxh64",
                                                 "checksums": json.dumps({"a": "0123456789abcdef"})},
                                "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}), b"abcd"),
    "checksum_missing_tensor": raw(h({"__metadata__": {"checksum_algorithm": "xxh64",
                                                       "checksums": json.dumps({"b": "ef46db3751d8e999"})},
                                      "a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}})),
    "checksum_not_hex": raw(h({"__metadata__": {"checksum_algorithm": "xxh64",
                                                "checksums": json.dumps({"a": "ef46db3751d8e99g"})},
                               "a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}})),
    "checksum_count": raw(h({"__metadata__": {"checksum_algorithm": "xxh64",
                                              "checksums": json.dumps({"a": "ef46db3751d8e999", "b": "0" * 16})},
                             "a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}})),
    "checksum_algorithm": raw(h({"__metadata__": {"checksum_algorithm": "md5", "checksums": "{}"}})),
    "checksums_malformed": raw(h({"__metadata__": {"checksum_algorithm": "xxh64", "checksums": "{\"a\": 1}"},
                                  "a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}})),
    "checksums_absent": raw(h({"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}})),
}

_STRIDES = r"tensor '(a|z)': its shape cannot be made into a tensor \(Stride calculation overflowed"


def _exact(message: str) -> str:
    """The whole message, as a pattern."""
    return "^" + re.escape(message) + "$"


EXPECT = {
    # at the header stage, the whole message
    "empty": ("header", _exact("the file is 0 bytes, too short for the 8-byte header length")),
    "short_len": ("header", _exact("the file is 3 bytes, too short for the 8-byte header length")),
    "len_only": ("header", _exact("the header is not a JSON object (it must start with '{')")),
    "len_huge": ("header", _exact("header length 18446744073709551615 is over the 100000000-byte limit")),
    "len_past_end": ("header", _exact("header length 1000 runs past the end of the file (10 bytes)")),
    "not_object": ("header", _exact("the header is not a JSON object (it must start with '{')")),
    "bad_json": ("header", _exact("invalid header JSON at byte 59: unexpected end of the header")),
    "trailing_garbage": ("header", _exact("invalid header JSON at byte 2: trailing bytes after the header object")),
    "nul_in_header": ("header", _exact("invalid header JSON at byte 3: control character in a string")),
    "bad_utf8": ("header", _exact("invalid header JSON at byte 5: a string is not valid UTF-8")),
    "lone_surrogate": ("header", _exact("invalid header JSON at byte 8: lone high surrogate in a \\u escape")),
    "dup_metadata": ("header", _exact("duplicate metadata key 'k'")),
    "metadata_not_str": ("header", _exact("metadata value of 'k' must be a string")),
    "unknown_dtype": ("header", _exact("tensor 'a': unknown dtype 'F4'")),
    "negative_shape": ("header", _exact("tensor 'a': shape entries must be non-negative integers")),
    "float_shape": ("header", _exact("tensor 'a': shape entries must be non-negative integers")),
    "shape_mismatch": ("header", _exact("tensor 'a': shape and dtype F32 need 12 bytes but data_offsets span 8")),
    "offsets_reversed": ("header", _exact("tensor 'a': data_offsets [8, 0] end before they begin")),
    "offsets_oob": ("header", _exact("tensor 'a': data_offsets [0, 100] run past the 8-byte data section")),
    "offsets_huge": ("header", _exact("tensor 'a': data_offsets: a number over 2**63-1")),
    "number_too_big": ("header", _exact("tensor 'a': shape entries: a number over 2**63-1")),
    "overlap": ("header", _exact("tensor 'b': data_offsets [4, 8] overlap tensor 'a'")),
    "gap": ("header", _exact("tensor 'b': a gap of 2 bytes before its data_offsets [6, 8]")),
    "uncovered_tail": ("header", _exact("the data section has 4 bytes that no tensor covers (tensors end at 8 of 12)")),
    "missing_field": ("header", _exact("tensor 'a': missing field 'data_offsets'")),
    "entry_not_object": ("header", _exact("tensor 'a': its entry must be an object")),
    "three_offsets": ("header", _exact("tensor 'a': data_offsets must be exactly [begin, end]")),
    "too_many_dims": ("header", _exact("tensor 'a': more than 64 dimensions")),
    "deep_nesting": ("header", _exact("tensor 'a': its entry must be an object")),
    "unterminated_string": ("header", _exact("invalid header JSON at byte 2: unterminated string")),
    "bad_escape": ("header", _exact("invalid header JSON at byte 4: bad escape in a string")),
    "stride_overflow_empty": ("read", _STRIDES),
    "stride_overflow_empty_inner": ("read", _STRIDES),
    "stride_overflow_after_good": ("read", _STRIDES),
    "unknown_dtype_escaped": ("header", r"tensor 'a': unknown dtype 'F32x'"),
    "unknown_field_escaped": ("header", r"tensor 'a': unknown field 'dtypes'"),
    "dup_tensor": ("header", r"duplicate tensor name 'a' in the header"),
    "dup_tensor_far_apart": ("header", r"duplicate tensor name 'a' in the header"),
    "dup_field": ("header", r"tensor 'a': duplicate field 'dtype'"),
    "unknown_field": ("header", r"tensor 'a': unknown field 'extra'"),
    "len_over_cap": ("header", r"header length 100000001 is over the 100000000-byte limit"),
    "shape_overflow": ("header", r"tensor 'a': shape and dtype F64 need over \d+ bytes but data_offsets span 0"),
    "checksum_mismatch": ("verify", r"tensor 'a': checksum mismatch \(stored xxh64 0123456789abcdef, data has "
                                    r"[0-9a-f]{16}\): the file is corrupt"),
    "checksum_missing_tensor": ("verify", r"tensor 'a' has no checksum"),
    "checksum_not_hex": ("verify", r"tensor 'a': checksum 'ef46db3751d8e99g' is not 16 hex digits"),
    "checksum_count": ("verify", r"the 'checksums' metadata lists 2 tensors but the file has 1"),
    "checksum_algorithm": ("verify", r"unsupported checksum_algorithm 'md5' \(this build checks 'xxh64'\)"),
    "checksums_malformed": ("verify", r"the 'checksums' metadata is malformed"),
    "checksums_absent": ("verify", r"no checksums to verify \(the metadata has no 'checksums'\)"),
}

if __name__ == "__main__":
    for name, content in CASES.items():
        (HERE / f"{name}.safetensors").write_bytes(content)
    print(f"wrote {len(CASES)} files to {HERE}")
