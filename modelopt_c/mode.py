"""The mode API: ``ModeDescriptor``, the registries and ``get_mode_config``.

Modes stay Python: they are what users subclass.  The native core looks them up
through ``_ModeRegistryCls.get_from_any`` (see ``_runtime``).
"""

from __future__ import annotations

import difflib
import sys
import warnings
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, overload

import torch.nn as nn

from .config import ModeloptBaseConfig

__all__ = ["ModeDescriptor", "_ModeDescriptor", "_ModeRegistryCls", "get_mode_config"]

MetadataDict = dict[str, Any]
ConfigDict = dict[str, Any]
ModeConfigList = list[tuple[str, ConfigDict]]
ModeState = dict[str, Any]  # {"config": ConfigDict, "metadata": MetadataDict}, one mode's entry
ConvertReturnType = tuple[nn.Module, MetadataDict]
ConvertEntrypoint = Callable[..., tuple[nn.Module, MetadataDict]]
RestoreEntrypoint = Callable[[nn.Module, ModeloptBaseConfig, MetadataDict], nn.Module]
UpdateEntrypoint = Callable[[nn.Module, ModeloptBaseConfig, MetadataDict], None]


def _no_update(model: nn.Module, config: ModeloptBaseConfig, metadata: MetadataDict) -> None:
    return None


class ModeDescriptor(ABC):
    """Describes one mode: its name, config class and entry points.

    Subclasses give ``name``, ``config_class``, ``convert`` and ``restore`` as
    properties.  ``convert(model, config, **mode_kwargs)`` returns
    ``(model, metadata)``; ``restore(model, config, metadata)`` returns the model.
    The optional properties below shape which modes may follow which.
    """

    def __str__(self) -> str:
        return str(self.name)

    def __repr__(self) -> str:
        # nvidia-modelopt's form, then what shapes the mode's use; a property that
        # raises (a half-written descriptor in a notebook) is left out, never raised
        details = []
        for label, attr in (("config", "config_class"), ("export mode", "export_mode")):
            try:
                value = getattr(self, attr)
            except Exception:  # noqa: BLE001 - a repr shows what it can
                continue
            if value is not None:
                details.append(f"{label} {getattr(value, '__name__', None) or repr(value)}")
        try:
            if self.is_export_mode:
                details.append("an export mode")
        except Exception:  # noqa: BLE001
            pass
        return f"<{type(self).__name__}: '{self.name}'" + "".join(f"; {d}" for d in details) + ">"

    def __hash__(self) -> int:
        return hash(self.name)

    @property
    @abstractmethod
    def name(self) -> str:
        """The mode's name, as recorded in the modelopt state."""

    @property
    @abstractmethod
    def config_class(self) -> type[ModeloptBaseConfig]:
        """The config class that validates this mode's config."""

    @property
    @abstractmethod
    def convert(self) -> ConvertEntrypoint:
        """``convert(model, config, **mode_kwargs) -> (model, metadata)``."""

    @property
    @abstractmethod
    def restore(self) -> RestoreEntrypoint:
        """``restore(model, config, metadata) -> model``: replay the conversion."""

    @property
    def next_modes(self) -> set[str] | None:
        """Modes that must come right after this one (``None``: no restriction)."""
        return None

    @property
    def next_prohibited_modes(self) -> set[str] | None:
        """Modes that may not come right after this one (``None``: no restriction)."""
        return None

    @property
    def export_mode(self) -> str | None:
        """The export mode that must eventually follow this mode, if any."""
        return None

    @property
    def is_export_mode(self) -> bool:
        """Whether this mode is an export mode."""
        return False

    @property
    def search_algorithm(self) -> type:
        """The search algorithm of this mode; most modes have none."""
        raise RuntimeError("Search is not supported for this mode.")

    @property
    def update_for_save(self) -> UpdateEntrypoint:
        """``(model, config, metadata) -> None``, run before saving; edits in place."""
        return _no_update

    @property
    def update_for_new_mode(self) -> UpdateEntrypoint:
        """``(model, config, metadata) -> None``, run before a new mode; edits in place."""
        return _no_update

    @property
    def require_model_like(self) -> bool:
        """Whether ``convert``/``restore`` want the ``ModelLikeModule`` recipe, not a model."""
        return False

    @property
    def save_mode_in_state(self) -> bool:
        """Whether this mode is recorded in saved state (else re-applied by hand)."""
        return True

    def assert_compatibility_as_next_mode_of(self, other_mode: ModeDescriptor | str) -> None:
        """Raise ``AssertionError`` when this mode may not directly follow ``other_mode``."""
        if isinstance(other_mode, str):
            other_mode = _ModeRegistryCls.get_from_any(other_mode)
        allowed = other_mode.next_modes
        if allowed is not None:
            assert str(self) in allowed, (
                f"Cannot add {self} after {other_mode}! Next modes of {other_mode} are {allowed}."
            )
        prohibited = other_mode.next_prohibited_modes
        if prohibited is not None:
            assert str(self) not in prohibited, (
                f"Cannot add {self} after {other_mode}! {other_mode} does not allow {self} to be its next mode."
            )


_ModeDescriptor = ModeDescriptor
ModeType = ModeDescriptor | str
ModeLike = ModeType | list[ModeType] | ModeConfigList
ModeKwargsType = dict[str, Any] | list[dict[str, Any]]
T = TypeVar("T", bound=ModeDescriptor)


class _ModeRegistryCls:
    """A named registry of mode descriptors; every registry joins a class-wide list.

    The list holds weak references, so deleting the last reference to a registry
    removes it (and its modes) from every lookup: keep registries in module-level
    names, as one does anyway to decorate modes with them.
    """

    _registry_refs: ClassVar[list[weakref.ref]] = []

    def __init__(self, registry_name: str) -> None:
        self._registry_name = registry_name
        self._name2descriptor: dict[str, ModeDescriptor] = {}
        self._registry_refs.append(weakref.ref(self))

    @classmethod
    def _all(cls) -> list[_ModeRegistryCls]:
        """The live registries, in creation order."""
        return [r for r in (ref() for ref in cls._registry_refs) if r is not None]

    def __repr__(self) -> str:
        names = list(self._name2descriptor)
        listed = ", ".join(names) if names else "no modes"
        count = f"{len(names)} mode{'' if len(names) == 1 else 's'}: " if names else ""
        return f"<_ModeRegistryCls {self._registry_name!r}: {count}{listed}>"

    @overload
    def register_mode(self, cls_descriptor: type[T], *, replace: bool = False) -> type[T]: ...

    @overload
    def register_mode(self, cls_descriptor: None = None, *, replace: bool = False) -> Callable[[type[T]], type[T]]: ...

    def register_mode(self, cls_descriptor: type[T] | None = None, *, replace: bool = False) -> Any:
        """Class decorator: instantiate the descriptor and register it under its name.

        ``@registry.register_mode`` or ``@registry.register_mode(replace=True)``.

        A descriptor of the same class already registered elsewhere under the name is
        reused, so one mode is one instance across registries.  A *different* class
        under a registered name:

        * ``replace=True``, a redefinition (same module and qualified name: a re-run
          notebook cell, ``importlib.reload``) or any re-registration from an
          interactive session (IPython, Jupyter, ``python -i``): the new descriptor
          replaces the old one in every registry holding it (with a warning unless
          ``replace=True``), so a stale descriptor is never used again;
        * otherwise, in this registry: ``ValueError`` (remove it first with
          ``remove_mode``, or pass ``replace=True``); in another registry only: the
          registered instance is reused, as nvidia-modelopt does, with a warning.
        """
        if cls_descriptor is None:
            return lambda cls: self.register_mode(cls, replace=replace)
        descriptor = cls_descriptor()
        name = descriptor.name
        old = self._name2descriptor.get(name)
        if old is None and self.contained_in_any(name):
            try:
                old = self.get_from_any(name)
            except AssertionError:  # already ambiguous: the new one settles it
                old = next(r._name2descriptor[name] for r in self._all() if name in r._name2descriptor)
        if old is not None and type(old) is cls_descriptor:  # the same mode registered again
            if name in self._name2descriptor and not replace:
                raise ValueError(
                    f"Mode {name} already registered in registry {self._registry_name!r} (by this same class "
                    f"{_qualname(cls_descriptor)}): call registry.remove_mode({name!r}) first, or register "
                    "with @registry.register_mode(replace=True)."
                )
            self._name2descriptor[name] = old
            return cls_descriptor
        if old is not None:
            how = _replacement(old, cls_descriptor, replace)
            if how is None and name in self._name2descriptor:
                raise ValueError(
                    f"Mode {name} already registered in registry {self._registry_name!r} by "
                    f"{_qualname(type(old))}, not {_qualname(cls_descriptor)}: call "
                    f"registry.remove_mode({name!r}) first, or register with "
                    "@registry.register_mode(replace=True)."
                )
            if how is None:
                warnings.warn(
                    f"Mode {name} is already registered by {_qualname(type(old))} in another registry; that "
                    f"descriptor is used, not {_qualname(cls_descriptor)} (nvidia-modelopt's rule). Pass "
                    "register_mode(replace=True) to replace it everywhere.",
                    stacklevel=2,
                )
                self._name2descriptor[name] = old
                return cls_descriptor
            if how:
                warnings.warn(
                    f"Mode {name} re-registered ({how}): {_qualname(cls_descriptor)} replaces the earlier "
                    f"{_qualname(type(old))} in every registry; models converted before keep the old "
                    "conversion, new apply_mode/restore calls use the new one.",
                    stacklevel=2,
                )
            for registry in self._all():
                if registry._name2descriptor.get(name) is old:
                    registry._name2descriptor[name] = descriptor
        self._name2descriptor[name] = descriptor
        return cls_descriptor

    def remove_mode(self, mode: ModeType) -> None:
        """Remove a mode from this registry (``KeyError`` if absent)."""
        del self._name2descriptor[str(mode)]

    def get(self, mode: ModeType) -> ModeDescriptor | None:
        """The descriptor registered as ``mode``, or ``None``."""
        return self._name2descriptor.get(str(mode))

    def __getitem__(self, mode: ModeType) -> ModeDescriptor:
        try:
            return self._name2descriptor[str(mode)]
        except KeyError:
            raise KeyError(
                f"Mode {mode} not found in registry {self._registry_name!r}; "
                f"it holds {sorted(self._name2descriptor)}."
            ) from None

    def __contains__(self, mode: object) -> bool:
        return str(mode) in self._name2descriptor

    def __del__(self) -> None:
        refs = type(self)._registry_refs
        refs[:] = [ref for ref in refs if ref() is not None and ref() is not self]

    @classmethod
    def contained_in_any(cls, mode: ModeType) -> bool:
        """Whether any registry (ours, or nvidia-modelopt's once imported) has ``mode``."""
        from . import interop

        name = str(mode)
        return any(name in r._name2descriptor for r in cls._all()) or interop.has_mode(name)

    @classmethod
    def get_from_any(cls, mode: ModeType) -> ModeDescriptor:
        """The one descriptor registered as ``mode`` anywhere.

        Raises ``KeyError`` naming the mode and the registered ones when absent, and
        ``AssertionError`` when registries hold different instances under the name.
        """
        from . import interop

        name = str(mode)
        found = [r._name2descriptor[name] for r in cls._all() if name in r._name2descriptor]
        if not found:
            found = interop.find_modes(name)
        if not found:
            known = sorted({n for r in cls._all() for n in r._name2descriptor} | set(interop.mode_names()))
            raise KeyError(f"Mode {mode} not found in any registry.{_unknown_mode_hint(name, known)} Registered "
                           f"modes: {known}. Import the package that defines the mode before applying or restoring it.")
        assert all(found[0] == d for d in found), f"Mode {mode} is ambiguous."
        return found[0]

    @classmethod
    def get_registry_by_name(cls, registry_name: str) -> _ModeRegistryCls:
        """The registry called ``registry_name`` (``KeyError`` if none)."""
        from . import interop

        for registry in cls._all():
            if registry._registry_name == registry_name:
                return registry
        foreign = interop.registry_by_name(registry_name)
        if foreign is not None:
            return foreign
        raise KeyError(f"Registry {registry_name} not found.")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _interactive() -> bool:
    """Whether we run in an interactive session: IPython/Jupyter or ``python -i`` / the REPL."""
    ipython = sys.modules.get("IPython")
    if ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None:
        return True
    return hasattr(sys, "ps1") or bool(sys.flags.interactive)


def _replacement(old: ModeDescriptor, new_cls: type, replace: bool) -> str | None:
    """Why ``new_cls`` may replace ``old`` ("" when asked with replace=True), or None."""
    if replace:
        return ""
    old_cls = type(old)
    if (old_cls.__module__, old_cls.__qualname__) == (new_cls.__module__, new_cls.__qualname__):
        return "the class was defined again"
    if _interactive():
        return "from an interactive session"
    return None


def _unknown_mode_hint(name: str, known: list[str]) -> str:
    """What to do about a mode no registry has: install nvidia-modelopt, or the likely typo."""
    from . import interop

    if name in interop.NVIDIA_MODES and interop.installed_version() is None:
        return f" mode {name!r} comes from nvidia-modelopt: pip install nvidia-modelopt."
    close = difflib.get_close_matches(name, sorted(set(known) | set(interop.NVIDIA_MODES)), n=3, cutoff=0.7)
    return f" Did you mean {' or '.join(map(repr, close))}?" if close else ""


def _is_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (str, ModeDescriptor))


def get_mode_config(mode_like: Any) -> ModeConfigList:
    """Standardise a mode-like value to ``[(mode, config_dict), ...]``.

    Accepts a name, a descriptor, a ``(mode, config)`` pair or a list (or tuple) of
    these; a missing or ``None`` config becomes ``{}``.
    """
    if isinstance(mode_like, list):
        items = mode_like
    elif _is_pair(mode_like):
        items = [mode_like]
    elif isinstance(mode_like, tuple):
        items = list(mode_like)
    else:
        items = [mode_like]
    result: ModeConfigList = []
    for m in items:
        if isinstance(m, (str, ModeDescriptor)):
            result.append((m, {}))
        elif isinstance(m, (tuple, list)) and len(m) in (1, 2):
            result.append((m[0], (m[1] if len(m) == 2 else None) or {}))
        else:
            raise TypeError(
                f"Cannot read mode {m!r}: expected a mode name, a ModeDescriptor or a "
                "(mode, config) pair."
            )
    return result
