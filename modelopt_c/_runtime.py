"""The Python glue the native core calls: registries, model-likes, wrappers, versions,
torch I/O.  Nothing here is public; each function is small and does one thing the C
core should not hard-code (it depends on Python-level classes users can extend)."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.nn as nn

from . import interop
from .mode import ModeDescriptor, _ModeRegistryCls, get_mode_config
from .model_like import ModelLikeModule

MODELOPT_STATE_VERSION = "0.47.0"

get_from_any = _ModeRegistryCls.get_from_any
get_registry_by_name = _ModeRegistryCls.get_registry_by_name
__all__ = ["get_from_any", "get_mode_config", "get_registry_by_name"]


def state_version() -> str:
    """Version recorded in new state: the installed nvidia-modelopt's, else ours."""
    return interop.installed_version() or MODELOPT_STATE_VERSION


def is_model_like(model: Any) -> bool:
    """Whether ``model`` is a ModelLikeModule holder (ours or nvidia-modelopt's)."""
    if isinstance(model, ModelLikeModule):
        return True
    return type(model).__name__ == "ModelLikeModule" and hasattr(model, "init_modellike")


def as_module(model: Any) -> nn.Module:
    """``model`` itself when it is an nn.Module, else a holder of its recipe."""
    return model if isinstance(model, nn.Module) else ModelLikeModule(model)


def prepare_model_for(model: nn.Module, descriptor: ModeDescriptor) -> nn.Module:
    """Hand a mode what it wants: the holder when it requires a model-like, else the model."""
    if descriptor.require_model_like:
        holder_cls = interop.model_like_class_for(descriptor) or ModelLikeModule
        if is_model_like(model) and not isinstance(model, holder_cls):
            # a nvidia-modelopt mode checks for its own holder class: re-home the recipe
            foreign = holder_cls(model.modellike)
            from . import ModeloptStateManager

            ModeloptStateManager.transfer_state_dict(model, foreign)
            model = foreign
        assert isinstance(model, holder_cls), "Model must be a ModelLikeModule!"
        return model
    if is_model_like(model):
        return model.init_modellike()
    return model


def _wrappers() -> dict[type, str]:
    wrappers: dict[type, str] = {nn.DataParallel: "module", nn.parallel.DistributedDataParallel: "module"}
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrappers[FullyShardedDataParallel] = "module"
    except Exception:  # torch built without distributed
        pass
    return wrappers


def unwrap(model: nn.Module, how: str) -> nn.Module:
    """Strip a DataParallel/DDP/FSDP wrapper: ``how`` is "force", "warn" or "raise"."""
    attr = _wrappers().get(type(model))
    if attr is None:
        return model
    if how == "raise":
        raise ValueError(
            f"Model of type {type(model).__name__} is wrapped; restore into the unwrapped "
            "model first, then wrap it (restore does not support wrapped models)."
        )
    if how == "warn":
        warnings.warn(f"Model of type {type(model).__name__} is wrapped; unwrapping it to save.", stacklevel=3)
    return getattr(model, attr)


def validate_modelopt_state(state: Any) -> None:
    """Check that ``state`` has the layout of ``modelopt_state(model)``."""
    if not isinstance(state, dict):
        raise TypeError(f"Invalid modelopt state file: expected a dict, got {type(state).__name__}.")
    if "modelopt_state" in state and "modelopt_state_dict" not in state:
        raise ValueError(
            "Invalid modelopt state file: the file appears to be a full checkpoint saved via "
            "``mto.save()`` (contains 'modelopt_state' and 'model_state_dict' keys). Use "
            "``mto.restore()`` to load a full checkpoint, or pass only the inner modelopt state dict."
        )
    required = ("modelopt_state_dict", "modelopt_version")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(
            f"Invalid modelopt state file: missing required key(s) {missing}. Expected keys: {list(required)}."
        )
    if not isinstance(state["modelopt_state_dict"], list):
        raise TypeError(
            "Invalid modelopt state file: 'modelopt_state_dict' must be a list, got "
            f"{type(state['modelopt_state_dict']).__name__}."
        )
    if not isinstance(state["modelopt_version"], str):
        raise TypeError(
            "Invalid modelopt state file: 'modelopt_version' must be a str, got "
            f"{type(state['modelopt_version']).__name__}."
        )


def describe_file(f: Any) -> str:
    """A file's name for error messages."""
    if isinstance(f, (str, os.PathLike)):
        return repr(os.fspath(f))
    return repr(getattr(f, "name", f"<{type(f).__name__}>"))


def torch_load(f: Any, kwargs: dict[str, Any]) -> Any:
    """``torch.load`` with safe defaults: CPU, ``weights_only=True``, mmap for paths."""
    kwargs = dict(kwargs)
    kwargs.setdefault("map_location", "cpu")
    kwargs.setdefault("weights_only", True)
    if isinstance(f, (str, os.PathLike)):
        kwargs.setdefault("mmap", True)
    return torch.load(f, **kwargs)
