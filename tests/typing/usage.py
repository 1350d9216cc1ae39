"""Typed use of modelopt_c, checked by mypy against the package's annotations and the
native module's stubs (modelopt_c/_conversion.pyi): tests/test_notebook_typing.py.

The lines marked ``# type: ignore[...]`` MUST be errors: the check runs with
--warn-unused-ignores, so a stub that grew too loose (Any) fails it."""

from __future__ import annotations

from collections import deque

import torch
import torch.nn as nn

import modelopt_c as mto
from modelopt_c import _conversion as C


def convert_and_save(model: nn.Module, path: str) -> nn.Module:
    converted: nn.Module = mto.apply_mode(model, [("t_replace", {"act": "tanh"})], init_state=None)
    mto.save(converted, path)
    restored: nn.Module = mto.restore(nn.Linear(2, 2), path)
    state: dict[str, object] = mto.modelopt_state(restored)
    del state
    return restored


def manager(model: nn.Module) -> str:
    sm = mto.ModeloptStateManager(model, init_state=False)
    converted: bool = mto.ModeloptStateManager.is_converted(model, is_root=True)
    version: str = sm.state_version
    pending: deque[tuple[str, str]] = sm._export_stack
    names = [d.name for d, _cfg, _meta in sm.modes_with_states()]
    last = sm.last_mode
    html: str = sm._repr_html_()
    if last is not None:
        names.append(str(last))
    return f"{converted} {version} {pending} {names} {html}"


def summary(path: str) -> str:
    s: mto.Summary = mto.describe(path)
    info: dict[str, object] = s.info
    return str(s) + str(len(info))


def codec() -> bytes:
    tensors: list[torch.Tensor] = []
    data: bytes = C.encode_state({"w": torch.ones(2)}, tensors)
    C.decode_state(data, tensors, source="x.bin")
    digest: int = C.st_xxh64(data)
    header = C.st_read_header("x.safetensors")
    offset: int = header[2]
    C.st_write("x.safetensors", {"a": torch.ones(1)}, {"k": "v"}, progress=lambda done, total: None)
    return data + bytes([digest & 0xFF, offset & 0xFF])


def expected_errors(model: nn.Module) -> None:
    C.st_xxh64("not bytes")  # type: ignore[arg-type]
    version: int = mto.ModeloptStateManager(model).state_version  # type: ignore[assignment]
    mto.ModeloptStateManager.is_converted(model, root=True)  # type: ignore[call-arg]
    C.st_write("x", {"a": torch.ones(1)}, {"k": 1})  # type: ignore[dict-item]
    C.decode_state(b"", None, "positional source")  # type: ignore[call-arg]
    s: int = mto.describe("x")  # type: ignore[assignment]
    del version, s
