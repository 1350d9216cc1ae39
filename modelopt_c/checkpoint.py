"""Checkpoint files: save, restore, load_modelopt_state, restore_from_modelopt_state.

The one place that deals with files.  It tells the formats apart (once, from the
first bytes), opens and safely loads torch-format files, reads and writes the
safetensors-compatible format (through ``st_format``), words every file error, and
then hands the native core what it is good at: the bookkeeping (``modelopt_state``,
the transactional replay), the in-place weight copy, the crash-safe writer and the
byte codecs.  The native core never calls back into this module (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import stat
import sys
from typing import Any, BinaryIO, Callable, Union

import torch
import torch.nn as nn

from . import _conversion, _runtime, distributed, torch_zip

__all__ = [
    "CheckpointError",
    "CheckpointRefused",
    "load_checkpoint",
    "load_modelopt_state",
    "restore",
    "restore_from_modelopt_state",
    "save",
    "sniff_format",
]

FileLike = Union[str, "os.PathLike[str]", BinaryIO]


# A file that is not a readable checkpoint (not one, truncated, or corrupted): a
# ValueError and a RuntimeError.  Defined by the native module, whose readers raise it.
CheckpointError = _conversion.CheckpointError


class CheckpointRefused(pickle.UnpicklingError, CheckpointError):
    """weights_only refused the file: it holds pickle that torch does not allow."""


# ---- files -------------------------------------------------------------------------


def _is_path(f: Any) -> bool:
    return isinstance(f, (str, os.PathLike))


def describe_file(f: Any) -> str:
    """A file's name for error messages."""
    if _is_path(f):
        return repr(os.fspath(f))
    return repr(getattr(f, "name", f"<{type(f).__name__}>"))


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


# ---- telling the formats apart ---------------------------------------------------------

_ZIP_MAGIC = b"PK\x03\x04"
# torch's legacy (pre-1.6) format: a protocol-2 pickle of its magic number first
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
# a safetensors header length is a u64; anything this large is no header (the reader
# then says what is wrong with one that is merely too large for it)
_MAX_SNIFFED_HEADER = 1 << 40


def _first_bytes(f: Any, n: int = 16, what: str = "restore") -> bytes:
    if isinstance(f, (bytes, bytearray, memoryview)):
        return bytes(f[:n])
    if _is_path(f):
        fd = open_regular_file(f, what)
        try:
            return os.pread(fd, n, 0)
        finally:
            os.close(fd)
    if hasattr(f, "peek"):
        return bytes(f.peek(n)[:n])
    if hasattr(f, "seek") and hasattr(f, "tell"):
        pos = f.tell()
        try:
            head = f.read(n)
        finally:
            f.seek(pos)
        return bytes(head)
    return b""


def kind_of_head(head: bytes) -> str | None:
    """"torch", "torch-legacy", "safetensors" or None, from a file's first 16 bytes."""
    if head.startswith(_ZIP_MAGIC):
        return "torch"
    if head.startswith(_LEGACY_MAGIC):
        return "torch-legacy"
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < _MAX_SNIFFED_HEADER:
        return "safetensors"
    return None


def sniff_format(f: Any, what: str = "restore") -> str | None:
    """"torch", "torch-legacy", "safetensors" or None, from the first bytes of ``f``.

    ``f``: a path (which must name a regular file: CheckpointError otherwise, naming
    it), a binary file object (its position is kept) or the bytes themselves.  The
    only format sniffer of the package (restore, the CLI, ``st_format``)."""
    return kind_of_head(_first_bytes(f, 16, what))


def checkpoint_format(f: Any, format: str | None) -> str:
    """"torch" or "safetensors" for writing: the explicit ``format``, else by the path's suffix."""
    if format is None:
        if _is_path(f) and os.fspath(f).endswith(".safetensors"):
            return "safetensors"
        return "torch"
    if format not in ("torch", "safetensors"):
        raise ValueError(f"Unknown checkpoint format {format!r}: use 'torch' or 'safetensors'.")
    return format


def _not_a_checkpoint(f: Any) -> CheckpointError:
    size = os.path.getsize(f) if _is_path(f) else None
    what = "is empty" if size == 0 else "is not a checkpoint (neither torch's format nor safetensors)"
    return CheckpointError(f"{describe_file(f)} {what}: nothing was loaded.")


# ---- the torch format: one safe load ---------------------------------------------------


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


def _torch_load(f: Any, kwargs: dict[str, Any]) -> Any:
    """``torch.load`` with safe defaults: CPU, ``weights_only=True``, mmap for paths.

    A path is opened once, without blocking, and must be a regular file (a FIFO or a
    device would hang or never end); torch then reads that same open file through
    /proc/self/fd, so the file checked is the file loaded.  ``slice`` is allowed
    under weights_only (modes keep slices in their metadata).
    """
    kwargs = dict(kwargs)
    kwargs.setdefault("map_location", "cpu")
    kwargs.setdefault("weights_only", True)
    if not _is_path(f):
        with _slice_allowed():
            return torch.load(f, **kwargs)
    fd = open_regular_file(f)
    try:
        if os.pread(fd, 4, 0) == _ZIP_MAGIC:
            kwargs.setdefault("mmap", True)  # only the zip format can be mapped (not legacy files)
            if _fast_path_ok(kwargs):
                obj = torch_zip.load(fd)
                if obj is not None:
                    return obj
        # torch.load also picks its reader by a ".safetensors" suffix; the neutral
        # /proc name hands it the bytes, whose format was already told apart
        name = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else os.fspath(f)
        with _slice_allowed():
            return torch.load(name, **kwargs)
    finally:
        os.close(fd)


def _fast_path_ok(kwargs: dict[str, Any]) -> bool:
    """Whether torch_zip's reader gives what torch.load would for these options.

    It gives CPU tensors over a private mapping under weights_only rules: the defaults
    of this module.  Any other option (another device, a map_location function, no
    mmap, full pickle, encoding...) goes to torch.load.
    """
    if set(kwargs) - {"map_location", "weights_only", "mmap"}:
        return False
    location = kwargs["map_location"]
    on_cpu = location in ("cpu", torch.device("cpu")) if isinstance(location, (str, torch.device)) else False
    return on_cpu and kwargs["weights_only"] is True and kwargs["mmap"] is True


def torch_load_checked(f: Any, kwargs: dict[str, Any] | None = None) -> Any:
    """The package's one safe ``torch.load``, its failures turned into errors that name the file.

    A damaged file makes torch's zip reader and unpickler raise almost anything
    (RuntimeError, UnicodeDecodeError, IndexError, KeyError, EOFError, struct.error,
    AssertionError, TypeError...): every exception of the load is caught by type and
    becomes a CheckpointError, except what the caller's arguments caused (a device
    that is not there, an exception of their own map_location function), which stays
    itself.  A weights_only refusal stays a pickle.UnpicklingError (CheckpointRefused,
    also a CheckpointError).
    """
    kwargs = {} if kwargs is None else kwargs
    name = describe_file(f)
    location = kwargs.get("map_location")
    restore_location(location, name)  # a map_location of no kind torch.load takes: TypeError, not "corrupted"
    if isinstance(location, int) and not isinstance(location, bool):
        kwargs = dict(kwargs, map_location=str(_int_device(location, name)))  # as for the safetensors format
    elif isinstance(location, dict):  # torch.load matches the values as strings
        kwargs = dict(kwargs, map_location={k: str(v) for k, v in location.items()})
    try:
        return _torch_load(f, kwargs)
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


def _clean(text: str, f: Any) -> str:
    """torch's message, with the /proc/self/fd name we handed it replaced by the file's."""
    if _is_path(f):
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


# ---- reading a checkpoint ----------------------------------------------------------------


# ---- map_location ---------------------------------------------------------------------

# Where the safetensors-compatible format's tensors were saved from, as torch.load's
# map_location sees it: the file stores bytes, read on the CPU (docs/FORMAT.md).
ST_LOCATION = "cpu"


def restore_location(map_location: Any, name: str) -> Callable[[Any, str], Any]:
    """``map_location`` as the function torch.load applies to each storage: (storage, location tag) -> storage.

    Every form torch.load takes: None (each storage to its saved location), a device
    (str, torch.device, or an int: that accelerator), a dict {saved location: location}
    (e.g. ``{"cpu": "cuda:0"}``), or a function(storage, location) called with the
    storage read on the CPU and its saved location, returning a storage (already where
    it belongs) or None (then the saved location, as without map_location).  Devices
    go through ``torch.serialization.default_restore_location``: torch's own checks
    and messages.  Anything else is a TypeError naming the file ``name``.
    """
    default = torch.serialization.default_restore_location
    if map_location is None:
        return default
    if isinstance(map_location, (str, torch.device)) or (
        isinstance(map_location, int) and not isinstance(map_location, bool)
    ):
        where = str(_int_device(map_location, name) if isinstance(map_location, int) else map_location)
        return lambda storage, location: default(storage, where)
    if isinstance(map_location, dict):
        bad = [f"{k!r}: {v!r}" for k, v in map_location.items()
               if not isinstance(k, str) or not isinstance(v, (str, torch.device))]
        if bad:
            raise TypeError(
                f"{name}: a map_location dict maps saved locations to locations, both device strings such as "
                f"{{'cpu': 'cuda:0'}} (as for torch.load); not {', '.join(bad[:3])}."
            )
        table = {k: str(v) for k, v in map_location.items()}
        return lambda storage, location: default(storage, table.get(location, location))
    if callable(map_location):
        def call(storage: Any, location: str) -> Any:
            result = map_location(storage, location)
            if result is None:  # torch.load's contract: as if map_location were not given
                return default(storage, location)
            if isinstance(result, torch.TypedStorage):
                result = result._untyped_storage
            if not isinstance(result, torch.UntypedStorage):
                raise TypeError(
                    f"{name}: the map_location function returned a {type(result).__name__}; as for torch.load it "
                    "must return a storage (e.g. storage.cuda(1), or the storage itself) or None."
                )
            if result.nbytes() != storage.nbytes():
                raise ValueError(
                    f"{name}: the map_location function returned a storage of {result.nbytes()} bytes for one of "
                    f"{storage.nbytes()}; it must return the storage it was given, moved (e.g. storage.cuda(1)), or None."
                )
            return result
        return call
    raise TypeError(
        f"{name}: map_location must be a device (str, int or torch.device), a dict {{saved location: location}} "
        f"or a function(storage, location) as for torch.load, not {type(map_location).__name__}."
    )


def _int_device(index: int, name: str) -> torch.device:
    try:
        return torch.device(index)
    except RuntimeError as exc:  # no accelerator: torch's message, with the file
        exc.add_note(f"restoring {name} with map_location={index!r}: pass map_location='cpu' on a machine without one.")
        raise


def fixed_target(restore: Callable[[Any, str], Any], location: str, name: str) -> torch.device:
    """The one device ``restore`` puts storages saved at ``location`` on (a device or dict map_location).

    Found by mapping an empty storage: torch checks the device there and then (its
    RuntimeError when absent, the file named in a note), and nothing is copied."""
    try:
        return restore(torch.UntypedStorage(0), location).device
    except RuntimeError as exc:
        exc.add_note(f"restoring {name}: map_location names a device that is not there; e.g. map_location='cpu'.")
        raise


def map_tensors(obj: Any, restore: Callable[[Any, str], Any], location: str = ST_LOCATION,
                memo: dict | None = None) -> Any:
    """``obj`` with every tensor in it (dicts, lists, tuples) placed by ``restore``, as torch.load would.

    One call of ``restore`` per storage: tensors that share memory (tied weights, views)
    still share it after the move, and the same tensor object maps to one tensor.
    Unchanged containers are returned as they are."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        return _map_tensor(obj, restore, location, memo)
    if isinstance(obj, dict):
        out = None
        for key, value in obj.items():
            new = map_tensors(value, restore, location, memo)
            if new is not value:
                out = obj.copy() if out is None else out
                out[key] = new
        return obj if out is None else out
    if isinstance(obj, (list, tuple)):
        items = [map_tensors(value, restore, location, memo) for value in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        if isinstance(obj, list):
            return type(obj)(items) if type(obj) is not list else items
        make = getattr(type(obj), "_make", None)  # a namedtuple takes its fields one by one
        return make(items) if make is not None else type(obj)(items)
    return obj


def _map_tensor(t: torch.Tensor, restore: Callable[[Any, str], Any], location: str, memo: dict) -> torch.Tensor:
    if id(t) in memo:
        return memo[id(t)][1]
    if t.layout is not torch.strided or t.is_quantized or type(t) not in (torch.Tensor, nn.Parameter):
        # sparse, quantized, subclasses: no one storage to hand over; placed where an empty one goes
        out = t.to(restore(torch.UntypedStorage(0), location).device)
    else:
        storage = t.untyped_storage()
        key = ("storage", storage.device, storage.data_ptr(), storage.nbytes())
        if storage.data_ptr() != 0 and key in memo:
            new = memo[key][1]
        else:
            new = restore(storage, location)
            memo[key] = (storage, new)
        if new.data_ptr() == storage.data_ptr() and new.device == storage.device:
            out = t
        else:
            out = torch.empty(0, dtype=t.dtype, device=new.device).set_(new, t.storage_offset(), t.size(), t.stride())
            if isinstance(t, nn.Parameter):
                out = nn.Parameter(out, requires_grad=t.requires_grad)
    memo[id(t)] = (t, out)  # t held: its id stays its own while the memo lives
    return out


def placement(kind: str, kwargs: dict[str, Any], name: str) -> tuple[Callable | None, torch.device | None]:
    """(the storage mapper for ``map_location``, the one device it names, or None).

    The torch format without map_location loads onto the CPU (this module's default);
    with None, a dict or a function its location tags decide, so torch.load places it
    (the mapper is then None).  The safetensors format's tensors are all saved at
    ``ST_LOCATION``: any form but a function names one device."""
    if kind == "safetensors":
        location = kwargs.get("map_location")
        restore = restore_location(location, name)
        return restore, None if callable(location) else fixed_target(restore, ST_LOCATION, name)
    location = kwargs.get("map_location", "cpu")
    if location is None or isinstance(location, dict) or callable(location):
        return None, None
    restore = restore_location(location, name)
    return restore, fixed_target(restore, ST_LOCATION, name)


def load_checkpoint(
    f: Any, kwargs: dict[str, Any] | None = None, *, plain: bool = False, buffers: bool = False
) -> tuple[Any, dict]:
    """(modelopt_state, model_state_dict) from a checkpoint written by ``save`` (either format).

    ``kwargs``: restore's options: ``verify`` (ours: the safetensors format's per-tensor
    checksums, on by default; torch's format has none, see ``python -m modelopt_c
    verify``), the rest for ``torch.load`` (``map_location``, in every form torch.load
    takes, also places safetensors tensors and those in the modelopt state).
    ``plain=True`` (the CLI) also takes a plain state dict, saved by torch or
    safetensors: its modelopt_state is then None.  ``buffers=True`` (restore) keeps the
    safetensors format's non-persistent buffers in the weights, under ``_runtime.BUFFER_PREFIX``.
    """
    state, weights, device = load_for_restore(f, kwargs, plain=plain, buffers=buffers)
    if device is not None:
        restore = restore_location(device, describe_file(f))
        weights = map_tensors(weights, restore)
    return state, weights


def load_for_restore(
    f: Any, kwargs: dict[str, Any] | None = None, *, plain: bool = False, buffers: bool = False
) -> tuple[Any, dict, torch.device | None]:
    """``load_checkpoint`` for restore: (modelopt_state, weights, device).

    When ``map_location`` names one device other than the CPU, the weights stay on the
    CPU (memory-mapped) and that device is returned: restore copies them straight into
    a model's own tensors (``copy_`` goes host to device), and only tensors it assigns
    (a meta model's) are placed on it (``restore_weights(device=)``): no second copy of
    the weights on the device.  The modelopt state's tensors are placed as torch.load
    would place them.  Otherwise ``device`` is None and every tensor is already placed.
    """
    kwargs = dict(kwargs or {})
    name = describe_file(f)
    kind = sniff_format(f)
    if kind is None:
        raise _not_a_checkpoint(f)
    verify = kwargs.pop("verify", True)
    restore, target = placement(kind, kwargs, name)
    if target is not None:
        kwargs["map_location"] = "cpu"  # placed below (and torch_zip's fast reader serves the torch format)
    memo: dict = {}
    if kind == "safetensors":
        from . import st_format

        if not _is_path(f):
            raise TypeError(f"{name}: restoring the safetensors-compatible format needs a file path.")
        state, weights = st_format.load_file(f, verify=verify, plain=plain, buffers=buffers)
    else:
        state, weights = _torch_checkpoint(f, kwargs, plain, name)
    device = None
    if restore is not None and (target is None or target.type != "cpu"):
        state = map_tensors(state, restore, ST_LOCATION, memo)
        if target is None:  # a function: called once per storage, as torch.load does
            weights = map_tensors(weights, restore, ST_LOCATION, memo)
        else:
            device = target
    return state, weights, device


def _torch_checkpoint(f: Any, kwargs: dict[str, Any], plain: bool, name: str) -> tuple[Any, dict]:
    objs = torch_load_checked(f, kwargs)
    if isinstance(objs, dict) and "model_state_dict" in objs and ("modelopt_state" in objs or plain):
        return objs.get("modelopt_state"), objs["model_state_dict"]
    if plain:
        if isinstance(objs, dict) and all(isinstance(v, torch.Tensor) for v in objs.values()):
            return None, objs
        raise CheckpointError(f"{name}: a torch file, but not a modelopt checkpoint or a state dict")
    if isinstance(objs, dict) and "modelopt_state_dict" in objs and "modelopt_version" in objs:
        raise CheckpointError(
            f"{name} holds only a modelopt state (no weights), as save_pretrained writes it "
            "(modelopt_state.pth) or torch.save(modelopt_state(model)) does: call "
            "restore_from_modelopt_state(model, load_modelopt_state(path)) for it, then load the weights "
            "(or restore(model, folder) for a whole save_pretrained folder)."
        )
    what = sorted(map(str, objs))[:5] if isinstance(objs, dict) else type(objs).__name__
    raise CheckpointError(
        f"{name} is not a modelopt checkpoint: expected a dict with 'modelopt_state' and "
        f"'model_state_dict' (written by save()), found {what}."
    )


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


# ---- writing ---------------------------------------------------------------------------


def save_torch_file(path: Any, obj: Any, **kwargs: Any) -> None:
    """``torch.save(obj, path, **kwargs)`` through the crash-safe writer (atomic_file.c):
    a temp file beside ``path``, locked while written, fsync, rename, fsync the folder;
    a new file gets 0666 & ~umask, a replaced one keeps its permissions, and temp files
    of killed writers in that folder are removed.

    Without torch.save options the bytes are written by ``torch_zip.save`` (torch's own
    records and pickle, streamed with O_DIRECT; the zip folder named after ``path`` as
    torch.save names it), else by torch.save itself."""
    if not set(kwargs) - {"_started"}:
        kwargs["_writer"] = functools.partial(_write_torch_zip, archive=torch_zip.archive_name(path))
    _conversion._save_torch_file(path, obj, **kwargs)


def _write_torch_zip(obj: Any, temp: str, archive: str) -> None:
    if not torch_zip.save(obj, temp, archive):
        torch.save(obj, temp)


def _save_safetensors(f: Any, state_dict: dict, modelopt_state: dict, kwargs: dict, buffers: Any = None,
                      progress: Any = None, extra: Any = None) -> None:
    """Write the safetensors-compatible format (paths only: it is staged and renamed)."""
    if not _is_path(f):
        raise TypeError("format='safetensors' needs a file path (it is written crash-safely through a temp file).")
    if kwargs:
        raise TypeError(f"save(format='safetensors') takes no torch.save options; got {sorted(kwargs)}.")
    from . import st_format
    from .progress import reporting

    total = sum(t.numel() * t.element_size() for t in state_dict.values() if isinstance(t, torch.Tensor))
    with reporting(progress, f"saving {os.path.basename(os.fspath(f))}", total) as hook:
        st_format.save_file(f, state_dict, modelopt_state, buffers=buffers, progress=hook, extra=extra)


def _save_torch_progress(f: Any, ckpt: dict, kwargs: dict, progress: Any) -> None:
    """save_torch_file, its progress watched as the temp file grows (progress.watch_file)."""
    from .progress import reporting, watch_file

    total = sum(t.numel() * t.element_size() for t in ckpt["model_state_dict"].values() if isinstance(t, torch.Tensor))
    with reporting(progress, f"saving {os.path.basename(os.fspath(f))}", total) as hook:
        if hook is None:
            save_torch_file(f, ckpt, **kwargs)
            return
        watcher, ok = watch_file(hook, total), False
        try:
            save_torch_file(f, ckpt, _started=watcher.started, **kwargs)
            ok = True
        finally:
            watcher.finish(f, ok)


# ---- the public functions ----------------------------------------------------------------


def restore_weights(
    model: nn.Module, state: Any, weights: Any, name: str, on_meta: Any = "raise", progress: Any = None,
    device: Any = None,
) -> nn.Module:
    """The modes replayed and the weights loaded, as one transaction (restore, hf.restore_folder).

    ``on_meta``: what to do when a tensor would be left on the meta device ("raise" or "warn").
    ``device`` (load_for_restore's): where the tensors the model adopts (a meta model's)
    go; the rest are copied from ``weights`` where they are into the model's own tensors.
    A model that is already converted gets a note saying to restore into a fresh one."""
    if on_meta not in ("raise", "warn"):
        raise ValueError(f"on_meta must be 'raise' or 'warn', not {on_meta!r}.")
    token = _runtime.ON_META.set(on_meta)
    device_token = _runtime.ASSIGN_DEVICE.set(None if device is None else torch.device(device))
    try:
        return _conversion._restore_from_state(model, state, weights, name, progress=progress)
    except AssertionError as exc:
        _note_fresh_model(exc)
        raise
    finally:
        _runtime.ASSIGN_DEVICE.reset(device_token)
        _runtime.ON_META.reset(token)


def _note_fresh_model(exc: AssertionError) -> None:
    if str(exc) == "Model already has modelopt state!":
        exc.add_note(
            "restore() and restore_from_modelopt_state() replay the saved modes themselves: restore into a "
            "freshly built model (e.g. MyModel() or AutoModel.from_config(config)), not one already converted."
        )



def save(model: nn.Module, f: FileLike, *, format: str | None = None, **kwargs: Any) -> None:
    """Save the model's weights with its modelopt state so ``restore()`` rebuilds it.

    f: a path or a binary file object.  format: ``'torch'`` (the default; the file
    nvidia-modelopt writes: torch.save's records, pickled by torch, written by our own
    zip writer with O_DIRECT; ``kwargs`` go to ``torch.save``, which then writes it) or
    ``'safetensors'`` (the default for paths ending in ``.safetensors``).  A path is
    written to a temporary file in the same folder, fsynced and renamed over the target:
    a crash leaves the old file or the new one, never a broken one.
    ``MODELOPT_C_DIRECT_IO=0`` writes through the page cache instead.  A wrapped model
    (DataParallel, DDP, FSDP) is unwrapped with a warning.

    ``progress``: a bar when interactive (default), ``False``, ``True`` or a
    ``hook(done_bytes, total_bytes)`` (modelopt_c.progress).  ``extra``: a dict of the
    rest of a training state (optimizer, scheduler, step, RNG) stored in the same
    file, read back with ``load_extra(f)``; nvidia-modelopt still restores the file
    (modelopt_c.periodic).  ``keep_last=N``: after the save, remove the oldest files
    of ``f``'s numbered series (``ckpt-<step>.pt``) beyond the newest N.
    """
    if "modelopt_c.background" in sys.modules:  # one save at a time: a background one finishes first
        sys.modules["modelopt_c.background"].wait_for_saves()
    rank = kwargs.pop("rank", None)
    if distributed.wants_save(model, f, format, rank):
        return distributed.save(model, f, format=format, rank=rank, kwargs=kwargs)
    progress, extra, keep_last = kwargs.pop("progress", None), kwargs.pop("extra", None), kwargs.pop("keep_last", None)
    if keep_last is not None:
        from .periodic import checkpoint_series

        if not _is_path(f):
            raise TypeError("keep_last needs a file path (a numbered series of files in one folder).")
        checkpoint_series(f)  # a name without a number fails before anything is written
    model = _runtime.unwrap(model, "warn")
    fmt = checkpoint_format(f, format)
    buffers = _runtime.non_persistent_buffers(model) if fmt == "safetensors" else None
    write_checkpoint(f, fmt, _conversion.modelopt_state(model), model.state_dict(), buffers, kwargs, progress, extra,
                     keep_last)


def write_checkpoint(
    f: FileLike,
    fmt: str,
    state: dict,
    weights: dict,
    buffers: Any,
    kwargs: dict,
    progress: Any = None,
    extra: Any = None,
    keep_last: Any = None,
) -> None:
    """The file half of ``save`` (also run in the background by ``async_save``)."""
    if fmt == "safetensors":
        _save_safetensors(f, weights, state, kwargs, buffers, progress, extra)
    else:
        from .periodic import torch_checkpoint

        ckpt = torch_checkpoint(state, weights, extra)
        if isinstance(f, (str, bytes, os.PathLike)):
            _save_torch_progress(f, ckpt, kwargs, progress)
        else:  # a file object: written directly (it has no folder to stage in)
            torch.save(ckpt, f, **kwargs)
    if keep_last is not None:
        from .periodic import rotate

        rotate(f, keep_last)


def restore(model: Any, f: FileLike, **kwargs: Any) -> nn.Module:
    """Load a checkpoint written by ``save()`` into ``model``; returns the restored model.

    Either format is accepted, told apart by the file's first bytes, not its name
    (nvidia-modelopt's files too).  The recorded modes are replayed on ``model`` and
    the weights copied into the model's own tensors, in place, one by one.

    Safe by default: torch-format files load with weights_only=True semantics (no code
    from the file runs; pass ``weights_only=False`` yourself only for a trusted file),
    and paths are memory-mapped, so the peak memory is the model plus one tensor.  A
    model built on the meta device gets its tensors straight from the file.
    ``map_location`` defaults to ``'cpu'`` and takes every form ``torch.load`` takes: a
    device (``'cuda:1'``, ``torch.device``, or an int: that accelerator), a dict
    ``{saved location: location}`` (the safetensors format's tensors are saved at
    ``'cpu'``: ``{'cpu': 'cuda:0'}``), or a function ``(storage, location)`` given each
    storage read on the CPU and its saved location, returning the storage placed, or
    None for the saved location.  It places the tensors in the modelopt state too.  A
    device is where a meta model's tensors go; a model with data is filled in place
    from the mapped file (host to device: no copy of the weights on the device first).
    A function is called for every tensor first, as torch.load does; for the torch
    format a dict (or None) goes by each storage's saved location, through torch.load.
    ``verify`` (default True) checks the
    safetensors format's checksums; ``progress`` as for ``save`` (bytes copied into the
    model).  Every key, shape, dtype and kind is checked before
    the first byte is copied: RuntimeError in torch's load_state_dict wording listing
    every offending key and the file; TypeError for tensor subclasses (DTensor: restore
    the unsharded model).  Models with state-dict hooks or their own (load_)state_dict
    load through their own load_state_dict, from the same mapped tensors.  Restore into
    the unwrapped model (a wrapped one raises ValueError), then wrap it.

    Meta-device models: tied tensors stay tied (one tensor), the safetensors format's
    non-persistent buffers fill the model's meta ones, and when a tensor would still be
    left on meta (e.g. a rotary ``inv_freq`` from a torch-format file) a CheckpointError
    lists them before anything is loaded; ``on_meta='warn'`` warns and loads instead.
    ``f`` may also be a ``save_pretrained`` folder (``modelopt_c.hf.restore_folder``).

    Transactional: when the weights do not fit or a mode's restore raises, every module
    of the model gets back its class, attributes, submodules, parameters, buffers, hooks
    and modelopt state, and the exception is re-raised.  Not undone: tensor data a mode's
    restore changes in place, state outside the model's modules, and copies already made
    when a copy itself fails midway (after every check passed: e.g. a device error).
    """
    if distributed.is_dcp_folder(f):  # a torch.distributed.checkpoint folder (.metadata)
        return distributed.restore_folder(model, f, kwargs)
    if _is_path(f) and os.path.isdir(f):
        from . import hf  # a save_pretrained folder (config.json / modelopt_state.pth)

        if hf.is_pretrained_folder(f):
            return hf.restore_folder(model, f, **kwargs)
    on_meta = kwargs.pop("on_meta", "raise")
    progress = kwargs.pop("progress", None)
    model = _runtime.unwrap(_runtime.as_module(model), "raise")
    state, weights, device = load_for_restore(f, kwargs, buffers=True)
    from .progress import reporting

    name = os.path.basename(os.fspath(f)) if _is_path(f) else "checkpoint"
    with reporting(progress, f"restoring {name}") as hook:
        # the modes are replayed and the weights loaded as one transaction
        return restore_weights(model, state, weights, describe_file(f), on_meta, progress=hook, device=device)


def load_modelopt_state(modelopt_state_path: FileLike, **kwargs: Any) -> dict[str, Any]:
    """Load a file written with ``torch.save(modelopt_state(model), path)``.

    Safely (``weights_only=True``, ``map_location='cpu'`` unless given), then its layout
    is checked: TypeError for a non-dict or wrong types, ValueError for a full
    checkpoint or missing keys.
    """
    if sniff_format(modelopt_state_path, "load_modelopt_state") not in ("torch", "torch-legacy"):
        raise _not_a_checkpoint(modelopt_state_path)
    kwargs = dict(kwargs)
    kwargs.setdefault("map_location", "cpu")
    state = torch_load_checked(modelopt_state_path, kwargs)
    validate_modelopt_state(state)
    return state


def restore_from_modelopt_state(
    model: Any, modelopt_state: dict[str, Any] | None = None, modelopt_state_path: FileLike | None = None
) -> nn.Module:
    """Replay the recorded modes on a fresh model; returns the restored model.

    Initialises the model's state, loads the given state (every config validates, mode
    order is checked), then calls each mode's restore.  Give exactly one of
    ``modelopt_state`` / ``modelopt_state_path``.  The weights are the model's own;
    load them afterwards (or use ``restore()``).

    Transactional: when a mode's restore raises, every module of the model gets back
    its class, attributes, submodules, parameters, buffers, hooks and modelopt state,
    and the exception is re-raised.  Not undone: tensor data a mode changes in place,
    and state outside the model's modules (globals, objects a mode mutates rather than
    replaces).
    """
    if (modelopt_state is None) == (modelopt_state_path is None):
        raise AssertionError("Either modelopt_state or modelopt_state_path must be provided, but not both.")
    if modelopt_state_path is not None:
        modelopt_state = load_modelopt_state(modelopt_state_path)
    try:
        return _conversion._restore_from_state(model, modelopt_state)
    except AssertionError as exc:
        _note_fresh_model(exc)
        raise
