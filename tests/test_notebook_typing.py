"""Types: the native module's stubs (modelopt_c/_conversion.pyi) declare every public
name it has, py.typed ships, and mypy accepts tests/typing/usage.py (and rejects its
marked lines) against them."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tempfile

import pytest

import modelopt_c
from modelopt_c import _conversion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "modelopt_c")


def _stub_names() -> tuple[set[str], dict[str, set[str]]]:
    tree = ast.parse(open(os.path.join(PKG, "_conversion.pyi")).read())
    top: set[str] = set()
    members: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top.add(node.name)
        if isinstance(node, ast.ClassDef):
            members[node.name] = {
                n.name if isinstance(n, ast.FunctionDef) else n.target.id  # type: ignore[union-attr]
                for n in node.body if isinstance(n, ast.FunctionDef) or isinstance(n, ast.AnnAssign)
            }
    return top, members


def test_stub_declares_every_native_name():
    top, members = _stub_names()
    native = {n for n in dir(_conversion) if not n.startswith("__")}
    assert native == top, f"in the module, not the stub: {native - top}; in the stub only: {top - native}"
    manager = {n for n in vars(_conversion.ModeloptStateManager) if not n.startswith("__")}
    declared = {n for n in members["ModeloptStateManager"] if not n.startswith("__")}
    assert manager == declared, manager ^ declared


def test_stub_signatures_match_the_native_parameters():
    # the keyword names the stub declares are accepted by the functions themselves
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.safetensors")
        _conversion.st_write(path=path, tensors={"a": torch.ones(1)}, metadata={}, progress=None)
        meta, tensors = _conversion.st_read(path=path, verify=True, _verify_if_present=False)
        assert list(tensors) == ["a"] and "checksums" in meta
    data = _conversion.encode_state({"k": 1}, tensors=None)
    assert _conversion.decode_state(data, tensors=None, source="s") == {"k": 1}
    assert _conversion.ModeloptStateManager.is_converted(model=torch.nn.Linear(1, 1), is_root=True) is False


def test_py_typed_ships_with_the_package():
    assert os.path.isfile(os.path.join(PKG, "py.typed"))
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["modelopt_c"]
    assert {"py.typed", "*.pyi"} <= set(data)
    assert os.path.dirname(modelopt_c.__file__) == PKG


@pytest.mark.slow
def test_mypy_accepts_the_typed_usage_file():
    pytest.importorskip("mypy", reason="mypy is not installed (pip install mypy)")
    with tempfile.TemporaryDirectory() as cache:
        proc = subprocess.run(
            [sys.executable, "-m", "mypy", "--follow-imports=silent", "--warn-unused-ignores", "--no-error-summary",
             "--cache-dir", cache, "tests/typing/usage.py"],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
