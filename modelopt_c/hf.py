"""Hugging Face transformers models: the modelopt state beside ``save_pretrained``'s weights.

Compatible with nvidia-modelopt's plugin (``modelopt.torch.opt.plugins.huggingface``): the
same file (``modelopt_state.pth``, a ``torch.save`` of ``modelopt_state(model)``, beside the
weights), the same switch (``enable_huggingface_checkpointing()``), the same opt-out
(``save_pretrained(..., save_modelopt_state=False)``), so folders written by either load
through the other.  Differences: the state file is read with modelopt_c's safe loader
(weights_only, no pickle code) and written crash-safely; ``restore(model, folder)`` also
takes such a folder (``restore_folder``).

transformers is imported only when the switch is turned on or a folder is restored.
"""

from __future__ import annotations

import json
import os
import threading
import types
from typing import Any

import torch.nn as nn

from . import _conversion, _runtime
from .checkpoint import (
    CheckpointError,
    describe_file,
    load_modelopt_state,
    map_tensors,
    placement,
    restore_weights,
    save_torch_file,
    torch_load_checked,
)

__all__ = [
    "STATE_FILE",
    "disable_huggingface_checkpointing",
    "enable_huggingface_checkpointing",
    "is_pretrained_folder",
    "restore_folder",
]

STATE_FILE = "modelopt_state.pth"  # nvidia-modelopt's name for it
CONFIG_FILE = "config.json"
# save_pretrained's weight files, in the order transformers prefers them
_WEIGHT_FILES = (
    ("model.safetensors.index.json", True),
    ("model.safetensors", False),
    ("pytorch_model.bin.index.json", True),
    ("pytorch_model.bin", False),
)
# The cache both plugins keep on a patched class: method name -> transformers' original.
# nvidia-modelopt's enable_huggingface_checkpointing() leaves a class that has one alone,
# so after ours it patches nothing (and ours, after its, calls the originals it kept).
_CACHE = "_modelopt_cache"
_PATCHED = ("from_pretrained", "_from_config", "save_pretrained")
_lock = threading.RLock()  # a model built inside from_pretrained may call from_pretrained itself


def is_pretrained_folder(path: Any) -> bool:
    """Whether ``path`` is a folder written by ``save_pretrained``: it holds ``config.json``
    or ``modelopt_state.pth`` (nothing else is looked at)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return False
    return any(os.path.isfile(os.path.join(path, name)) for name in (CONFIG_FILE, STATE_FILE))


# ---- the switch ----------------------------------------------------------------------------


def _state_path(name_or_path: Any) -> str | None:
    """The modelopt state file of a pretrained model: a folder's, or one in the local hub
    cache (no download); None when there is none."""
    if name_or_path is None:
        return None
    name = os.fspath(name_or_path) if isinstance(name_or_path, os.PathLike) else name_or_path
    if not isinstance(name, str) or not name:
        return None
    if os.path.isdir(name):
        path = os.path.join(name, STATE_FILE)
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, STATE_FILE)
    except Exception:  # noqa: BLE001 - not a repo id, or no hub package: no state to restore
        return None
    return found if isinstance(found, str) and os.path.isfile(found) else None


class _RestoreAfterInit:
    """While active, ``cls.__init__`` replays ``state`` on the model it has just built
    (before transformers loads the weights into it, as nvidia-modelopt's plugin does)."""

    def __init__(self, cls: type, state: dict[str, Any]) -> None:
        self.cls, self.state, self.depth = cls, state, 0

    def __enter__(self) -> None:
        cls = self.cls
        self.own = "__init__" in cls.__dict__
        original = cls.__init__
        outer = self

        def __init__(model: nn.Module, *args: Any, **kwargs: Any) -> None:
            outer.depth += 1
            try:
                original(model, *args, **kwargs)
            finally:
                outer.depth -= 1
            if outer.depth == 0:  # the model itself, not a submodule of the same class
                _conversion._restore_from_state(model, outer.state)

        self.original = original
        cls.__init__ = __init__

    def __exit__(self, *exc: Any) -> None:
        if self.own:
            self.cls.__init__ = self.original
        else:
            del self.cls.__init__


def _original(cls: type, name: str) -> Any:
    return getattr(cls, _CACHE)[name]


def _from_pretrained(cls: type, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
    """``from_pretrained``, then the modelopt state of ``modelopt_state.pth`` when there is one."""
    call = types.MethodType(_original(cls, "from_pretrained").__func__, cls)
    path = _state_path(pretrained_model_name_or_path)
    if path is None:
        return call(pretrained_model_name_or_path, *args, **kwargs)
    state = load_modelopt_state(path)
    with _lock, _RestoreAfterInit(cls, state):
        return call(pretrained_model_name_or_path, *args, **kwargs)


def _from_config(cls: type, config: Any, **kwargs: Any) -> Any:
    """``_from_config`` (``AutoModel.from_config``), with the state of the config's folder."""
    call = types.MethodType(_original(cls, "_from_config").__func__, cls)
    path = _state_path(getattr(config, "_name_or_path", None))
    if path is None:
        return call(config, **kwargs)
    state = load_modelopt_state(path)
    with _lock, _RestoreAfterInit(cls, state):
        return call(config, **kwargs)


def _save_pretrained(self: nn.Module, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained``, then ``modelopt_state.pth`` beside the weights (crash-safe) when the
    model is converted; ``save_modelopt_state=False`` leaves it out."""
    save_state = kwargs.pop("save_modelopt_state", True)
    if save_state and getattr(self, "_tp_size", None) is not None and _conversion.ModeloptStateManager.is_converted(self):
        raise NotImplementedError(
            "save_pretrained of a tensor-parallel (tp_plan) model with a modelopt state is not supported: "
            "gather the model first, or pass save_modelopt_state=False and save the state yourself."
        )
    outputs = _original(type(self), "save_pretrained")(self, save_directory, *args, **kwargs)
    is_main = kwargs.get("is_main_process", args[0] if args else True)
    if save_state and is_main and _conversion.ModeloptStateManager.is_converted(self):
        save_torch_file(os.path.join(os.fspath(save_directory), STATE_FILE), _conversion.modelopt_state(self))
    return outputs


_from_pretrained_cm = classmethod(_from_pretrained)
_from_config_cm = classmethod(_from_config)
_OURS = {"from_pretrained": _from_pretrained_cm, "_from_config": _from_config_cm, "save_pretrained": _save_pretrained}


def enable_huggingface_checkpointing() -> None:
    """Save and restore the modelopt state with transformers' own checkpointing (idempotent).

    After it, ``model.save_pretrained(folder)`` also writes ``folder/modelopt_state.pth``
    (when the model has modes applied; ``save_modelopt_state=False`` opts out), and
    ``cls.from_pretrained(folder)`` / ``AutoModel.from_config(config)`` replay that state
    on the freshly built model before transformers loads the weights, which then include
    the modes' tensors (quantizer amax, ...).  Sharded checkpoints, ``low_cpu_mem_usage``
    and ``device_map`` are transformers' own and unchanged.  The same file and switch as
    nvidia-modelopt's, which this one replaces when both are turned on (in any order).
    """
    from transformers import PreTrainedModel

    _patch(PreTrainedModel)


def _patch(cls: type) -> None:
    with _lock:
        cache = cls.__dict__.get(_CACHE)
        if cache is None:
            cache = {name: getattr(cls, name) for name in _PATCHED}
            setattr(cls, _CACHE, cache)
        for name in _PATCHED:
            cache.setdefault(name, getattr(cls, name))
            setattr(cls, name, _OURS[name])


def disable_huggingface_checkpointing() -> None:
    """Undo ``enable_huggingface_checkpointing`` (and nvidia-modelopt's, which shares its
    cache): transformers' own methods again."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return
    with _lock:
        cache = PreTrainedModel.__dict__.get(_CACHE)
        if cache is None:
            return
        for name, method in cache.items():
            if isinstance(method, types.MethodType):  # a classmethod, bound when it was cached
                method = classmethod(method.__func__)
            setattr(PreTrainedModel, name, method)
        delattr(PreTrainedModel, _CACHE)


# ---- restore(model, folder) ------------------------------------------------------------------


def _shard_names(index_path: str, where: str) -> list[str]:
    """The shard files an index JSON lists, checked to be plain names in its folder."""
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: {os.path.basename(index_path)} is not readable JSON ({exc}).") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{where}: {os.path.basename(index_path)} has no \"weight_map\" of key -> shard file.")
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:
        if not name or os.path.basename(name) != name or name in (".", ".."):
            raise CheckpointError(
                f"{where}: {os.path.basename(index_path)} names the shard {name!r}, which is not a file name in "
                "the folder."
            )
    return names


def _read_weights(folder: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(the state dict of a save_pretrained folder (one file or the shards of an index), device).

    ``map_location`` as restore's (checkpoint.load_for_restore): a device other than the
    CPU is returned, the weights left on the CPU for restore to copy in (or place, for
    a meta model's); a function places each tensor now; the torch format's dict and None
    go to torch.load."""
    where = describe_file(folder)
    verify = kwargs.pop("verify", True)
    for name, is_index in _WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        files = [os.path.join(folder, n) for n in _shard_names(path, where)] if is_index else [path]
        kind = "safetensors" if name.startswith("model.safetensors") else "torch"
        restore, target = placement(kind, kwargs, where)
        load_kwargs = dict(kwargs, map_location="cpu") if target is not None else kwargs
        weights: dict[str, Any] = {}
        for file in files:
            if name.startswith("model.safetensors"):
                metadata, tensors = _conversion.st_read(file, verify=verify, _verify_if_present=True)
                from . import st_format

                if metadata.get("format") == st_format.FORMAT_NAME:
                    _, tensors = st_format.split_tensors(tensors, file)
                    st_format.add_aliases(metadata, tensors, file)
            else:
                tensors = torch_load_checked(file, load_kwargs)
                if not isinstance(tensors, dict):
                    raise CheckpointError(f"{describe_file(file)}: not a state dict ({type(tensors).__name__}).")
            weights.update(tensors)
        if restore is not None and target is None:  # a function: each tensor placed where it says
            return map_tensors(weights, restore), None
        return weights, target if target is not None and target.type != "cpu" else None
    raise CheckpointError(
        f"{where} has no weights that save_pretrained writes ({', '.join(n for n, _ in _WEIGHT_FILES)}): "
        "restore takes a complete save_pretrained folder."
    )


def _declared_ties(model: nn.Module) -> dict[str, str]:
    """transformers' tied keys of ``model`` (target -> source), from ``all_tied_weights_keys``."""
    ties = getattr(model, "all_tied_weights_keys", None)
    if not isinstance(ties, dict):
        ties = getattr(model, "_tied_weights_keys", None)
    if not isinstance(ties, dict):
        return {}
    return {k: v for k, v in ties.items() if isinstance(k, str) and isinstance(v, str)}


def _add_tied(model: nn.Module, weights: dict[str, Any]) -> None:
    """save_pretrained stores a tied tensor once (lm_head.weight is the embedding): give the
    left-out keys the tensor they are tied to, by the model's own ties and transformers'."""
    groups: dict[int, list[str]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(key)
    for keys in groups.values():
        present = next((k for k in keys if k in weights), None)
        if present is not None:
            for key in keys:
                weights.setdefault(key, weights[present])
    for target, source in _declared_ties(model).items():
        if target not in weights and source in weights:
            weights[target] = weights[source]


def restore_folder(model: Any, folder: Any, **kwargs: Any) -> nn.Module:
    """``restore(model, folder)`` for a folder written by ``save_pretrained`` (ours or
    nvidia-modelopt's): replay ``modelopt_state.pth`` on ``model``, then load the folder's
    weights (``model.safetensors``, sharded with its index JSON, or ``pytorch_model.bin``)
    into it, as one transaction.  Tied weights that save_pretrained leaves out come from
    the tensor they are tied to.  Options as ``restore``'s (``map_location``, ``verify``,
    ``on_meta``)."""
    folder = os.fspath(folder)
    where = describe_file(folder)
    state_path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(state_path):
        raise CheckpointError(
            f"{where} is a save_pretrained folder without {STATE_FILE}: it holds no modelopt state (the model "
            "was not converted, or was saved with save_modelopt_state=False). Load it with from_pretrained, "
            "or restore a checkpoint written by save()."
        )
    on_meta = kwargs.pop("on_meta", "raise")
    if on_meta not in ("raise", "warn"):
        raise ValueError(f"on_meta must be 'raise' or 'warn', not {on_meta!r}.")
    model = _runtime.unwrap(_runtime.as_module(model), "raise")
    kwargs = dict(kwargs)
    state = load_modelopt_state(state_path, **{k: v for k, v in kwargs.items() if k == "map_location"})
    weights, device = _read_weights(folder, kwargs)
    _add_tied(model, weights)
    return restore_weights(model, state, weights, where, on_meta, device=device)
