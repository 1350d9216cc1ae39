"""The callbacks of the native core: the few things it asks Python for.

Each depends on Python-level classes users extend (modes, registries, configs,
model-likes, wrappers) or on torch-module introspection (the load plan); the C core
calls them by name (csrc/module.c runtime_call) and nothing else in the package.
Nothing here touches files: that is checkpoint.py, which calls the core, never the
other way (docs/ARCHITECTURE.md lists the callbacks and why each is one).  Not public."""

from __future__ import annotations

import contextvars
import sys
import warnings
from typing import Any

import torch
import torch.nn as nn

from . import _conversion, interop
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


def _wrapper_attr(model: nn.Module) -> str | None:
    """The attribute holding the wrapped model, when ``model`` is a supported wrapper."""
    cls = type(model)
    if cls is nn.DataParallel or cls is nn.parallel.DistributedDataParallel:
        return "module"
    # a model wrapped by FSDP means FSDP is imported already: never import it here (~1 s)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and cls is getattr(fsdp, "FullyShardedDataParallel", None):
        return "module"
    return None


def unwrap(model: nn.Module, how: str) -> nn.Module:
    """Strip a DataParallel/DDP/FSDP wrapper: ``how`` is "force", "warn" or "raise"."""
    attr = _wrapper_attr(model)
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


# What makes a module's state dict differ from its live tensors (save side), or its
# loading differ from copying into them (load side).  Checked on the class, so a
# module counts however deep in the hierarchy the override sits.
_SAVE_METHODS = ("state_dict", "_save_to_state_dict")
_LOAD_METHODS = ("load_state_dict", "_load_from_state_dict", "get_extra_state", "set_extra_state")
_SAVE_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks")
_LOAD_HOOKS = ("_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _class_overrides(cls: type, cache: dict[type, tuple[bool, bool]]) -> tuple[bool, bool]:
    """(save side overridden, load side overridden) for a module class.

    ``cache`` lives for one walk only: a class patched later (or a dynamic class that
    goes away) is never judged from a stale entry.
    """
    known = cache.get(cls)
    if known is None:
        save = any(getattr(cls, m) is not getattr(nn.Module, m) for m in _SAVE_METHODS)
        load = any(getattr(cls, m) is not getattr(nn.Module, m) for m in _LOAD_METHODS)
        known = cache[cls] = (save, load)
    return known


def _own_loading(module: nn.Module, cache: dict | None = None) -> tuple[bool, bool]:
    """(state dict may not be the live tensors, loading is not torch's plain copy)."""
    save, load = _class_overrides(type(module), {} if cache is None else cache)
    d = module.__dict__
    # hooks (non-empty tables), or the methods themselves set on the instance.  Runs once
    # per module of every restore: no generator expressions (they were half its time).
    if not save:
        save = any(map(d.get, _SAVE_HOOKS)) or not d.keys().isdisjoint(_SAVE_METHODS)
    if not load:
        load = any(map(d.get, _LOAD_HOOKS)) or not d.keys().isdisjoint(_LOAD_METHODS)
    return save, load


def _has_own_loading(module: nn.Module) -> bool:
    """Whether ``module`` (itself, not its children) saves or loads other than torch's plain way.

    State-dict hooks or an overridden ``state_dict`` can return clones (nvidia-modelopt's
    tied NVFP4 quantizers do): copying into those would land in throw-away tensors.
    """
    save, load = _own_loading(module)
    return save or load


def _live_targets(model: nn.Module, meta: list | None = None) -> tuple[dict[str, Any], bool, bool]:
    """(the live tensors torch's load_state_dict copies into, by key; whether every module
    is plain; whether the loading side is torch's own everywhere, so the keys are known).

    Mirrors ``nn.Module._load_from_state_dict``: non-None parameters, then persistent
    non-None buffers, module by module in ``_modules`` order (shared modules repeat, as
    in ``state_dict``).  Nothing is cloned.  ``meta``, when given, also gets the key of
    every parameter and buffer (non-persistent ones too) on the meta device, from the same walk.
    """
    targets: dict[str, Any] = {}
    plain = checkable = True
    stack = [("", model)]
    cache: dict[type, tuple[bool, bool]] = {}
    while stack:
        prefix, module = stack.pop()
        save, load = _own_loading(module, cache)
        if save:
            plain = False
        if load:
            plain = checkable = False
        for name, p in module._parameters.items():
            if p is not None:
                targets[prefix + name] = p
                if meta is not None and p.is_meta:
                    meta.append(prefix + name)
        skip = module._non_persistent_buffers_set
        for name, b in module._buffers.items():
            if b is not None and name not in skip:
                targets[prefix + name] = b
            if b is not None and meta is not None and b.is_meta:
                meta.append(prefix + name)
        children = [(prefix + name + ".", child) for name, child in module._modules.items() if child is not None]
        stack.extend(reversed(children))
    return targets, plain, checkable


def plain_load_targets(model: nn.Module) -> dict | None:
    """The model's live tensors by state-dict key, or None when some module saves or loads itself."""
    targets, plain, _ = _live_targets(model)
    return targets if plain else None


_QUANTIZED = frozenset(
    d for d in (getattr(torch, n, None) for n in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4")) if d is not None
)
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)
# how each tensor is loaded (the C loop reads these)
COPY_BRIDGE, COPY_TORCH, ASSIGN = 0, 1, 2


def _quote(key: Any) -> str:
    return f'"{key}"' if isinstance(key, str) else repr(key)


def _kind_problem(key: str, dst: Any, src: Any) -> tuple[str | None, int]:
    """(what makes ``src`` unloadable into ``dst``, or None; how to load it)."""
    if not isinstance(src, torch.Tensor):
        return f"{key} in the checkpoint is a {type(src).__name__}, not a tensor.", 0
    if src.shape != dst.shape:
        return (
            f"size mismatch for {key}: copying a param with shape {src.shape} from checkpoint, "
            f"the shape in current model is {dst.shape}.",
            0,
        )
    s_layout, d_layout = src.layout, dst.layout
    if s_layout is not d_layout:
        return f"layout mismatch for {key}: the checkpoint's tensor is {s_layout}, the model's is {d_layout}.", 0
    s_dtype, d_dtype = src.dtype, dst.dtype
    if s_dtype is not d_dtype:
        if s_dtype in _QUANTIZED or d_dtype in _QUANTIZED:
            return (
                f"dtype mismatch for {key}: the checkpoint's tensor is {s_dtype}, the model's is {d_dtype} "
                "(quantized tensors load only into quantized tensors of the same dtype).",
                0,
            )
        if s_dtype.is_complex and not d_dtype.is_complex:
            return (
                f"dtype mismatch for {key}: the checkpoint's tensor is {s_dtype}, the model's is {d_dtype} "
                "(casting complex to real would discard the imaginary part).",
                0,
            )
    d_meta = dst.is_meta
    if src.is_meta and not d_meta:
        return f"{key} is on the meta device in the checkpoint (it holds no data).", 0
    if d_meta:
        return None, ASSIGN
    if (
        s_layout is not torch.strided
        or s_dtype in _QUANTIZED
        or src.is_neg()
        or src.is_conj()
        or dst.is_neg()
        or dst.is_conj()
    ):
        # DLPack cannot carry these (or drops the negative/conjugate bit): torch's copy_
        return None, COPY_TORCH
    return None, COPY_BRIDGE


def _subclass_error(bad: list[tuple[str, str, type]], source: str) -> TypeError:
    what = "; ".join(f"{_quote(k)} is a {t.__module__}.{t.__qualname__} in the {side}" for k, side, t in bad)
    return TypeError(
        f"checkpoint {source}: restore loads plain tensors only, and {what}. Tensor "
        "subclasses (DTensor, FSDP2 shards, ...) are not supported yet: restore into the unsharded "
        "model and shard it afterwards, or save the full tensors (DTensor.full_tensor()). Nothing was loaded."
    )


def check_weights(model: nn.Module, targets: dict, state_dict: Any, source: str) -> list[tuple[str, Any, Any, int]]:
    """Every key, shape, dtype and kind checked before anything is copied.

    Returns the copies to make as (key, model tensor, file tensor, how); raises
    RuntimeError in torch's ``load_state_dict`` wording naming every offending key (and
    the file), or TypeError for tensor subclasses, which must never reach DLPack.
    ``source`` is the file's name as messages show it (checkpoint.describe_file).
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"{source}: model_state_dict is a {type(state_dict).__name__}, not a dict")
    unexpected = [k for k in state_dict if not isinstance(k, str) or k not in targets]
    missing = [k for k in targets if k not in state_dict]
    parts = []  # torch's order: missing, unexpected, then per-key problems
    if missing:
        parts.append(f"Missing key(s) in state_dict: {', '.join(map(_quote, missing))}. ")
    if unexpected:
        parts.append(f"Unexpected key(s) in state_dict: {', '.join(map(_quote, unexpected))}. ")
    plan = []
    subclasses = []
    for key, dst in targets.items():
        if key not in state_dict:
            continue
        src = state_dict[key]
        if type(dst) not in _PLAIN_TENSORS:
            subclasses.append((key, "model", type(dst)))
        if isinstance(src, torch.Tensor) and type(src) not in _PLAIN_TENSORS:
            subclasses.append((key, "checkpoint", type(src)))
        if subclasses:
            continue
        problem, how = _kind_problem(key, dst, src)
        if problem is not None:
            parts.append(problem)
        else:
            plan.append((key, dst, src, how))
    if subclasses:
        raise _subclass_error(subclasses, source)
    if parts:
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(model).__name__}:\n\t"
            + "\n\t".join(parts)
            + f"\n(checkpoint {source}: it was saved from a different architecture or with "
            "different modes; nothing was copied into the weights)"
        )
    return plan


# Non-persistent buffers travel in the weights under this prefix (the safetensors-compatible
# format stores them there: docs/FORMAT.md); restore gives them to a meta-device model.
BUFFER_PREFIX = "__modelopt_buffer__."
# What restore does about tensors a load would leave on the meta device: "raise" or "warn"
# (checkpoint.restore's ``on_meta=`` option, set for the duration of one restore).
ON_META: contextvars.ContextVar[str] = contextvars.ContextVar("modelopt_c_on_meta", default="raise")
# Where the tensors restore assigns (a meta model's) are placed: the device map_location
# names when the weights were left on the CPU (checkpoint.load_for_restore), else None.
ASSIGN_DEVICE: contextvars.ContextVar[Any] = contextvars.ContextVar("modelopt_c_assign_device", default=None)
_SHOWN = 5  # names listed in messages before "... (N in all)"


def split_buffers(state_dict: Any) -> tuple[Any, dict[str, Any]]:
    """(the state dict without the ``BUFFER_PREFIX`` entries, {buffer key: tensor})."""
    if not isinstance(state_dict, dict) or not any(
        isinstance(k, str) and k.startswith(BUFFER_PREFIX) for k in state_dict
    ):
        return state_dict, {}
    weights: dict[str, Any] = {}
    buffers: dict[str, Any] = {}
    for key, value in state_dict.items():
        if isinstance(key, str) and key.startswith(BUFFER_PREFIX):
            buffers[key[len(BUFFER_PREFIX):]] = value
        else:
            weights[key] = value
    return weights, buffers


def _slots(model: nn.Module) -> dict[str, tuple[nn.Module, str, Any]]:
    """Every parameter and buffer slot (non-persistent buffers too): key -> (owner, name, tensor).

    Shared modules repeat under each of their paths, as in ``state_dict``.
    """
    slots: dict[str, tuple[nn.Module, str, Any]] = {}
    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None:
                    slots[prefix + name] = (module, name, t)
        children = [(prefix + name + ".", child) for name, child in module._modules.items() if child is not None]
        stack.extend(reversed(children))
    return slots


def _tied(slots: dict[str, tuple[nn.Module, str, Any]]) -> dict[int, list[str]]:
    """id(tensor) -> every slot key holding that very tensor object (tied weights), in order."""
    groups: dict[int, list[str]] = {}
    for key, (_, _, t) in slots.items():
        groups.setdefault(id(t), []).append(key)
    return groups


def non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's non-persistent buffers by key (none of them is in ``state_dict``)."""
    found: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        dot = prefix + "." if prefix else ""
        for name in module._non_persistent_buffers_set:
            t = module._buffers.get(name)
            if t is not None:
                found[dot + name] = t
    return found


def _buffer_plan(model: nn.Module, slots: dict, buffers: dict[str, Any], source: str) -> list:
    """ASSIGN entries for the file's non-persistent buffers that the model has on meta.

    A buffer the model holds with data keeps the model's own value (non-persistent
    buffers are computed by the model itself); one the model does not have is ignored.
    """
    plan = []
    for key, src in buffers.items():
        slot = slots.get(key)
        if slot is None or not isinstance(src, torch.Tensor):
            continue
        owner, name, dst = slot
        if name not in owner._non_persistent_buffers_set or not dst.is_meta:
            continue
        if src.shape != dst.shape:
            raise RuntimeError(
                f"size mismatch for non-persistent buffer {key}: the checkpoint's has shape {src.shape}, the "
                f"model's {dst.shape} (checkpoint {source}: saved from a different architecture; nothing was loaded)"
            )
        plan.append((key, dst, src if src.dtype == dst.dtype else src.to(dst.dtype), ASSIGN))
    return plan


def _meta_message(source: str, names: list[str], loaded: bool) -> str:
    shown = ", ".join(names[:_SHOWN]) + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")
    verb = "are" if loaded else "would be"
    head = f"checkpoint {source}: {len(names)} tensor(s) of the model {verb} left on the meta device (no data): {shown}."
    why = (
        " The checkpoint does not hold them: non-persistent buffers (e.g. a rotary embedding's inv_freq) are in "
        "no state dict, and the torch format does not carry them. Build the model under "
        "accelerate.init_empty_weights() (parameters on meta, buffers kept), or save in the .safetensors format "
        "(which stores non-persistent buffers)"
    )
    if loaded:
        return head + why + "; the model cannot run until they are set."
    return head + why + ", or pass on_meta='warn' to restore() to load anyway. Nothing was loaded."


def _report_meta(source: str, names: list[str]) -> None:
    """Raise (the restore is then rolled back), or warn with on_meta='warn', about tensors left on meta."""
    if not names:
        return
    if ON_META.get() == "warn":
        warnings.warn(_meta_message(source, names, True), stacklevel=2)
        return
    raise _conversion.CheckpointError(_meta_message(source, names, False))


def _memory(t: Any) -> tuple | None:
    """Two tensors with the same value here are one tensor of the file (stored once, tied)."""
    if not isinstance(t, torch.Tensor) or t.is_meta or t.numel() == 0 or t.layout is not torch.strided:
        return None
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


def _tie_assigns(plan: list, groups: dict[int, list[str]]) -> list:
    """Tied slots get one tensor: an ASSIGN entry carries the tuple of every key to fill
    (``assign_tensor`` gives them all the one new tensor), and the others go.

    Tied means held by one tensor in the model (``groups``), or stored as one tensor in
    the file (the torch format shares storage, ours lists aliases): a skeleton built
    under ``accelerate.init_empty_weights()`` has its ties broken until loading, and the
    file says what was tied when it was saved."""
    out: list = []
    by_dst: dict[int, int] = {}  # id(model tensor) -> index in out
    by_src: dict[tuple, int] = {}  # the file tensor's memory -> index in out
    for key, dst, src, how in plan:
        if how != ASSIGN:
            out.append((key, dst, src, how))
            continue
        if id(dst) in by_dst:
            continue
        keys = list(groups.get(id(dst), [key]))
        mem = _memory(src)
        at = by_src.get(mem) if mem is not None else None
        if at is not None:
            out[at][0].extend(k for k in keys if k not in out[at][0])
            by_dst[id(dst)] = at
            continue
        by_dst[id(dst)] = len(out)
        if mem is not None:
            by_src[mem] = len(out)
        out.append((keys, dst, src, how))
    return [(k if h != ASSIGN else tuple(k) if len(k) > 1 else k[0], d, t, h) for k, d, t, h in out]


def _retie(model: nn.Module, groups: dict[int, list[str]], was_meta: set[str]) -> None:
    """After torch's assign-loading (which replaces each slot on its own), tie again: every
    group of slots that held one tensor, and the slots that were on meta and got one tensor
    of the file, hold one tensor object (the first slot's)."""
    slots = _slots(model)
    merged: list[list[str]] = [keys for keys in groups.values() if len(keys) > 1]
    by_mem: dict[tuple, list[str]] = {}
    for key in was_meta:
        mem = _memory(slots[key][2]) if key in slots else None
        if mem is not None:
            by_mem.setdefault(mem, []).append(key)
    order = {k: i for i, k in enumerate(slots)}
    merged.extend(sorted(keys, key=order.__getitem__) for keys in by_mem.values() if len(keys) > 1)
    for keys in merged:
        present = [k for k in keys if k in slots]
        if len(present) < 2:
            continue
        first = slots[present[0]][2]
        for key in present[1:]:
            owner, name, t = slots[key]
            if t is not first:
                table = owner._parameters if name in owner._parameters else owner._buffers
                table[name] = first


def plan_load(model: nn.Module, state_dict: Any, source: str) -> list | None:
    """Check the file's weights against ``model``, then say how to load them.

    A model whose every module is plain gets the list of copies for the native loop.
    Otherwise the modules' own ``load_state_dict`` runs here (after the same checks,
    when no module customises the loading side) and None is returned.  Non-persistent
    buffers (``BUFFER_PREFIX`` keys) fill the model's meta ones; tied tensors stay tied;
    what would stay on meta raises first (``ON_META``).
    """
    state_dict, buffers = split_buffers(state_dict)
    meta_keys: list[str] = []
    targets, plain, checkable = _live_targets(model, meta_keys)
    # ties and buffers only matter where tensors are replaced rather than copied into: meta slots
    slots = _slots(model) if meta_keys else {}
    groups = _tied(slots) if meta_keys else {}
    if checkable:
        plan = check_weights(model, targets, state_dict, source)
        if plain:
            if not meta_keys:
                return plan
            plan += _buffer_plan(model, slots, buffers, source)
            filled = {id(dst) for _, dst, _, how in plan if how == ASSIGN}
            _report_meta(source, [k for k in meta_keys if id(slots[k][2]) not in filled])
            return _tie_assigns(plan, groups)
    load_state_dict_torch(model, state_dict, source)
    if meta_keys:
        _retie(model, groups, set(meta_keys))
        slots = _slots(model)
        for key, _, src, _ in _buffer_plan(model, slots, buffers, source):
            assign_tensor(model, key, src)
        _report_meta(source, [k for k, (_, _, t) in _slots(model).items() if t.is_meta])
    return None


def load_state_dict_torch(model: nn.Module, state_dict: dict, source: str) -> None:
    """torch's own loader, for modules with custom loading (in place; assign for meta)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"{source}: model_state_dict is a {type(state_dict).__name__}, not a dict")
    live = model.state_dict(keep_vars=True)
    on_meta = any(t.is_meta for t in live.values() if isinstance(t, torch.Tensor))
    device = ASSIGN_DEVICE.get()
    if on_meta and device is not None:  # what replaces a meta tensor goes to map_location's device
        moved: dict[int, Any] = {}  # one copy per file tensor: tied entries stay one tensor
        state_dict = dict(state_dict)
        for k, v in state_dict.items():
            if isinstance(v, torch.Tensor) and getattr(live.get(k), "is_meta", False):
                if id(v) not in moved:
                    moved[id(v)] = v.to(device)
                state_dict[k] = moved[id(v)]
    try:
        model.load_state_dict(state_dict, strict=True, assign=on_meta)
    except RuntimeError as exc:
        exc.add_note(f"checkpoint {source}")
        raise


def assign_tensor(model: nn.Module, key: Any, tensor: torch.Tensor) -> None:
    """Make ``tensor`` the model's parameter or buffer ``key`` (for meta-device models).

    ``key`` may be a tuple of keys: tied slots, which all get the one new tensor."""
    keys = key if isinstance(key, tuple) else (key,)
    device = ASSIGN_DEVICE.get()
    if device is not None and tensor.device != device:
        tensor = tensor.to(device)  # map_location's device: the one copy made of this tensor
    new = None
    for k in keys:
        prefix, _, name = k.rpartition(".")
        owner = model.get_submodule(prefix) if prefix else model
        if name in owner._parameters:
            if new is None:
                old = owner._parameters[name]
                new = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else True)
            owner._parameters[name] = new
        else:
            owner._buffers[name] = tensor if new is None else new
