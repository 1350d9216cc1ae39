"""Test support for the safetensors-format tests: import the package in a tree whose
``__init__`` still needs pieces that are not merged, and a stand-in state codec used
only while ``_conversion.encode_state`` / ``decode_state`` are absent."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))  # this tree's package, not an installed one

try:
    import modelopt_c  # noqa: F401
except ImportError:
    # The package __init__ imports conversion functions another branch provides;
    # load the subpackage modules without it.
    pkg = types.ModuleType("modelopt_c")
    pkg.__path__ = [str(ROOT / "modelopt_c")]
    sys.modules["modelopt_c"] = pkg

from modelopt_c import _conversion  # noqa: E402

HAVE_CODEC = hasattr(_conversion, "encode_state") and hasattr(_conversion, "decode_state")


def _enc(obj: Any, tensors: list) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {"__tensor__": len(tensors) - 1}
    if isinstance(obj, torch.Size):
        return {"__size__": list(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_enc(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_enc(v, tensors) for v in obj]
    if isinstance(obj, dict):
        return {"__dict__": [[_enc(k, tensors), _enc(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"stand-in codec cannot encode {type(obj).__name__}")


def _dec(obj: Any, tensors: list) -> Any:
    if isinstance(obj, list):
        return [_dec(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__size__" in obj:
            return torch.Size(obj["__size__"])
        if "__tuple__" in obj:
            return tuple(_dec(v, tensors) for v in obj["__tuple__"])
        return {_dec(k, tensors): _dec(v, tensors) for k, v in obj["__dict__"]}
    return obj


def standin_encode_state(obj: Any, tensors: list | None = None) -> bytes:
    return json.dumps(_enc(obj, tensors if tensors is not None else [])).encode()


def standin_decode_state(data: Any, tensors: list | None = None) -> Any:
    try:
        return _dec(json.loads(bytes(data)), list(tensors or []))
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"stand-in codec: {exc}") from None


def install_codec(monkeypatch) -> None:
    """Use the real codec when built in, else the stand-in (for this test only)."""
    if not HAVE_CODEC:
        monkeypatch.setattr(_conversion, "encode_state", standin_encode_state, raising=False)
        monkeypatch.setattr(_conversion, "decode_state", standin_decode_state, raising=False)


def sample_state() -> dict[str, Any]:
    return {
        "modelopt_state_dict": [
            ("quantize", {"config": {"num_bits": 8, "axis": None, "names": ["a", "b"]},
                          "metadata": {"amax": torch.tensor([1.5, 2.0]), "shape": (3, 4)}}),
            ("sparsity", {"config": {"ratio": 0.5}, "metadata": {"masks": {"w": torch.ones(2, 2, dtype=torch.bool)}}}),
        ],
        "modelopt_version": "0.1.0",
    }


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.emb = torch.nn.Embedding(5, 2).to(torch.bfloat16)
        self.register_buffer("steps", torch.tensor(7, dtype=torch.int64))
