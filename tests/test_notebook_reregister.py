"""Notebook re-runs: registering a mode again under its name replaces it (with a warning,
or quietly with replace=True) and never leaves a stale descriptor in use."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch.nn as nn

import modelopt_c as mto
from modelopt_c.config import ModeloptBaseConfig, ModeloptField

Registry = mto._ModeRegistryCls


class RrConfig(ModeloptBaseConfig):
    n: int = ModeloptField(0)


def _mode(name: str, tag: str, qualname: str = "SwapRelu") -> type:
    """A descriptor class as a notebook cell would define it; its convert records `tag`."""

    def convert(model, config, **kwargs):
        return model, {"tag": tag}

    cls = type(qualname, (mto.ModeDescriptor,), {
        "name": name,
        "config_class": RrConfig,
        "convert": property(lambda self: convert),
        "restore": property(lambda self: lambda m, c, md: m),
        "__module__": "__main__",
    })
    cls.__qualname__ = qualname
    return cls


def _tag(name: str) -> str:
    model = mto.apply_mode(nn.Linear(1, 1), name)
    return mto.ModeloptStateManager(model)._last_metadata["tag"]


@pytest.fixture
def cleanup():
    made: list[tuple[Registry, str]] = []
    yield made
    for registry, name in made:
        if name in registry:
            registry.remove_mode(name)


def test_rerun_of_the_cell_with_the_old_registry_still_alive(cleanup):
    # cell run 1: a registry, a mode; the registry was the cell's result (Out[1] keeps it)
    old_registry = Registry("nb_rerun")
    old_registry.register_mode(_mode("t_rr_cell", "v1"))
    cleanup.append((old_registry, "t_rr_cell"))
    assert _tag("t_rr_cell") == "v1"
    # cell run 2, after an edit: a new registry object, the class defined again
    new_registry = Registry("nb_rerun")
    cleanup.append((new_registry, "t_rr_cell"))
    with pytest.warns(UserWarning, match=r"^Mode t_rr_cell re-registered \(the class was defined again\): "
                      r"__main__\.SwapRelu replaces the earlier __main__\.SwapRelu in every registry"):
        new_registry.register_mode(_mode("t_rr_cell", "v2"))
    assert _tag("t_rr_cell") == "v2"  # the edited mode, not the stale one
    assert old_registry["t_rr_cell"] is new_registry["t_rr_cell"]
    assert Registry.get_from_any("t_rr_cell") is new_registry["t_rr_cell"]


def test_redefinition_in_the_same_registry(cleanup):
    registry = Registry("nb_same")
    cleanup.append((registry, "t_rr_same"))
    registry.register_mode(_mode("t_rr_same", "v1"))
    with pytest.warns(UserWarning, match="re-registered"):
        registry.register_mode(_mode("t_rr_same", "v2"))
    assert _tag("t_rr_same") == "v2"


def test_replace_true_is_quiet_and_works_as_decorator(cleanup):
    registry = Registry("nb_replace")
    cleanup.append((registry, "t_rr_replace"))
    registry.register_mode(_mode("t_rr_replace", "v1"))
    v2 = _mode("t_rr_replace", "v2", qualname="OtherName")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.register_mode(replace=True)(v2) is v2
    assert _tag("t_rr_replace") == "v2" and type(registry["t_rr_replace"]) is v2


def test_a_different_class_under_a_taken_name_says_what_to_do(cleanup, monkeypatch):
    monkeypatch.delattr(sys, "ps1", raising=False)
    monkeypatch.setattr(sys, "flags", type("F", (), {"interactive": 0})())
    registry = Registry("nb_clash")
    cleanup.append((registry, "t_rr_clash"))
    registry.register_mode(_mode("t_rr_clash", "v1"))
    with pytest.raises(ValueError, match=(
            r"^Mode t_rr_clash already registered in registry 'nb_clash' by __main__\.SwapRelu, not "
            r"__main__\.Other: call registry\.remove_mode\('t_rr_clash'\) first, or register with "
            r"@registry\.register_mode\(replace=True\)\.$")):
        registry.register_mode(_mode("t_rr_clash", "v2", qualname="Other"))
    assert _tag("t_rr_clash") == "v1"
    same = type(registry["t_rr_clash"])
    with pytest.raises(ValueError, match=r"^Mode t_rr_clash already registered in registry 'nb_clash' \(by this "
                       r"same class __main__\.SwapRelu\): call registry\.remove_mode\('t_rr_clash'\) first"):
        registry.register_mode(same)
    registry.remove_mode("t_rr_clash")
    registry.register_mode(_mode("t_rr_clash", "v3", qualname="Other"))
    assert _tag("t_rr_clash") == "v3"


def test_another_registry_reuses_with_a_warning_outside_interactive_sessions(cleanup, monkeypatch):
    monkeypatch.delattr(sys, "ps1", raising=False)
    monkeypatch.setattr(sys, "flags", type("F", (), {"interactive": 0})())
    first, second = Registry("nb_first"), Registry("nb_second")
    cleanup.extend([(first, "t_rr_two"), (second, "t_rr_two")])
    first.register_mode(_mode("t_rr_two", "v1"))
    with pytest.warns(UserWarning, match=r"^Mode t_rr_two is already registered by __main__\.SwapRelu in another "
                      r"registry; that descriptor is used, not __main__\.Else \(nvidia-modelopt's rule\)\. Pass "
                      r"register_mode\(replace=True\)"):
        second.register_mode(_mode("t_rr_two", "v2", qualname="Else"))
    assert second["t_rr_two"] is first["t_rr_two"] and _tag("t_rr_two") == "v1"


def test_the_same_class_in_two_registries_is_one_instance_without_warning(cleanup):
    first, second = Registry("nb_one_a"), Registry("nb_one_b")
    cleanup.extend([(first, "t_rr_one"), (second, "t_rr_one")])
    cls = _mode("t_rr_one", "v1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first.register_mode(cls)
        second.register_mode(cls)
    assert first["t_rr_one"] is second["t_rr_one"]


def test_interactive_session_replaces_a_renamed_class(cleanup, monkeypatch):
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    registry = Registry("nb_interactive")
    cleanup.append((registry, "t_rr_inter"))
    registry.register_mode(_mode("t_rr_inter", "v1"))
    with pytest.warns(UserWarning, match=r"^Mode t_rr_inter re-registered \(from an interactive session\)"):
        registry.register_mode(_mode("t_rr_inter", "v2", qualname="SwapReluV2"))
    assert _tag("t_rr_inter") == "v2"
