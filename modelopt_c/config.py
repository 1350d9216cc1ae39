"""Mode configs: ``ModeloptBaseConfig`` (pydantic v2) and ``ModeloptField``.

A config is a pydantic model that also behaves as a mutable mapping over its field
names *and* aliases, so mode code can treat it like the dict it is stored as.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, KeysView, MutableMapping, ValuesView
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticUndefined

__all__ = ["ModeloptBaseConfig", "ModeloptField"]

ConfigDict = dict[str, Any]  # one mode's config, as stored in the modelopt state


def ModeloptField(default: Any = PydanticUndefined, **kwargs: Any) -> Any:  # noqa: N802
    """A ``pydantic.Field`` that insists on a default value.

    Configs are rebuilt from saved state with ``config_class(**saved)``; a field
    without a default would make older checkpoints unreadable once it is added.
    """
    assert default is not PydanticUndefined, "A default value must be set for ModeloptField."
    return Field(default=default, **kwargs)


_MAX_REPR = 80


class _Cut:
    """A long value's repr, cut: its start, then how many items or characters it has."""

    def __init__(self, text: str, value: Any) -> None:
        size = f"{len(value)} items" if hasattr(value, "__len__") and not isinstance(value, str) else f"{len(text)} chars"
        self.text = f"{text[:_MAX_REPR - 20]}... ({size})"

    def __repr__(self) -> str:
        return self.text


class ModeloptBaseConfig(BaseModel, MutableMapping):
    """Base class of every mode's config.

    * unknown keys are rejected (``extra="forbid"``) and assignments are validated;
    * ``model_dump()`` uses aliases, which is what the modelopt state stores;
    * ``cfg["key"]``, ``"key" in cfg``, ``keys()``, ``items()``, ``values()``,
      ``get()`` and ``update()`` work with field names and aliases alike;
    * deleting a key raises ``TypeError``: the schema's fields cannot go away.

    Every subclass is registered with ``torch.serialization.add_safe_globals`` so a
    checkpoint holding config objects loads with ``weights_only=True``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        torch.serialization.add_safe_globals([cls])

    def __repr_args__(self) -> Any:
        # pydantic's repr (``Cfg(a=1, b='x')``), a long value cut to its start and size
        for key, value in super().__repr_args__():
            text = repr(value)
            yield key, (value if len(text) <= _MAX_REPR else _Cut(text, value))

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        """Dump to a dict, by alias and without serialisation warnings unless asked."""
        return super().model_dump(**{"by_alias": True, "warnings": False, **kwargs})

    def model_dump_json(self, **kwargs: Any) -> str:
        """Dump to JSON, by alias and without serialisation warnings unless asked."""
        return super().model_dump_json(**{"by_alias": True, "warnings": False, **kwargs})

    def _field_name(self, key: str) -> str:
        """The field name behind ``key`` (a name or an alias); AttributeError if none."""
        fields = type(self).model_fields
        if key in fields or key in (self.model_extra or {}):
            return key
        for name, info in fields.items():
            if info.alias == key:
                return name
        raise AttributeError(f"Key {key} not found in the config.")

    get_field_name_from_key = _field_name

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        try:
            self._field_name(key)
        except AttributeError:
            return False
        return True

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, self._field_name(key))
        except AttributeError:
            raise KeyError(key) from None

    def __setitem__(self, key: str, value: Any) -> None:
        try:
            name = self._field_name(key)
        except AttributeError:
            raise KeyError(key) from None
        setattr(self, name, value)

    def __delitem__(self, key: str) -> None:
        raise TypeError(
            f"{type(self).__name__} does not support key deletion; schema fields are "
            f"fixed (attempted to delete {key!r})."
        )

    def get(self, key: str, default: Any = None) -> Any:
        """The value under ``key`` (name or alias), or ``default``."""
        try:
            return self[key]
        except KeyError:
            return default

    def __len__(self) -> int:
        return len(type(self).model_fields) + len(self.model_extra or {})

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        for name, info in type(self).model_fields.items():
            yield info.alias or name
        yield from self.model_extra or {}

    def _as_dict(self) -> dict[str, Any]:
        return {k: self[k] for k in self}

    def keys(self) -> KeysView[str]:
        """Keys, aliases preferred over field names."""
        return self._as_dict().keys()

    def values(self) -> ValuesView[Any]:
        """Values, in key order."""
        return self._as_dict().values()

    def items(self) -> ItemsView[str, Any]:
        """(key, value) pairs, aliases preferred over field names."""
        return self._as_dict().items()

    def update(self, config: dict[str, Any]) -> None:  # type: ignore[override]
        """Set every key of ``config`` (names or aliases), validating each."""
        for key, value in config.items():
            self[key] = value
