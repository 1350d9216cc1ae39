"""Beyond one process: rank-aware saves and sharded (DCP folder) checkpoints.

``checkpoint.save`` / ``checkpoint.restore`` hand over here in three cases (one
dispatch line each):

* **replicated models under a process group** (DDP, or plain per-rank copies, no
  DTensor; world size > 1): ``save`` writes once, on rank 0 (``rank=`` names another;
  ``rank="all"`` lets every rank write the path it passes, e.g. one per rank), then
  every rank waits until the file is complete and learns whether it was written.
  ``restore`` of a file needs nothing from here: every rank maps the same file.
* **sharded models** (FSDP2 ``fully_shard``, DTensor / ``parallelize_module``), or
  ``format="dcp"``: ``save`` writes a folder through ``torch.distributed.checkpoint``
  (DCP): each rank its own shards, in parallel, plus ``modelopt_state.msgpack`` (the
  modelopt state in our msgpack encoding, written once by rank 0).  The folder is
  written beside its target and swapped in when every rank has finished: a failed or
  killed save leaves the previous checkpoint as it was.
* **a DCP folder** (a folder with DCP's ``.metadata``) given to ``restore``: the
  recorded modes are replayed on the model first, then DCP loads the weights into the
  model's own state dict, resharding onto this world size / mesh (or onto a plain
  model in a single process).

DCP's ``.metadata`` is DCP's own (a pickle, so torch's tools read the folder); we read
it through an unpickler that can only build DCP's metadata classes, and every tensor
through ``torch.load(weights_only=True)``: no code from the folder runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import os
import pickle
import secrets
import shutil
import sys
import warnings
from typing import Any

import torch
import torch.nn as nn

from . import _conversion, _runtime

__all__ = [
    "STATE_FILE",
    "check_folder",
    "folder_facts",
    "is_dcp_folder",
    "load_folder",
    "read_folder_state",
    "restore_folder",
    "save",
    "save_folder",
    "save_replicated",
    "write_folder",
]

STATE_FILE = "modelopt_state.msgpack"
METADATA_FILE = ".metadata"
_TMP_TAG = ".dcp-tmp-"


# ---- where we are --------------------------------------------------------------------------


def process_group_active() -> bool:
    """Whether a default process group is initialized (torch.distributed imported and up)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    if not process_group_active():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def _dtensor_class() -> type | None:
    # a DTensor exists only when torch.distributed.tensor is imported: never import it here
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is a DTensor (FSDP2, tensor parallel)."""
    cls = _dtensor_class()
    if cls is None:
        return False
    tensors = list(model.parameters()) + list(model.buffers())
    return any(isinstance(t, cls) for t in tensors)


def is_dcp_folder(f: Any) -> bool:
    """Whether ``f`` is a path to a folder holding DCP's ``.metadata`` (the only marker we check)."""
    if not isinstance(f, (str, os.PathLike)):
        return False
    return os.path.isdir(f) and os.path.isfile(os.path.join(f, METADATA_FILE))


def wants_save(model: Any, f: Any, format: str | None, rank: Any) -> bool:
    """Whether ``save`` hands over here (see the module's docstring)."""
    if format == "dcp":
        return True
    if isinstance(model, nn.Module) and is_sharded(_runtime.unwrap(model, "force")):
        return True
    if rank == "all":
        return False
    return _rank_world()[1] > 1


def save(model: nn.Module, f: Any, *, format: str | None, rank: Any, kwargs: dict) -> None:
    """``checkpoint.save``'s hand-over: a DCP folder for sharded models or ``format="dcp"``,
    else the replicated model written once (``rank``)."""
    if _runtime._wrapper_attr(model) is not None:  # the warning points at the caller's save()
        warnings.warn(f"Model of type {type(model).__name__} is wrapped; unwrapping it to save.", stacklevel=3)
        model = _runtime.unwrap(model, "force")
    if format == "dcp" or is_sharded(model):
        save_folder(model, f, kwargs, format)
    else:
        save_replicated(model, f, format=format, rank=rank, kwargs=kwargs)


# ---- collectives without pickle ---------------------------------------------------------------


def _broadcast_int(value: int, src: int) -> int:
    """``value`` of rank ``src`` on every rank (one int64 tensor; gloo and NCCL alike)."""
    import torch.distributed as dist

    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=src)
    return int(t.item())


def _all_max(value: int) -> int:
    import torch.distributed as dist

    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _name(f: Any) -> str:
    from .checkpoint import describe_file

    return describe_file(f)


# ---- replicated models: write once --------------------------------------------------------------


def save_replicated(model: nn.Module, f: Any, *, format: str | None, rank: Any, kwargs: dict) -> None:
    """Save a replicated model once under a process group, then a barrier with the outcome.

    ``rank``: the writing rank (default 0).  Every rank calls this; the writer writes
    ``f`` through the usual crash-safe path, then tells every rank whether it worked:
    the others return once the file is complete, or raise CheckpointError when the
    writer failed (the writer raises its own error).
    """
    from .checkpoint import CheckpointError, save

    me, world = _rank_world()
    if rank is None:
        rank = 0
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"save(rank={rank!r}): the writing rank must be an int in 0..{world - 1}, or 'all'.")
    error: BaseException | None = None
    if me == rank:
        try:
            save(model, f, format=format, rank="all", **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported to every rank, then re-raised
            error = exc
    failed = _broadcast_int(int(error is not None), src=rank)
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(
            f"save: rank {rank} failed to write {_name(f)} (its own error says why); nothing was written."
        )


# ---- DCP folders: safe reading ------------------------------------------------------------------

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
        "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint._extension": {"ExtensionRegistry"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch dtypes and torch.Size: nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not one of DCP's metadata classes")


def read_metadata(folder: Any) -> Any:
    """DCP's ``Metadata`` of ``folder``, through the restricted unpickler; CheckpointError naming it."""
    from torch.distributed.checkpoint.metadata import Metadata

    from .checkpoint import CheckpointError

    path = os.path.join(os.fspath(folder), METADATA_FILE)
    try:
        with open(path, "rb") as fh:
            meta = _MetadataUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError,
            KeyError, ImportError, MemoryError) as exc:
        raise CheckpointError(
            f"{path!r} is not a readable DCP metadata file ({type(exc).__name__}: {exc}); nothing was loaded."
        ) from exc
    if not isinstance(meta, Metadata):
        raise CheckpointError(f"{path!r} holds a {type(meta).__name__}, not DCP's Metadata; nothing was loaded.")
    if not isinstance(meta.state_dict_metadata, dict) or not isinstance(meta.storage_data, dict):
        raise CheckpointError(f"{path!r}: DCP metadata without its item tables; nothing was loaded.")
    for index, info in meta.storage_data.items():
        name = getattr(info, "relative_path", None)
        # a data file is a plain name inside the folder: never a path that leaves it
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise CheckpointError(
                f"{path!r}: item {getattr(index, 'fqn', index)!r} names the data file {name!r}, which is not a "
                "file of this folder; nothing was loaded."
            )
        for field in ("offset", "length"):
            value = getattr(info, field, None)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CheckpointError(
                    f"{path!r}: item {getattr(index, 'fqn', index)!r} has {field} {value!r}; nothing was loaded."
                )
    return meta


def _items(meta: Any) -> list[tuple[str, str, list[int], int]]:
    """(name, dtype, global shape, bytes) of every tensor a DCP folder holds."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = []
    for name, md in meta.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            dtype = md.properties.dtype
            numel = 1
            for n in md.size:
                numel *= int(n)
            out.append((name, str(dtype).replace("torch.", ""), list(md.size), numel * dtype.itemsize))
    return out


def folder_facts(folder: Any) -> dict[str, Any]:
    """What a DCP folder holds, from its metadata and file sizes (no tensor is read):
    ``tensors`` [(name, dtype, shape, bytes)], ``other_items``, ``data_files``,
    ``size_bytes`` and ``state`` (the decoded modelopt state)."""
    meta = read_metadata(folder)
    tensors = _items(meta)
    files = sorted({info.relative_path for info in meta.storage_data.values()})
    size = sum(e.stat().st_size for e in os.scandir(folder) if e.is_file())
    return {
        "tensors": tensors,
        "other_items": len(meta.state_dict_metadata) - len(tensors),
        "data_files": files,
        "size_bytes": size,
        "state": read_folder_state(folder),
    }


def check_folder(folder: Any) -> str:
    """Check a DCP folder fully (CheckpointError naming what is wrong); returns what was checked.

    The metadata (restricted unpickler), every item's bytes present in its data file,
    the modelopt state decoding, and every item loaded (weights_only) with the dtype
    and shape the metadata gives.
    """
    from .checkpoint import CheckpointError

    meta = read_metadata(folder)
    sizes: dict[str, int] = {}
    for index, info in meta.storage_data.items():
        path = os.path.join(os.fspath(folder), info.relative_path)
        if info.relative_path not in sizes:
            try:
                sizes[info.relative_path] = os.stat(path).st_size
            except FileNotFoundError:
                raise CheckpointError(f"{os.fspath(folder)!r}: data file {info.relative_path!r} is missing") from None
        if info.offset + info.length > sizes[info.relative_path]:
            raise CheckpointError(
                f"{os.fspath(folder)!r}: item {index.fqn!r} ends at byte {info.offset + info.length} of "
                f"{info.relative_path!r}, which has {sizes[info.relative_path]} bytes (truncated?)"
            )
    try:
        _, weights = load_folder(folder)
    except CheckpointError:
        raise
    except BaseException as exc:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"{os.fspath(folder)!r}: an item does not load ({_first_line(exc)})") from exc
    for name, dtype, shape, _ in _items(meta):
        t = weights.get(name)
        if not isinstance(t, torch.Tensor) or str(t.dtype).replace("torch.", "") != dtype or list(t.shape) != shape:
            raise CheckpointError(f"{os.fspath(folder)!r}: item {name!r} does not load as {dtype} {shape}")
    return (f"DCP metadata read (restricted unpickler), {len(meta.storage_data)} items in "
            f"{len(sizes)} data files present, every item loads (weights_only=True), modelopt_state decodes")


def _safe_reader(folder: Any) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:  # only the global .metadata is ours to read
                raise FileNotFoundError(f"{os.fspath(folder)!r}: no per-rank metadata")
            meta = read_metadata(folder)
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    return SafeReader(os.fspath(folder))


def _safe_planner(empty: bool = False) -> Any:
    """DCP's load planner, but non-tensor items are loaded with weights_only=True."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    base = _EmptyStateDictLoadPlanner if empty else DefaultLoadPlanner

    class SafePlanner(base):  # type: ignore[misc, valid-type]
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True, map_location="cpu")
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()


def read_folder_state(folder: Any) -> Any:
    """The modelopt state of a DCP folder written by ``save`` (decoded, layout checked)."""
    from .checkpoint import CheckpointError, validate_modelopt_state

    path = os.path.join(os.fspath(folder), STATE_FILE)
    try:
        with open(path, "rb") as fh:
            blob = fh.read()
    except FileNotFoundError:
        raise CheckpointError(
            f"{os.fspath(folder)!r} is a DCP checkpoint folder without {STATE_FILE}: it was not written "
            "by modelopt_c's save (load plain DCP folders with torch.distributed.checkpoint.load)."
        ) from None
    state = _conversion.decode_state(blob, source=path)
    try:
        validate_modelopt_state(state)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path!r}: {exc}") from exc
    return state


def load_folder(folder: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(modelopt_state, full state dict) of a DCP folder, in this process (no collectives).

    Every tensor is gathered whole on the CPU: for conversion and inspection, not
    for models too large for one host's memory.
    """
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state = read_folder_state(folder)
    weights: dict[str, Any] = {}
    # what torch's own format_utils.dcp_to_torch_save does, with our reader and planner
    _load_state_dict(weights, storage_reader=_safe_reader(folder), planner=_safe_planner(empty=True), no_dist=True)
    return state, weights


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when there is no process group: so do we."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# ---- DCP folders: writing -----------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the filesystem cannot exchange
        return False
    raise OSError(err, os.strerror(err), a)


def _swap_in(tmp: str, target: str) -> None:
    """Make the complete folder ``tmp`` the checkpoint at ``target``; the old one goes."""
    parent = os.path.dirname(target) or "."
    if not os.path.lexists(target):
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old checkpoint
    else:  # two renames: a crash between them leaves the old folder beside the target, whole
        old = tmp + ".old"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(parent)


def _check_target(folder: str) -> None:
    from .checkpoint import CheckpointError

    if os.path.isfile(folder) or (os.path.lexists(folder) and not os.path.isdir(folder)):
        raise CheckpointError(
            f"{folder!r} exists and is not a folder: a sharded model saves to a folder (DCP); "
            "pick another path or remove it."
        )
    if os.path.isdir(folder) and os.listdir(folder) and not is_dcp_folder(folder):
        raise CheckpointError(
            f"{folder!r} is a folder that holds something other than a DCP checkpoint: "
            "save will not replace it; pick another path or empty it."
        )


def _remove_stale(folder: str, keep: str) -> None:
    """Temp folders of earlier saves to the same target that were killed midway."""
    parent = os.path.dirname(folder) or "."
    prefix = "." + os.path.basename(folder) + _TMP_TAG
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if name.startswith(prefix) and path != keep:
            shutil.rmtree(path, ignore_errors=True)


def save_folder(model: nn.Module, f: Any, kwargs: dict, format: str | None = None) -> None:
    """Write ``model`` (sharded or not) as a DCP folder with its modelopt state; see the module doc."""
    if not isinstance(f, (str, os.PathLike)):
        raise TypeError(
            f"save: a sharded model (DTensor, FSDP2, tensor parallel) is saved to a folder path through "
            f"torch.distributed.checkpoint, not to a {type(f).__name__}."
        )
    if kwargs:
        raise TypeError(f"save of a DCP folder takes no torch.save options; got {sorted(kwargs)}.")
    if format not in (None, "dcp"):
        raise TypeError(
            f"save(format={format!r}): a sharded model (DTensor, FSDP2, tensor parallel) is saved as a DCP "
            "folder (format='dcp' or no format); to write one file, save the gathered model "
            "(full_tensor()) or convert the folder: python -m modelopt_c convert FOLDER FILE."
        )
    write_folder(f, model.state_dict(), _conversion.modelopt_state(model))


def write_folder(f: Any, weights: dict[str, Any], state: Any) -> None:
    """Write ``weights`` (each rank its shards, under a process group) and ``state`` as a
    DCP folder at ``f``: in a temp folder beside it, swapped in once every rank finished."""
    import torch.distributed.checkpoint as dcp

    from .checkpoint import CheckpointError

    folder = os.path.abspath(os.fspath(f))
    _check_target(folder)
    blob = _conversion.encode_state(state)
    pg = process_group_active()
    me, world = _rank_world()
    token = secrets.randbits(62)
    if pg and world > 1:
        token = _broadcast_int(token, src=0)
    tmp = os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}{_TMP_TAG}{token:016x}")
    error: BaseException | None = None
    try:
        with _quiet_single_process():
            dcp.save(weights, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), no_dist=not pg)
    except (Exception, dcp.CheckpointException) as exc:  # noqa: BLE001 - reworded below, on every rank
        error = exc
    if error is None and me == 0:
        try:  # every rank's shards are written (DCP's last step gathers them): finish and swap in
            with open(os.path.join(tmp, STATE_FILE), "wb") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            _swap_in(tmp, folder)
            _remove_stale(folder, keep=folder)
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            error = exc
    status = int(error is not None)
    if pg and world > 1 and not _is_comm_error(error):
        try:  # every rank learns whether any failed (rank 0's swap included)
            status = _all_max(status)
        except Exception as exc:  # noqa: BLE001 - a peer is gone
            error = error or exc
            status = 1
    if status or error is not None:
        if me == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        why = f"{type(error).__name__}: {_first_line(error)}" if error is not None else "rank 0 failed"
        raise CheckpointError(
            f"saving the sharded checkpoint {folder!r} failed on rank {me} of {world} ({why}); "
            f"{folder!r} was not changed (a previous checkpoint there is still whole)."
        ) from error


def _first_line(exc: BaseException | None) -> str:
    """An exception's message on one line; for DCP's CheckpointException, the first rank's own error."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, failure = sorted(failures.items(), key=lambda kv: kv[0])[0]
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {type(inner).__name__}: {_first_line(inner)}"
    text = " ".join(str(exc).split()) if exc is not None else ""
    return text[:400] + (" ..." if len(text) > 400 else "")


def _is_comm_error(exc: BaseException | None) -> bool:
    """Whether a failure came from the process group itself (a peer gone, a timeout):
    then no further collective can be trusted to finish."""
    if exc is None:
        return False
    text = str(exc)
    for e in (exc, getattr(exc, "__cause__", None)):
        if e is not None and type(e).__name__ in ("DistBackendError", "DistNetworkError", "DistStoreError"):
            return True
    return any(s in text for s in ("Connection closed by peer", "Timed out", "timed out", "Connection reset"))


# ---- DCP folders: restoring ---------------------------------------------------------------------


def restore_folder(model: Any, f: Any, kwargs: dict) -> nn.Module:
    """Restore a DCP folder written by ``save``: replay the modes, then DCP-load the weights.

    Every rank of the process group calls it (DCP's load is collective); the folder
    may come from another world size or mesh.  Without a process group the model
    loads whole in this process.  The modes' replay is transactional as usual; a
    failing weight load after it leaves the modes applied (the error says so).
    """
    import torch.distributed.checkpoint as dcp

    from .checkpoint import CheckpointError

    kwargs = dict(kwargs)
    kwargs.pop("verify", None)  # DCP has no checksums; `python -m modelopt_c verify` reads every item
    kwargs.pop("map_location", None)  # the tensors land on the model's own devices
    if kwargs:
        raise TypeError(f"restore of a DCP folder takes no options {sorted(kwargs)}.")
    model = _runtime.unwrap(_runtime.as_module(model), "raise")
    folder = os.fspath(f)
    state = read_folder_state(folder)
    read_metadata(folder)  # a damaged .metadata fails before the modes are replayed
    model = _conversion._restore_from_state(model, state)
    weights = model.state_dict()
    try:
        with _quiet_single_process():
            dcp.load(weights, storage_reader=_safe_reader(folder), planner=_safe_planner(),
                     no_dist=not process_group_active())
        model.load_state_dict(weights)
    except (RuntimeError, ValueError, KeyError, dcp.CheckpointException) as exc:
        raise CheckpointError(
            f"{folder!r}: the modes were replayed but the weights could not be loaded "
            f"({_first_line(exc) if hasattr(exc, 'failures') else type(exc).__name__ + ': ' + _first_line(exc)})."
        ) from exc
    return model
