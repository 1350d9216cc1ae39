"""The modelopt state codec (csrc/codec_*.c): round trips with types preserved,
clear encode errors with key paths, and a decoder that survives hostile bytes."""

from __future__ import annotations

import glob
import importlib.util
import math
import mmap
import os
import struct
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "tests", "codec_corpus")


from _optional import optional_import  # noqa: E402
from modelopt_c import _conversion as C  # noqa: E402
encode = C.encode_state
decode = C.decode_state
DecodeError = C.StateDecodeError

# the load helper above, as source, for the isolated subprocess tests
LOADER = textwrap.dedent(
    f"""
    import sys, torch
    sys.path.insert(0, {ROOT!r})
    from modelopt_c import _conversion as C
    """
)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a, b, path="x"):
    """Structural equality with exact types (tuple is not list, 1 is not True, ...)."""
    assert type(a) is type(b) or (isinstance(a, torch.Tensor) and type(b) is torch.Tensor), (
        f"{path}: {type(a)} != {type(b)}"
    )
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert b.device.type == "cpu", path
        assert torch.equal(_raw(a), _raw(b)), path  # bitwise, so NaNs compare too
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):
            assert_same(ka, kb, f"{path}[{ka!r}] key")
            assert_same(va, vb, f"{path}[{ka!r}]")
    elif isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, slice):
        assert_same((a.start, a.stop, a.step), (b.start, b.stop, b.step), path)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    elif isinstance(a, float):
        assert struct.pack(">d", a) == struct.pack(">d", b), path  # keeps -0.0
    else:
        assert a == b, path


def roundtrip(x, **kw):
    y = decode(encode(x, **kw))
    assert_same(x, y)
    return y


# --------------------------------------------------------------------------- round trips

SCALARS = [
    None, True, False, 0, 1, -1, 127, 128, 255, 256, -32, -33, -128, -129, 65535, 65536,
    -32768, -32769, 2**31, -(2**31) - 1, 2**32, 2**63 - 1, -(2**63), 2**63, 2**64 - 1,
    0.0, -0.0, 1.5, -2.25e300, 5e-324, float("inf"), float("-inf"), float("nan"),
    "", "a", "héllo ✓ 𝄞", "x" * 31, "x" * 32, "x" * 255, "x" * 256, "x" * 70000,
    b"", b"\x00\xff", b"z" * 256, b"z" * 70000,
]


@pytest.mark.parametrize("value", SCALARS, ids=lambda v: repr(v)[:20])
def test_roundtrip_scalars(value):
    roundtrip(value)


def test_int_edges_keep_int_type_and_bool_stays_bool():
    y = roundtrip([2**63 - 1, -(2**63), 2**64 - 1, True, 1, False, 0])
    assert [type(v) for v in y] == [int, int, int, bool, int, bool, int]


def test_containers_keep_their_types():
    x = {
        "list": [1, [2, [3, []]]],
        "tuple": (1, (2, (3, ())), [4, (5,)]),
        "empty": [(), [], {}],
        "nested": {"a": {"b": {"c": [{"d": (None,)}]}}},
    }
    roundtrip(x)
    roundtrip(())
    roundtrip([])
    roundtrip({})


def test_dict_non_str_keys_and_insertion_order():
    x = {3: "a", -5: "b", (1, "x", (2,)): "tuple", None: 4, True: 5, 2.5: 6, b"k": 7, "z": 8, 0: 9}
    y = roundtrip(x)
    assert list(y) == list(x)


def test_bytearray_and_subclasses_decode_as_base_types():
    from collections import OrderedDict, namedtuple

    class MyStr(str):
        pass

    class MyInt(int):
        pass

    Point = namedtuple("Point", "x y")
    y = decode(encode([bytearray(b"ab"), OrderedDict(a=1), Point(1, 2), MyStr("s"), MyInt(7)]))
    assert_same(y, [b"ab", {"a": 1}, (1, 2), "s", 7])


DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
    torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32,
    torch.uint64,
]


def _sample(dtype, shape=(2, 3)):
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return (torch.randn(shape) * 3).to(dtype)
    if dtype.is_complex or dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    return torch.randint(0, 100, shape, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_inline_every_dtype(dtype):
    for shape in [(), (0,), (4,), (2, 3), (2, 0, 3), (1, 2, 1, 3)]:
        roundtrip(_sample(dtype, shape))


def test_tensor_layouts_are_normalised():
    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    cases = [
        base.transpose(0, 2),               # non-contiguous
        base[1],                            # storage offset
        base[:, ::2],                       # strided slice
        torch.nn.Parameter(torch.randn(3, 3)),  # requires grad
        torch.tensor([1 + 2j, 3 - 1j]).conj(),  # lazy conj bit
        torch.tensor([1.0, -2.0]).neg().conj(),
        torch.tensor([[1, 2], [3, 4]]).expand(2, 2, 2),
    ]
    for t in cases:
        y = decode(encode(t))
        assert type(y) is torch.Tensor and not y.requires_grad
        assert torch.equal(y, t.detach().resolve_conj().resolve_neg())


def test_float_tensor_special_values_bitwise():
    t = torch.tensor([float("nan"), -0.0, float("inf"), float("-inf"), 1e-45], dtype=torch.float32)
    roundtrip(t)
    roundtrip(t.to(torch.bfloat16))


def test_sparse_tensor_inline_is_a_clear_error():
    sp = torch.eye(3).to_sparse()
    with pytest.raises(TypeError, match=r"layout torch\.sparse_coo inline .* at w\[0\]$"):
        encode({"w": [sp]})
    tensors = []
    with pytest.raises(TypeError, match=r"^cannot encode a tensor with layout torch\.sparse_coo \(only strided"):
        encode({"w": sp}, tensors)  # by reference too: no writer stores sparse tensors
    assert tensors == []


def test_tensor_references():
    a, b = torch.randn(3), torch.ones(2, 2, dtype=torch.bfloat16)
    tensors = [torch.zeros(1)]  # appended to, not replaced
    data = encode({"a": a, "b": [b, a]}, tensors)
    assert len(tensors) == 4 and tensors[1] is a and tensors[2] is b and tensors[3] is a
    y = decode(data, tensors)
    assert y["a"] is a and y["b"][0] is b and y["b"][1] is a
    y = decode(data, tuple(tensors))  # any sequence
    assert y["b"][0] is b
    # a reference is small: fixext 8 (d7 02 + index)
    assert encode(a, []) == b"\xd7\x02" + (0).to_bytes(8, "big")


def test_torch_objects():
    x = {
        "sizes": [torch.Size([]), torch.Size([1, 2, 3]), torch.Size([2**63 - 1])],
        "dtypes": DTYPES + [torch.float8_e4m3fnuz, torch.complex32],
        "devices": [torch.device("cpu"), torch.device("cuda:0"), torch.device("cuda", 3),
                    torch.device("meta")],
        "slices": [slice(None), slice(1, 2), slice(-1, None, -2), slice(0, 10, 3),
                   slice("a", (1, 2), None)],
    }
    y = roundtrip(x)
    assert all(type(s) is torch.Size for s in y["sizes"])
    assert y["dtypes"][7] is torch.bfloat16


def test_realistic_quantization_metadata():
    amax = torch.rand(16, 1)
    state = {
        "modelopt_state_dict": [
            (
                "quantize",
                {
                    "config": {
                        "quant_cfg": [
                            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
                            {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}},
                            {"quantizer_name": "*lm_head*", "cfg": None, "enable": False},
                        ],
                        "algorithm": {"method": "awq_lite", "alpha_step": 0.1},
                    },
                    "metadata": {
                        "quantizer_state": {
                            f"model.layers.{i}.mlp.down_proj.weight_quantizer": {
                                "_num_bits": (2, 1) if i % 2 else 8,
                                "_amax": amax * i,
                                "_pre_quant_scale": torch.rand(16, dtype=torch.bfloat16),
                                "_shape": torch.Size([16, 32]),
                                "_input_dtype": torch.float16,
                                "_block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)},
                                "_disabled": False,
                            }
                            for i in range(4)
                        },
                        "subnet_config": {"hidden": [slice(0, 16), slice(16, 32, 2)], 7: (1, 2)},
                        "quant_gemm": {"device": torch.device("cuda:1"), "bits": 2**40},
                    },
                },
            ),
            ("sparse_magnitude", {"config": {}, "metadata": {}}),
        ],
        "modelopt_version": "0.29.0",
    }
    roundtrip(state)
    tensors = []
    y = decode(encode(state, tensors), tensors)
    assert len(tensors) == 8
    assert_same(state, y)


def test_real_nvidia_modelopt_state_roundtrips():
    """The state nvidia-modelopt itself produces for a quantised model.  In this process:
    the interop tests import nvidia-modelopt at collection anyway."""
    ref = optional_import("modelopt.torch.opt", "nvidia-modelopt")
    mtq = optional_import("modelopt.torch.quantization", "nvidia-modelopt")
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = mtq.quantize(m, mtq.INT8_DEFAULT_CFG, lambda mm: mm(torch.randn(2, 8)))
        state = ref.modelopt_state(m)
    assert [name for name, _ in state["modelopt_state_dict"]] == ["quantize", "max_calibrate"]
    y = decode(encode(state))
    assert repr(y) == repr(state)
    sd = m.state_dict()
    t = []
    z = decode(encode(sd, t), t)
    assert list(z) == list(sd) and len(t) == len(sd) and all(z[k] is t[i] for i, k in enumerate(z))


def test_wire_format_is_as_documented():
    assert encode(None) == b"\xc0"
    assert encode([1, -1, True]) == b"\x93\x01\xff\xc3"
    assert encode((1, 2)) == b"\xc9\x00\x00\x00\x03\x01\x92\x01\x02"
    assert encode(1.5) == b"\xcb" + struct.pack(">d", 1.5)
    assert encode(2**64 - 1) == b"\xcf" + b"\xff" * 8
    assert encode(-(2**63)) == b"\xd3\x80" + b"\x00" * 7
    assert encode(b"ab") == b"\xc4\x02ab"
    assert encode(torch.float32) == b"\xc7\x07\x05float32"
    assert encode(torch.device("cpu")) == b"\xc7\x03\x06cpu"
    assert encode(torch.Size([2, 3])) == b"\xc9\x00\x00\x00\x03\x04\x92\x02\x03"
    assert encode(slice(1, None, None)) == b"\xc9\x00\x00\x00\x04\x07\x93\x01\xc0\xc0"
    t = torch.tensor([1, 2], dtype=torch.int16)
    payload = b"\x93\xa5int16\x91\x02\xc4\x04\x01\x00\x02\x00"
    assert encode(t) == b"\xc9" + len(payload).to_bytes(4, "big") + b"\x03" + payload


def test_decoder_accepts_other_encoders_forms():
    # float 32, every int width, str8/16/32, array16/32, map16/32, short ext forms
    assert decode(b"\xca" + struct.pack(">f", 1.25)) == 1.25
    assert decode(b"\xcc\xff") == 255 and decode(b"\xcd\x01\x00") == 256
    assert decode(b"\xce\x00\x01\x00\x00") == 65536
    assert decode(b"\xd0\x80") == -128 and decode(b"\xd1\x80\x00") == -32768
    assert decode(b"\xd2\x80\x00\x00\x00") == -(2**31)
    assert decode(b"\xd9\x01a") == "a" and decode(b"\xda\x00\x01a") == "a"
    assert decode(b"\xdb\x00\x00\x00\x01a") == "a"
    assert decode(b"\xdc\x00\x01\x01") == [1] and decode(b"\xdd\x00\x00\x00\x01\x01") == [1]
    assert decode(b"\xde\x00\x01\x01\x02") == {1: 2}
    assert decode(b"\xdf\x00\x00\x00\x01\x01\x02") == {1: 2}
    assert decode(b"\xc5\x00\x01z") == b"z" and decode(b"\xc6\x00\x00\x00\x01z") == b"z"
    assert decode(b"\xd6\x01\x93\x01\x02\x03") == (1, 2, 3)  # tuple as fixext 4
    assert decode(b"\xc7\x03\x01\x92\x01\x02") == (1, 2)  # tuple as ext 8
    assert decode(b"\xd6\x06cuda") == torch.device("cuda")  # device as fixext 4


def test_bytes_like_inputs(tmp_path):
    data = encode({"a": (1, torch.arange(3))})
    want = decode(data)
    for src in [bytearray(data), memoryview(data), memoryview(b"xx" + data + b"yy")[2:-2]]:
        assert_same(want, decode(src))
    p = tmp_path / "state.bin"
    p.write_bytes(data)
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert_same(want, decode(mm))
        view = memoryview(mm)
        try:
            assert_same(want, decode(view[: len(data)]))
        finally:
            view.release()
    with pytest.raises(TypeError):
        decode("not bytes")


# --------------------------------------------------------------------------- encode errors


class Foo:
    pass


def test_unsupported_type_names_the_key_path():
    state = {
        "modelopt_state_dict": [
            ("a", {}),
            ("quantize", {"config": {}, "metadata": {"layers": [0, 1, 2, Foo()]}}),
        ]
    }
    with pytest.raises(TypeError) as info:
        encode(state)
    assert str(info.value) == (
        "cannot encode object of type Foo at "
        "modelopt_state_dict[1][1]['metadata']['layers'][3]"
    )
    with pytest.raises(TypeError, match=r"^cannot encode object of type set at the top level$"):
        encode({1, 2})
    with pytest.raises(TypeError, match=r"type object at \[2\]\[5\]\.step$"):
        encode([0, 1, [None] * 5 + [slice(1, 2, object())]])
    with pytest.raises(TypeError, match=r"type frozenset in a dict key at a$"):
        encode({"x": 1, "a": {(1, frozenset()): 1}})
    with pytest.raises(TypeError, match=r"type frozenset in a dict key at \[0\]\['b'\]$"):
        encode([{"b": {frozenset(): 1}}])


def test_int_out_of_range():
    for bad, sign in [(2**64, "positive"), (-(2**63) - 1, "negative"), (10**100, "positive")]:
        with pytest.raises(OverflowError, match=rf"outside the 64-bit range .*\(a {sign} int of \d+ bits\) at k\[1\]$"):
            encode({"k": [0, bad]})


def test_depth_cap_and_self_reference():
    deep = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(ValueError, match=r"nesting deeper than 256 levels .* at \[0\]\[0\].*\.\.\.\(\d+ more\)\.\.\."):
        encode(deep)
    # the cap counts levels the same way both ways: what encodes, decodes
    for wrap in (lambda v: [v], lambda v: (v,), lambda v: {"k": v}, lambda v: slice(None, v, None),
                 lambda v: [(v,)]):
        ok = 0
        for _ in range(128 if isinstance(wrap(0), list) and isinstance(wrap(0)[0], tuple) else 256):
            ok = wrap(ok)
        roundtrip(ok)
        with pytest.raises(ValueError, match="nesting deeper than 256 levels"):
            encode(wrap(ok))
    loop = []
    loop.append(loop)
    with pytest.raises(ValueError, match="does a container contain itself"):
        encode(loop)
    d = {}
    d["me"] = d
    with pytest.raises(ValueError, match=r"at me\['me'\]\['me'\]"):
        encode(d)
    t = ([],)
    t[0].append(t)
    with pytest.raises(ValueError, match="nesting deeper"):
        encode(t)


def test_foreign_errors_keep_their_type_and_get_a_note():
    with pytest.raises(UnicodeEncodeError) as info:
        encode({"k": ["\ud800"]})
    assert "while encoding the modelopt state at k[0]" in getattr(info.value, "__notes__", [""])[0]


def test_bad_arguments():
    with pytest.raises(TypeError, match="tensors must be a list or None"):
        encode(1, (()))
    with pytest.raises(TypeError, match="missing required argument 'obj'"):
        encode()
    with pytest.raises(TypeError, match="at most 2 positional"):
        encode(1, None, 3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        decode(b"\xc0", bogus=1)
    with pytest.raises(TypeError, match="at most 2 positional"):
        decode(b"\xc0", None, "source")  # source is keyword-only
    with pytest.raises(TypeError, match="tensors must be a sequence"):
        decode(b"\xc0", 5)
    assert encode(obj=1, tensors=None) == b"\x01"


# --------------------------------------------------------------------------- hostile bytes


def decode_error(data, **kw):
    with pytest.raises(DecodeError) as info:
        decode(data, **kw)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_every_truncation_is_a_decode_error():
    value = {
        "a": [1, -300, 2**40, 1.5, "héllo", b"xyz", None, True],
        7: (1, (2, 3)),
        "t": torch.arange(6, dtype=torch.int16).reshape(2, 3),
        "s": torch.Size([2, 3]),
        "d": torch.bfloat16,
        "dev": torch.device("cuda:0"),
        "sl": slice(1, None, 2),
    }
    data = encode(value)
    for cut in range(len(data)):
        msg = decode_error(data[:cut])
        assert "at byte offset" in msg
    assert_same(value, decode(data))


def test_huge_counts_fail_fast_without_allocating():
    for header in [
        b"\xdd\xff\xff\xff\xff",          # array 32
        b"\xdf\xff\xff\xff\xff",          # map 32
        b"\xdb\xff\xff\xff\xff",          # str 32
        b"\xc6\xff\xff\xff\xff",          # bin 32
        b"\xc9\xff\xff\xff\xff\x01",      # ext 32
        b"\xc9\x00\x00\x00\x05\x01\xdd\xff\xff\xff\xff",  # tuple of 2**32-1 inside an ext
        b"\x91" * 100 + b"\xdd\xff\xff\xff\xff",
    ]:
        for tail in [b"", b"\x00" * 64]:
            msg = decode_error(header + tail)
            assert "claims 4294967295" in msg or "truncated" in msg, msg
    msg = decode_error(b"\xdf\x00\x00\x00\x03\x01\x02\x03\x04\x05")  # 3 entries need >= 6 bytes
    assert msg.endswith("at byte offset 0: map header claims 3 entries but only 5 bytes are left")


def test_invalid_utf8():
    for bad, at in [(b"\xff", 1), (b"a\xc3", 2), (b"\xc0\x80", 1), (b"\xed\xa0\x80", 1),
                    (b"ok\xf4\x90\x80\x80", 3)]:
        msg = decode_error(bytes([0xA0 | len(bad)]) + bad)
        assert f"at byte offset {at}: invalid UTF-8 in str of {len(bad)} bytes" in msg


def test_trailing_bytes():
    assert decode_error(b"\xc0\xc0").endswith("at byte offset 1: 1 trailing bytes after the encoded state")
    assert "trailing" in decode_error(encode({"a": 1}) + b"\x00" * 10)
    # bytes left over inside an ext payload
    assert "unexpected bytes at the end of an ext 1 payload" in decode_error(b"\xd6\x01\x92\x01\x02\x03")


def test_unknown_ext_codes_and_bad_payloads():
    for code in [0, 8, 127, -1, -128]:
        msg = decode_error(b"\xd4" + struct.pack("b", code) + b"\x00")
        assert msg.endswith(f"at byte offset 0: unknown ext type {code}")
    assert "unknown dtype 'float33'" in decode_error(b"\xc7\x07\x05float33")
    assert "dtype name has a byte" in decode_error(b"\xd6\x05fl\x00t")
    assert "invalid device" in decode_error(b"\xc7\x03\x06cpx")
    assert "device name of 0 bytes" in decode_error(b"\xc7\x00\x06")
    assert "slice payload must be an array of 3" in decode_error(b"\xd5\x07\x91\xc0")
    assert "slice payload must be a msgpack array" in decode_error(b"\xd4\x07\xc0")
    assert "torch.Size item 0 is a str" in decode_error(b"\xd6\x04\x92\xa1x\x01")
    assert "tuple payload must be a msgpack array" in decode_error(b"\xd4\x01\x01")
    assert "tensor reference payload must be 8 bytes" in decode_error(b"\xd4\x02\x00")


def _tensor_ext(payload: bytes) -> bytes:
    return b"\xc9" + len(payload).to_bytes(4, "big") + b"\x03" + payload


def test_bad_inline_tensors():
    ok = b"\x93\xa5int16\x91\x02\xc4\x04\x01\x00\x02\x00"
    assert torch.equal(decode(_tensor_ext(ok)), torch.tensor([1, 2], dtype=torch.int16))
    cases = {
        b"\x93\xa5int16\x91\x03\xc4\x04\x01\x00\x02\x00": "tensor data has 4 bytes, but 3 elements of 2 bytes need 6",
        b"\x92\xa5int16\x91\x02": "tensor payload must be an array of 3",
        b"\x93\xa4int9\x91\x02\xc4\x04\x01\x00\x02\x00": "unknown dtype 'int9'",
        b"\x93\xa5int16\x91\xff\xc4\x04\x01\x00\x02\x00": "tensor dimension must be a non-negative msgpack int",
        b"\x93\xa5int16\xdc\x00\x41" + b"\x01" * 65 + b"\xc4\x02\x00\x00": "tensor shape has 65 dims",
        b"\x93\xa5int16\x92\xcf\x7f\xff\xff\xff\xff\xff\xff\xff\x02\xc4\x00": "more than 2**63-1 elements",
        b"\x93\xa5int16\x91\xcf\x80\x00\x00\x00\x00\x00\x00\x00\xc4\x00": "over 2**63-1",
        b"\x93\xa4bool\x91\x02\xc4\x02\x01\x02": "bool tensor has a byte 0x2",
        b"\x93\xa5int16\x91\x02\xa4\x01\x00\x02\x00": "tensor data must be a msgpack bin",
        b"\x93\x01\x91\x02\xc4\x04\x01\x00\x02\x00": "tensor dtype must be a msgpack str",
    }
    for payload, want in cases.items():
        assert want in decode_error(_tensor_ext(payload)), want
    # dims written with a signed form by another encoder are fine if not negative
    y = decode(_tensor_ext(b"\x93\xa5int16\x91\xd0\x02\xc4\x04\x01\x00\x02\x00"))
    assert y.tolist() == [1, 2]
    assert "tensor dimension must not be negative" in decode_error(
        _tensor_ext(b"\x93\xa5int16\x91\xd0\xfe\xc4\x00"))
    # a zero-sized dimension makes any other dimension harmless
    y = decode(_tensor_ext(b"\x93\xa5int16\x92\x00\xce\xff\xff\xff\xff\xc4\x00"))
    assert y.shape == (0, 2**32 - 1)


def test_bad_tensor_references():
    data = encode([torch.ones(1), torch.zeros(1)], [])
    assert "tensor reference #0 but no tensors were given" in decode_error(data)
    assert "tensor reference #1 is out of range (1 tensors given)" in decode_error(data, tensors=[torch.ones(1)])
    assert "tensor reference #0 resolves to a str, not a tensor" in decode_error(data, tensors=["a", "b"])
    big = b"\xd7\x02" + (2**64 - 1).to_bytes(8, "big")
    assert "#18446744073709551615 is out of range" in decode_error(big, tensors=[])


def test_nesting_bombs():
    tuples = b"\xc0"
    for _ in range(300):
        tuples = b"\xc9" + (len(tuples) + 1).to_bytes(4, "big") + b"\x01\x91" + tuples
    for bomb in [b"\x91" * 100_000 + b"\xc0", b"\x81\x01" * 100_000 + b"\xc0",
                 tuples, b"\xdc\x00\x01" * 50_000]:
        assert "nesting deeper than 256 levels" in decode_error(bomb)
    ok = b"\x91" * 256 + b"\xc0"
    assert decode(ok) is not None


def test_map_key_rules():
    assert "duplicate map key 'a'" in decode_error(b"\x82\xa1a\x01\xa1a\x02")
    assert "map key of type list is not hashable" in decode_error(b"\x81\x91\x01\x02")
    assert "map key of type dict is not hashable" in decode_error(b"\x81\x80\x02")
    assert "not a msgpack type" in decode_error(b"\x81\xc1\x02")


def test_source_is_named():
    msg = decode_error(b"\xc1", source="ckpt/model.safetensors")
    assert msg == "cannot decode modelopt state from 'ckpt/model.safetensors' at byte offset 0: byte 0xc1 is not a msgpack type"
    import pathlib

    assert "from 'x.bin'" in decode_error(b"", source=pathlib.Path("x.bin"))
    assert decode_error(b"") == "cannot decode modelopt state at byte offset 0: truncated input: a value needs 1 bytes, 0 left"


def test_torch_errors_become_decode_errors_with_cause():
    with pytest.raises(DecodeError) as info:
        decode(b"\xc7\x05\x06cuda:")
    assert info.value.__cause__ is not None


# --------------------------------------------------------------------------- corpus


# fuzz/make_corpus.py: the corpus and its expected outcomes (by path, under its own name:
# tests/st_corpus/make_corpus.py has the same file name)
_spec = importlib.util.spec_from_file_location("codec_make_corpus", os.path.join(ROOT, "fuzz", "make_corpus.py"))
make_corpus = sys.modules["codec_make_corpus"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_corpus)

CORPUS_TABLE = make_corpus.corpus()


def test_corpus_on_disk_is_the_table():
    """Every file in tests/codec_corpus is in the table, byte for byte, and back."""
    on_disk = {os.path.basename(p)[:-4] for p in glob.glob(os.path.join(CORPUS, "*.bin"))}
    assert on_disk == set(CORPUS_TABLE), "rerun python fuzz/make_corpus.py"
    for name, (data, _) in CORPUS_TABLE.items():
        with open(os.path.join(CORPUS, name + ".bin"), "rb") as f:
            assert f.read() == data, f"{name}.bin differs from fuzz/make_corpus.py; rerun it"
    kinds = [type(expect) for _, expect in CORPUS_TABLE.values()]
    assert kinds.count(make_corpus.Decodes) >= 20 and kinds.count(make_corpus.Fails) >= 55


@pytest.mark.parametrize("name", sorted(CORPUS_TABLE))
def test_corpus_file_has_its_stated_outcome(name):
    data, expect = CORPUS_TABLE[name]
    tensors = list(make_corpus.REF_TENSORS)
    if isinstance(expect, make_corpus.Decodes):
        value = decode(data, tensors)
        assert_same(expect.value, value)
        assert_same(value, decode(encode(value)) if not _has_ref(data) else value)
    else:
        msg = decode_error(data, tensors=tensors)
        for fragment in [expect.fragment, *expect.extra]:
            assert fragment in msg, (fragment, msg)


def _has_ref(data: bytes) -> bool:
    return b"\xd7\x02" in data


# --------------------------------------------------------------------------- sub-byte / quantized dtypes


@pytest.mark.parametrize("dtype", ["quint4x2", "quint2x4", "qint8", "quint8", "qint32"])
def test_quantized_inline_tensor_is_refused_on_decode(dtype):
    itemsize = 4 if dtype == "qint32" else 1
    for n in [1, 7, 4096]:
        # the data length matches numel * itemsize, as a well-formed file would have it
        blob = make_corpus.ext32(3, make_corpus.tensor_payload(dtype, [n], b"\xa5" * (n * itemsize)))
        msg = decode_error(b"\x81\xa3cfg\x82\xa1a\x01\xa1b" + blob)
        assert msg == (
            f"cannot decode modelopt state at byte offset 18: tensor dtype '{dtype}' is quantized: "
            "quantized tensors have no inline form (their scales and zero points are not stored) "
            "(at key path cfg['b'])"
        )
    # the dtype itself, as a value, is fine
    assert decode(encode(getattr(torch, dtype))) is getattr(torch, dtype)


@pytest.mark.parametrize("dtype", [torch.quint4x2, torch.quint2x4, torch.qint8, torch.quint8, torch.qint32])
def test_quantized_tensor_is_refused_on_encode(dtype):
    q = torch.quantize_per_tensor(torch.linspace(0, 1, 16), 0.1, 0, dtype)
    for tensors in (None, []):
        with pytest.raises(TypeError) as info:
            encode({"m": [1, {"amax": q}]}, tensors)
        assert str(info.value) == (
            f"cannot encode a quantized tensor (dtype {dtype}): its scales and zero points have no "
            "encoding; store t.dequantize(), or t.int_repr() with the quantization parameters as "
            "separate values at m[1]['amax']"
        )
        assert tensors in (None, [])


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="torch < 2.8 has no packed fp4")
def test_packed_fp4_round_trips_with_its_real_bytes():
    raw = torch.tensor([0x12, 0xF0, 0x7F], dtype=torch.uint8)
    t = raw.view(torch.float4_e2m1fn_x2)
    data = encode(t)
    assert data.endswith(b"\xc4\x03\x12\xf0\x7f")
    y = decode(data)
    assert y.dtype == torch.float4_e2m1fn_x2 and torch.equal(y.view(torch.uint8), raw)


# --------------------------------------------------------------------------- tensor kinds


def test_tensor_kinds_without_a_byte_image_are_refused_both_ways():
    class Sub(torch.Tensor):
        pass

    cases = [
        (torch.ones(2).as_subclass(Sub),
         "cannot encode a tensor of the subclass Sub (only plain torch.Tensor and nn.Parameter): convert "
         "it to a plain tensor first, e.g. t.as_subclass(torch.Tensor) or the subclass's own unwrapping"),
        (torch.empty(3, device="meta"),
         "cannot encode a meta tensor (it has no data): materialise it first, e.g. "
         "t.to_empty(device='cpu') and fill in its values"),
        (torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged),
         "cannot encode a nested tensor: store t.unbind() (a list of tensors) instead"),
        (torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.strided),
         "cannot encode a nested tensor: store t.unbind() (a list of tensors) instead"),
    ]
    for t, want in cases:
        for tensors in (None, []):
            with pytest.raises(TypeError) as info:
                encode({"w": [t]}, tensors)
            assert str(info.value) == want + " at w[0]"
            assert tensors in (None, [])
    # Parameter and Buffer are plain tensors
    p = torch.nn.Parameter(torch.randn(3))
    assert torch.equal(decode(encode(p)), p.detach())
    tensors = []
    encode(p, tensors)
    assert tensors[0] is p


DTENSOR_SCRIPT = LOADER + textwrap.dedent(
    """
    import os, tempfile
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, distribute_tensor, Shard
    dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        dt = distribute_tensor(torch.arange(8.0), mesh, [Shard(0)])
        for tensors in (None, []):
            try:
                C.encode_state({"layer": {"weight": dt}}, tensors)
            except TypeError as exc:
                print("TypeError:", exc)
        print(repr(C.decode_state(C.encode_state({"w": dt.full_tensor()}))["w"]))
    finally:
        dist.destroy_process_group()
    """
)


def test_dtensor_is_a_clear_error():
    out = subprocess.run([sys.executable, "-c", DTENSOR_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    want = ("TypeError: cannot encode a DTensor (a sharded tensor, e.g. from FSDP2 or tensor parallelism): "
            "gather it with full_tensor() first; sharded state is not supported yet at layer['weight']")
    lines = [ln for ln in out.stdout.splitlines() if not ln.startswith("[Gloo]")]  # torch < 2.13 logs to stdout
    assert lines == [want, want, "tensor([0., 1., 2., 3., 4., 5., 6., 7.])"], out.stdout


def test_conj_and_neg_bits_round_trip_with_their_values():
    x = torch.tensor([1 + 2j, 3 - 4j, -0.5 + 0j])
    cases = {
        "conj": (x.conj(), [1 - 2j, 3 + 4j, -0.5 - 0j]),
        "conj_imag": (x.conj().imag, [-2.0, 4.0, -0.0]),
        "neg_conj": (-x.conj(), [-1 + 2j, -3 - 4j, 0.5 + 0j]),
        "neg_view": (torch._neg_view(torch.tensor([1.0, -2.0])), [-1.0, 2.0]),
    }
    assert cases["conj"][0].is_conj() and cases["conj_imag"][0].is_neg()
    for name, (t, want) in cases.items():
        y = decode(encode({name: t}))[name]
        assert not y.is_conj() and not y.is_neg(), name
        assert y.tolist() == want, name
        # by reference: the caller gets the tensor with the bits resolved (DLPack drops them)
        tensors = []
        encode({name: t}, tensors)
        assert not tensors[0].is_conj() and not tensors[0].is_neg() and tensors[0].tolist() == want, name
    plain = torch.ones(2)
    tensors = []
    encode(plain, tensors)
    assert tensors[0] is plain  # nothing to resolve: the tensor itself


# --------------------------------------------------------------------------- allocation bounded by the input


def test_long_arrays_and_tuples_grow_past_the_preallocation():
    for n in [0, 1, 15, 16, 17, 33, 1000]:
        roundtrip([list(range(i % 3)) for i in range(n)])
        roundtrip(tuple(range(n)))
        roundtrip(torch.Size(range(n % 64)))
    # a failure after the preallocated slots: no leak of the items so far, a clean error
    msg = decode_error(b"\x91" + b"\xdc\x00\x14" + b"\xcc\x01" * 19)
    assert msg.endswith("truncated input: a value needs 1 bytes, 0 left (at key path [0][19])")


BOMB_SCRIPT = LOADER + textwrap.dedent(
    """
    import resource, sys
    sys.path.insert(0, {fuzz!r})
    import make_corpus

    def vm_kib():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1])

    bombs = {{kind: make(1_400_000) for kind, make in make_corpus.BOMBS.items()}}
    C.decode_state(C.encode_state([[1] * 100] * 100))  # warm up the allocator
    limit = vm_kib() * 1024 + {headroom}
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for kind, data in bombs.items():
        try:
            C.decode_state(data)
            print(kind, "decoded")
        except C.StateDecodeError as exc:
            print(kind, "StateDecodeError", str(exc)[:120])
        except MemoryError:
            print(kind, "MemoryError")
    """
)


@pytest.mark.skipif(bool(os.environ.get("MODELOPT_C_SANITIZE")),
                    reason="ASan reserves terabytes of address space: no RLIMIT_AS under it")
def test_allocation_bombs_fail_cleanly_under_an_address_space_limit():
    """1.4 MB inputs whose every nesting level claims all the bytes left: with the
    address space capped at 1 GiB above what the process already maps, each one is
    a StateDecodeError (a decoder that reserved the claimed slots asked for ~2.8 GB)."""
    script = BOMB_SCRIPT.format(fuzz=os.path.join(ROOT, "fuzz"), headroom=1 << 30)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [[k, "StateDecodeError"] for k in make_corpus.BOMBS], lines
    for line, kind in zip(lines, make_corpus.BOMBS):
        assert make_corpus.BOMB_ERRORS[kind] in line, line


# --------------------------------------------------------------------------- native hygiene


# the leak loop over encode/decode: tests/isolated/codec.py (tests/test_isolated.py)


def test_two_module_instances_are_independent():
    script = LOADER + textwrap.dedent(
        """
        import importlib.util
        spec = importlib.util.spec_from_file_location("modelopt_c._conversion", C.__file__)
        C2 = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(C2)
        assert C2 is not C and C2.StateDecodeError is not C.StateDecodeError
        data = C.encode_state({"a": (torch.ones(2), torch.float16)})
        assert repr(C2.decode_state(data)) == repr(C.decode_state(data))
        try:
            C2.decode_state(b"")
        except C2.StateDecodeError:
            pass
        del C2
        import gc; gc.collect()
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_public_helpers():
    from modelopt_c.codec import StateDecodeError, dumps_state, loads_state

    state = {"modelopt_state_dict": [("m", {"config": {}, "metadata": {"t": torch.ones(2)}})]}
    assert_same(state, loads_state(dumps_state(state)))
    with pytest.raises(StateDecodeError, match="from 'f.bin'"):
        loads_state(b"\xc1", source="f.bin")


def test_containers_mutated_during_encoding_fail_cleanly():
    """A torch function mode runs Python code mid-encode (tensor.detach()); it may
    mutate the containers being walked.  The encoder must notice instead of reading
    freed memory."""
    from torch.overrides import TorchFunctionMode

    holder = {}

    class Evil(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "detach":
                target = holder["target"]
                if isinstance(target, dict):
                    target.clear()
                else:
                    del target[:]
            return func(*args, **(kwargs or {}))

    evil = torch.ones(2)
    d = {"a": evil, "b": [1, 2, 3], "c": "x" * 100}
    holder["target"] = d
    with Evil(), pytest.raises(RuntimeError, match=r"^dict changed size during encoding at the top level$"):
        encode(d)
    lst = [evil, [1, 2, 3], "x" * 100]
    holder["target"] = lst
    with Evil(), pytest.raises(RuntimeError, match=r"^list changed size during encoding at \[1\]$"):
        encode(lst)


def test_short_ascii_strings_are_shared_and_cache_collisions_are_harmless():
    keys = [f"k{i}" for i in range(5000)]  # many more than the 512 cache slots
    value = [{k: k for k in keys}, {k: None for k in keys}, ["x" * 32, "x" * 33, "é" * 3, "\x00"]]
    y = roundtrip(value)
    # a key and the equal value decoded right after it are one object (the cache shares them)
    assert all(k is v for k, v in y[0].items())
    same = decode(encode(["_num_bits", "_num_bits"]))
    assert same[0] is same[1]
