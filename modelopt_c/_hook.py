"""Import hooks of the drop-in switch, importable without torch (see ``modelopt_c.dropin``).

Two meta-path finders, each acting on names under ``modelopt`` only:

* ``ConversionHook``: when nvidia-modelopt's ``modelopt.torch.opt.conversion`` is
  executed (first import or reload), its conversion API is replaced by modelopt_c's
  right after the module body ran, so every module that imports those names later
  (``from ..conversion import save``; ``modelopt.torch.opt``'s own ``from .conversion
  import *``) binds modelopt_c's.
* ``FallbackFinder``: when no other finder knows a top-level ``modelopt`` (nvidia-modelopt
  is not installed), ``modelopt``, ``modelopt.torch`` and ``modelopt.torch.opt[.mode,
  .config, .conversion, ...]`` resolve to modelopt_c's modules; any other
  ``modelopt.*`` name says it comes from nvidia-modelopt.

This file imports nothing of modelopt_c at import time: the switched interpreter's
start-up (``_startup/sitecustomize.py``) loads it by path, and child processes that
never touch modelopt pay nothing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import importlib.machinery
import sys
import types
from typing import Any

CONVERSION = "modelopt.torch.opt.conversion"
PIP_HINT = "pip install nvidia-modelopt"


def _other_finders_spec(finder: Any, name: str, path: Any) -> Any:
    """The spec that the finders other than ``finder`` give for ``name`` (None if none)."""
    for other in list(sys.meta_path):
        if other is finder or getattr(other, "_modelopt_c_hook", None) is not None:
            continue
        find = getattr(other, "find_spec", None)
        if find is None:
            continue
        spec = find(name, path)
        if spec is not None:
            return spec
    return None


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then hands the fresh module to ``dropin.patch_conversion``."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        # the switch may have been turned off since this module's import began
        if any(getattr(f, "_modelopt_c_hook", None) == "conversion" for f in sys.meta_path):
            importlib.import_module("modelopt_c.dropin").patch_conversion(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, is_package...
        return getattr(self._loader, name)


class ConversionHook(importlib.abc.MetaPathFinder):
    """Patches nvidia-modelopt's conversion module whenever it is executed."""

    _modelopt_c_hook = "conversion"

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != CONVERSION:
            return None
        spec = _other_finders_spec(self, name, path)
        if spec is None or spec.loader is None or isinstance(spec.loader, _PatchingLoader):
            return spec
        spec.loader = _PatchingLoader(spec.loader)
        return spec


# modelopt name -> modelopt_c module it stands for (submodules of modelopt.torch.opt: by rule)
_ALIASES = {"modelopt.torch": "modelopt_c.torch", "modelopt.torch.opt": "modelopt_c.torch.opt"}


class _AliasLoader(importlib.abc.Loader):
    """Loads a ``modelopt`` name as the modelopt_c module it stands for."""

    def __init__(self, target: str | None) -> None:
        self._target = target

    def create_module(self, spec: Any) -> Any:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        if self._target is None:  # the top-level package: a small stand-in
            module.__doc__ = (
                "Stand-in for nvidia-modelopt's top-level package, provided by modelopt_c because "
                "nvidia-modelopt is not installed: only modelopt.torch.opt is available "
                f"(modelopt_c's). For the rest: {PIP_HINT}."
            )
            module.__modelopt_c__ = True
            return
        # the import system returns what sys.modules holds after exec_module: the target
        sys.modules[module.__name__] = importlib.import_module(self._target)


class FallbackFinder(importlib.abc.MetaPathFinder):
    """``modelopt.torch.opt`` as modelopt_c, only while no real ``modelopt`` exists."""

    _modelopt_c_hook = "fallback"

    def _ours(self) -> bool:
        top = sys.modules.get("modelopt")
        return top is not None and getattr(top, "__modelopt_c__", False)

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name == "modelopt":
            if _other_finders_spec(self, name, path) is not None:
                return None  # a real modelopt distribution: never shadow it
            return importlib.machinery.ModuleSpec(name, _AliasLoader(None), is_package=True)
        if not name.startswith("modelopt.") or not self._ours():
            return None
        target_name = _ALIASES.get(name)
        if target_name is None and name.startswith("modelopt.torch.opt."):
            candidate = "modelopt_c.torch.opt." + name[len("modelopt.torch.opt.") :]
            try:
                found = importlib.util.find_spec(candidate) is not None
            except ModuleNotFoundError:
                found = False
            target_name = candidate if found else None
        if target_name is None:
            raise ModuleNotFoundError(
                f"No module named {name!r}: without nvidia-modelopt installed, modelopt_c provides "
                f"modelopt.torch.opt (and its mode, config, conversion modules) only; {name} comes "
                f"from nvidia-modelopt: {PIP_HINT}",
                name=name,
            )
        return importlib.machinery.ModuleSpec(name, _AliasLoader(target_name), is_package=True)


def installed(kind: str) -> Any:
    """The registered hook of ``kind`` ("conversion" or "fallback"), or None."""
    for finder in sys.meta_path:
        if getattr(finder, "_modelopt_c_hook", None) == kind:
            return finder
    return None


def add(kind: str) -> Any:
    """Register the hook of ``kind`` at the front of sys.meta_path (once); returns it."""
    finder = installed(kind)
    if finder is None:
        finder = ConversionHook() if kind == "conversion" else FallbackFinder()
        sys.meta_path.insert(0, finder)
    return finder


def remove(kind: str) -> bool:
    """Unregister every hook of ``kind``; whether one was registered."""
    before = len(sys.meta_path)
    sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "_modelopt_c_hook", None) != kind]
    return len(sys.meta_path) != before
