"""Write the codec's seed corpus (tests/codec_corpus/*.bin): valid encodings of
every type plus hand-made hostile inputs.  Run from the repo root after a build:

    python fuzz/make_corpus.py

The files are committed; rerun only to add seeds (names are stable)."""

from __future__ import annotations

import os
import struct
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # this tree's package

from modelopt_c import _conversion as C  # noqa: E402
OUT = os.path.join(ROOT, "tests", "codec_corpus")


def ext32(code: int, payload: bytes) -> bytes:
    return b"\xc9" + len(payload).to_bytes(4, "big") + bytes([code]) + payload


def valid_seeds() -> dict[str, bytes]:
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
    return {
        "valid_state": enc(state),
        "valid_state_refs": enc(state, []),
        "valid_scalars": enc([None, True, False, 0, -1, 2**64 - 1, -(2**63), 1.5, "héllo", b"\x00"]),
        "valid_nonstr_keys": enc({1: "a", (1, 2): "b", None: "c", b"k": "d"}),
        "valid_tuple": enc((1, (2, (3,)), [])),
        "valid_tensor_bf16": enc(torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)),
        "valid_tensor_fp8": enc(torch.tensor([0.5, -1.0]).to(torch.float8_e4m3fn)),
        "valid_tensor_bool": enc(torch.tensor([True, False, True])),
        "valid_tensor_empty": enc(torch.empty(0, 5)),
        "valid_tensor_scalar": enc(torch.tensor(3.0, dtype=torch.float64)),
        "valid_size_dtype_device": enc([torch.Size([1, 2]), torch.float16, torch.device("cuda:1")]),
        "valid_slices": enc([slice(None), slice(1, 5, 2), slice(-1, None, -1)]),
        "valid_float32": b"\xca" + struct.pack(">f", 1.25),
        "valid_short_ext_forms": b"\x93\xd6\x01\x93\x01\x02\x03\xc7\x03\x01\x92\x01\x02\xd6\x06cuda",
        "valid_tensor_ref_0": b"\xd7\x02" + bytes(8),
    }


def nested_tuples(depth: int) -> bytes:
    data = b"\xc0"
    for _ in range(depth):
        data = ext32(1, b"\x91" + data)
    return data


def hostile_seeds() -> dict[str, bytes]:
    tensor_ok = b"\x93\xa5int16\x91\x02\xc4\x04\x01\x00\x02\x00"
    return {
        "empty": b"",
        "never_used_c1": b"\xc1",
        "array32_huge": b"\xdd\xff\xff\xff\xff",
        "map32_huge": b"\xdf\xff\xff\xff\xff\x01\x02",
        "str32_huge": b"\xdb\xff\xff\xff\xff",
        "bin32_huge": b"\xc6\xff\xff\xff\xff",
        "ext32_huge": b"\xc9\xff\xff\xff\xff\x01",
        "tuple_ext_huge_inner": b"\xc9\x00\x00\x00\x05\x01\xdd\xff\xff\xff\xff",
        "array16_short": b"\xdc\x00\x05\x01\x02",
        "nest_arrays": b"\x91" * 5000 + b"\xc0",
        "nest_maps": b"\x81\xc0" * 2000 + b"\xc0",
        "nest_tuples": nested_tuples(400),
        "utf8_invalid": b"\xa1\xff",
        "utf8_surrogate": b"\xa3\xed\xa0\x80",
        "utf8_overlong": b"\xa2\xc0\x80",
        "utf8_truncated": b"\xa2\xc3",
        "trailing": b"\xc0\xc0",
        "trailing_in_ext": b"\xd6\x01\x92\x01\x02\x03",
        "ext_unknown": b"\xd4\x63\x00",
        "ext_timestamp": b"\xd6\xff\x00\x00\x00\x00",
        "dtype_unknown": b"\xc7\x07\x05float33",
        "dtype_nul": b"\xd6\x05fl\x00t",
        "device_bad": b"\xc7\x03\x06cpx",
        "device_empty": b"\xc7\x00\x06",
        "slice_short": b"\xd5\x07\x91\xc0",
        "size_strs": b"\xd6\x04\x92\xa1x\x01",
        "ref_no_8": b"\xd4\x02\x00",
        "ref_out_of_range": b"\xd7\x02" + b"\xff" * 8,
        "tensor_len_mismatch": ext32(3, b"\x93\xa5int16\x91\x03\xc4\x04\x01\x00\x02\x00"),
        "tensor_bool_bad": ext32(3, b"\x93\xa4bool\x91\x02\xc4\x02\x01\x02"),
        "tensor_dims_overflow": ext32(3, b"\x93\xa5int16\x92\xcf\x7f\xff\xff\xff\xff\xff\xff\xff\x02\xc4\x00"),
        "tensor_zero_dim_huge": ext32(3, b"\x93\xa5int16\x92\x00\xce\xff\xff\xff\xff\xc4\x00"),
        "tensor_ok_truncated": ext32(3, tensor_ok)[:-3],
        "dup_keys": b"\x82\xa1a\x01\xa1a\x02",
        "unhashable_key": b"\x81\x91\x01\x02",
        "int64_min": b"\xd3\x80" + bytes(7),
        "float64_nan": b"\xcb\x7f\xf8" + bytes(6),
    }


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    for name, data in {**valid_seeds(), **hostile_seeds()}.items():
        with open(os.path.join(OUT, name + ".bin"), "wb") as f:
            f.write(data)
    print(f"wrote {len(os.listdir(OUT))} files to {OUT}")


if __name__ == "__main__":
    main()
