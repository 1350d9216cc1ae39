"""The Python glue the native core calls: registries, model-likes, wrappers, versions,
torch I/O.  Nothing here is public; each function is small and does one thing the C
core should not hard-code (it depends on Python-level classes users can extend)."""

from __future__ import annotations

import os
import pickle
import sys
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
    """``torch.load`` with safe defaults: CPU, ``weights_only=True``, mmap for paths.

    A path is opened once, without blocking, and must be a regular file (a FIFO or a
    device would hang or never end); torch then reads that same open file through
    /proc/self/fd, so the file checked is the file loaded.  ``slice`` is allowed
    under weights_only (modes keep slices in their metadata).
    """
    kwargs = dict(kwargs)
    kwargs.setdefault("map_location", "cpu")
    kwargs.setdefault("weights_only", True)
    if not isinstance(f, (str, os.PathLike)):
        with _slice_allowed():
            return torch.load(f, **kwargs)
    fd = open_regular_file(f)
    try:
        if _first_bytes_fd(fd, 4) == _ZIP_MAGIC:
            kwargs.setdefault("mmap", True)  # only the zip format can be mapped (not legacy files)
        # torch.load also picks its reader by a ".safetensors" suffix; the neutral
        # /proc name hands it the bytes, whose format was already told apart
        name = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else os.fspath(f)
        with _slice_allowed():
            return torch.load(name, **kwargs)
    finally:
        os.close(fd)


class _slice_allowed:
    """Allow ``slice`` under weights_only for one load (and leave a user's own list as it was)."""

    def __enter__(self) -> None:
        self._ctx = None
        if slice not in torch.serialization.get_safe_globals():
            self._ctx = torch.serialization.safe_globals([slice])
            self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


_FILE_KINDS = (
    ("S_ISDIR", "is a folder"),
    ("S_ISFIFO", "is a FIFO"),
    ("S_ISCHR", "is a character device"),
    ("S_ISBLK", "is a block device"),
    ("S_ISSOCK", "is a socket"),
)


def open_regular_file(path: Any, what: str = "restore") -> int:
    """A read-only descriptor of ``path``, which must be a regular file.

    Opened with O_NONBLOCK (a FIFO without a writer would block the open itself),
    then checked with fstat: anything but a regular file is a CheckpointError naming
    it.  A missing file stays FileNotFoundError.
    """
    import stat

    name = describe_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except IsADirectoryError:  # some systems refuse to open a folder for reading
        raise CheckpointError(f"{name} is a folder: {what} takes a checkpoint file.") from None
    except (FileNotFoundError, PermissionError):
        raise
    except OSError as exc:
        # e.g. ENXIO: a socket, or a device with no driver
        raise CheckpointError(f"{name} cannot be opened as a checkpoint file: {exc.strerror or exc}.") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((text for test, text in _FILE_KINDS if getattr(stat, test)(mode)), "is not a regular file")
            if kind == "is a folder":
                raise CheckpointError(f"{name} is a folder: {what} takes a checkpoint file.")
            raise CheckpointError(f"{name} {kind}, not a regular file: {what} takes a checkpoint file.")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _first_bytes_fd(fd: int, n: int) -> bytes:
    return os.pread(fd, n, 0)


# ---- checkpoints -----------------------------------------------------------------

_ZIP_MAGIC = b"PK\x03\x04"
# torch's legacy (pre-1.6) format: a protocol-2 pickle of its magic number first
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


class CheckpointError(ValueError, RuntimeError):
    """A file that is not a readable checkpoint (not one, truncated, or corrupted).

    A ``ValueError`` (bad input) and, for code written against nvidia-modelopt
    (where ``torch.load`` raises ``RuntimeError``), a ``RuntimeError`` too.
    """


def checkpoint_format(f: Any, format: str | None) -> str:
    """"torch" or "safetensors": the explicit ``format``, else by the path's suffix."""
    if format is None:
        if isinstance(f, (str, os.PathLike)) and os.fspath(f).endswith(".safetensors"):
            return "safetensors"
        return "torch"
    if format not in ("torch", "safetensors"):
        raise ValueError(f"Unknown checkpoint format {format!r}: use 'torch' or 'safetensors'.")
    return format


def save_safetensors(f: Any, state_dict: dict, modelopt_state: dict, kwargs: dict) -> None:
    """Write the safetensors-compatible format (paths only: it is staged and renamed)."""
    if not isinstance(f, (str, os.PathLike)):
        raise TypeError("format='safetensors' needs a file path (it is written crash-safely through a temp file).")
    if kwargs:
        raise TypeError(f"save(format='safetensors') takes no torch.save options; got {sorted(kwargs)}.")
    from . import st_format

    st_format.save_file(f, state_dict, modelopt_state)


def _first_bytes(f: Any, n: int = 16, what: str = "restore") -> bytes:
    if isinstance(f, (str, os.PathLike)):
        fd = open_regular_file(f, what)
        try:
            return _first_bytes_fd(fd, n)
        finally:
            os.close(fd)
    if hasattr(f, "peek"):
        return bytes(f.peek(n)[:n])
    if hasattr(f, "seek") and hasattr(f, "tell"):
        pos = f.tell()
        head = f.read(n)
        f.seek(pos)
        return head
    return b""


def looks_like_safetensors(head: bytes) -> bool:
    """Whether a file's first bytes start a safetensors file: a u64 header length, then '{'."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") < (1 << 40)


def _torch_load_checked(f: Any, kwargs: dict[str, Any]) -> Any:
    """``torch_load`` with its failures turned into errors that name the file.

    A damaged file makes torch's zip reader and unpickler raise almost anything
    (RuntimeError, UnicodeDecodeError, IndexError, KeyError, EOFError, struct.error,
    AssertionError, TypeError...): every exception of the load is caught by type and
    becomes a CheckpointError, except what the caller's arguments caused (a device
    that is not there, an exception of their own map_location function), which stays
    itself.  A weights_only refusal stays a pickle.UnpicklingError (CheckpointRefused,
    also a CheckpointError).
    """
    import pickle

    name = describe_file(f)
    try:
        return torch_load(f, kwargs)
    except (FileNotFoundError, PermissionError, CheckpointError):
        raise  # from opening the file: the path itself is wrong, or not a regular file
    except pickle.UnpicklingError as exc:
        text = _clean(str(exc), f)
        if "Weights only load failed" not in text:
            raise CheckpointError(f"{name} is not a readable checkpoint (corrupted pickle data: {text}).") from exc
        # torch's own reason sits on the line after "WeightsUnpickler error:"
        lines = [ln.strip() for ln in text.split("WeightsUnpickler error:", 1)[-1].splitlines() if ln.strip()]
        reason = lines[0] if lines else "not on torch's safe list"
        if "global" not in reason.lower():
            reason += " (the file is damaged, or uses pickle features torch does not allow)"
        raise CheckpointRefused(
            f"{name}: refused to load with weights_only=True: {reason}. Loading it would need full "
            "pickle, which can run code stored in the file; modelopt_c never does that on its own. "
            "If you trust this file, pass weights_only=False explicitly."
        ) from exc
    except Exception as exc:  # noqa: BLE001 - classified below, none swallowed
        if _callers_fault(exc, kwargs):
            raise
        text = " ".join(_clean(str(exc), f).split())
        if len(text) > 300:
            text = text[:300] + " ..."
        raise CheckpointError(
            f"{name} is not a readable torch checkpoint (truncated or corrupted?): "
            f"{type(exc).__name__}: {text or 'no detail'}"
        ) from exc


class CheckpointRefused(pickle.UnpicklingError, CheckpointError):
    """weights_only refused the file: it holds pickle that torch does not allow."""


def _clean(text: str, f: Any) -> str:
    """torch's message, with the /proc/self/fd name we handed it replaced by the file's."""
    import re

    if isinstance(f, (str, os.PathLike)):
        text = re.sub(r"/proc/self/fd/\d+", lambda _: os.fspath(f), text)
    return text


def _callers_fault(exc: BaseException, kwargs: dict[str, Any]) -> bool:
    """Whether a load failed because of the caller's arguments, not the file's bytes."""
    text = str(exc)
    location = kwargs.get("map_location")
    if isinstance(exc, RuntimeError) and ("deserialize object on" in text or "CUDA" in text):
        return True  # map_location names a device that is not there
    if isinstance(location, (str, torch.device)) and f"(tagged with {location})" in text:
        return True  # map_location names no device torch knows
    code = getattr(location, "__code__", None) or getattr(getattr(location, "__call__", None), "__code__", None)
    tb = exc.__traceback__
    while code is not None and tb is not None:
        if tb.tb_frame.f_code is code:
            return True  # raised by the caller's own map_location function
        tb = tb.tb_next
    return False


def sniff_format(f: Any, what: str = "restore") -> str | None:
    """"torch", "torch-legacy", "safetensors" or None, from the file's first bytes.

    A path must name a regular file (CheckpointError otherwise, naming it)."""
    head = _first_bytes(f, 16, what)
    if head.startswith(_ZIP_MAGIC):
        return "torch"
    if head.startswith(_LEGACY_MAGIC):
        return "torch-legacy"
    if looks_like_safetensors(head):
        return "safetensors"
    return None


def _not_a_checkpoint(f: Any) -> CheckpointError:
    size = os.path.getsize(f) if isinstance(f, (str, os.PathLike)) else None
    what = "is empty" if size == 0 else "is not a checkpoint (neither torch's format nor safetensors)"
    return CheckpointError(f"{describe_file(f)} {what}: nothing was loaded.")


def _st_map_location(weights: dict, map_location: Any, name: str) -> dict:
    """``map_location`` for the safetensors format: a device (str, int or torch.device).

    The tensors come memory-mapped on the CPU; for another device they are moved
    there, as ``torch.load(map_location=...)`` would place them (a model on that
    device is then filled from them, a meta model gets them as its weights).
    """
    if map_location is None:
        return weights
    if not isinstance(map_location, (str, int, torch.device)):
        raise TypeError(
            f"{name}: for the safetensors-compatible format map_location must be a device "
            f"(str, int or torch.device), not {type(map_location).__name__}."
        )
    device = torch.device(map_location)
    if device.type == "cpu":
        return weights
    return {k: v.to(device) for k, v in weights.items()}


def load_checkpoint(f: Any, kwargs: dict[str, Any]) -> tuple[dict, dict]:
    """(modelopt_state, model_state_dict) from a checkpoint of either format."""
    name = describe_file(f)
    kind = sniff_format(f)
    if kind is None:
        raise _not_a_checkpoint(f)
    # ours, not torch.load's: the safetensors format's per-tensor checksums (on by
    # default); torch's format has none (its zip CRCs: `python -m modelopt_c verify`)
    kwargs = dict(kwargs)
    verify = kwargs.pop("verify", True)
    if kind == "safetensors":
        from . import st_format

        if not isinstance(f, (str, os.PathLike)):
            raise TypeError(f"{name}: restoring the safetensors-compatible format needs a file path.")
        state, weights = st_format.load_file(f, verify=verify)
        return state, _st_map_location(weights, kwargs.get("map_location"), name)
    objs = _torch_load_checked(f, kwargs)
    if not isinstance(objs, dict) or "modelopt_state" not in objs or "model_state_dict" not in objs:
        what = sorted(map(str, objs))[:5] if isinstance(objs, dict) else type(objs).__name__
        raise CheckpointError(
            f"{name} is not a modelopt checkpoint: expected a dict with 'modelopt_state' and "
            f"'model_state_dict' (written by save()), found {what}."
        )
    return objs["modelopt_state"], objs["model_state_dict"]


def load_modelopt_state_file(path: Any, kwargs: dict[str, Any]) -> dict:
    """load_modelopt_state: a safe load, then the layout checks."""
    if sniff_format(path, "load_modelopt_state") not in ("torch", "torch-legacy"):
        raise _not_a_checkpoint(path)
    kwargs = dict(kwargs)
    kwargs.setdefault("map_location", "cpu")
    state = _torch_load_checked(path, kwargs)
    validate_modelopt_state(state)
    return state


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
    # hooks, or the methods themselves set on the instance
    save = save or any(d.get(h) for h in _SAVE_HOOKS) or any(m in d for m in _SAVE_METHODS)
    load = load or any(d.get(h) for h in _LOAD_HOOKS) or any(m in d for m in _LOAD_METHODS)
    return save, load


def _has_own_loading(module: nn.Module) -> bool:
    """Whether ``module`` (itself, not its children) saves or loads other than torch's plain way.

    State-dict hooks or an overridden ``state_dict`` can return clones (nvidia-modelopt's
    tied NVFP4 quantizers do): copying into those would land in throw-away tensors.
    """
    save, load = _own_loading(module)
    return save or load


def _live_targets(model: nn.Module) -> tuple[dict[str, Any], bool, bool]:
    """(the live tensors torch's load_state_dict copies into, by key; whether every module
    is plain; whether the loading side is torch's own everywhere, so the keys are known).

    Mirrors ``nn.Module._load_from_state_dict``: non-None parameters, then persistent
    non-None buffers, module by module in ``_modules`` order (shared modules repeat, as
    in ``state_dict``).  Nothing is cloned.
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
        skip = module._non_persistent_buffers_set
        for name, b in module._buffers.items():
            if b is not None and name not in skip:
                targets[prefix + name] = b
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


def _subclass_error(bad: list[tuple[str, str, type]], source: Any) -> TypeError:
    what = "; ".join(f"{_quote(k)} is a {t.__module__}.{t.__qualname__} in the {side}" for k, side, t in bad)
    return TypeError(
        f"checkpoint {describe_file(source)}: restore loads plain tensors only, and {what}. Tensor "
        "subclasses (DTensor, FSDP2 shards, ...) are not supported yet: restore into the unsharded "
        "model and shard it afterwards, or save the full tensors (DTensor.full_tensor()). Nothing was loaded."
    )


def check_weights(model: nn.Module, targets: dict, state_dict: Any, source: Any) -> list[tuple[str, Any, Any, int]]:
    """Every key, shape, dtype and kind checked before anything is copied.

    Returns the copies to make as (key, model tensor, file tensor, how); raises
    RuntimeError in torch's ``load_state_dict`` wording naming every offending key (and
    the file), or TypeError for tensor subclasses, which must never reach DLPack.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"{describe_file(source)}: model_state_dict is a {type(state_dict).__name__}, not a dict")
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
            + f"\n(checkpoint {describe_file(source)}: it was saved from a different architecture or with "
            "different modes; nothing was copied into the weights)"
        )
    return plan


def plan_load(model: nn.Module, state_dict: Any, source: Any) -> list | None:
    """Check the file's weights against ``model``, then say how to load them.

    A model whose every module is plain gets the list of copies for the native loop.
    Otherwise the modules' own ``load_state_dict`` runs here (after the same checks,
    when no module customises the loading side) and None is returned.
    """
    targets, plain, checkable = _live_targets(model)
    if checkable:
        plan = check_weights(model, targets, state_dict, source)
        if plain:
            return plan
    load_state_dict_torch(model, state_dict, source)
    return None


def load_state_dict_torch(model: nn.Module, state_dict: dict, source: Any) -> None:
    """torch's own loader, for modules with custom loading (in place; assign for meta)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"{describe_file(source)}: model_state_dict is a {type(state_dict).__name__}, not a dict")
    on_meta = any(t.is_meta for t in model.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor))
    try:
        model.load_state_dict(state_dict, strict=True, assign=on_meta)
    except RuntimeError as exc:
        exc.add_note(f"checkpoint {describe_file(source)}")
        raise


def assign_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Make ``tensor`` the model's parameter or buffer ``key`` (for meta-device models)."""
    prefix, _, name = key.rpartition(".")
    owner = model.get_submodule(prefix) if prefix else model
    if name in owner._parameters:
        old = owner._parameters[name]
        owner._parameters[name] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else True)
    else:
        owner._buffers[name] = tensor
