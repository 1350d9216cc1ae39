"""Optional test dependencies: skip only when the documented package itself is
absent; any other import failure (one of its own dependencies missing, a broken
install) fails the test instead of hiding behind a skip."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def optional_import(module: str, package: str) -> ModuleType:
    """Import `module`; skip (module level) if its top-level package is not installed.
    `package` is what to pip install, named in the skip reason."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != top:
            raise
        pytest.skip(f"{package} is not installed (pip install {package})", allow_module_level=True)
