"""The safetensors-compatible checkpoint format (docs/FORMAT.md), Python face.

The bytes are written and read by the native ``st_write`` / ``st_read``; this module
only puts the modelopt state in the header (msgpack via the native state codec,
base64 text) and its tensors under the reserved prefix.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any, BinaryIO, Callable, Union

from . import _conversion
from ._runtime import BUFFER_PREFIX
from .checkpoint import CheckpointError, kind_of_head, sniff_format

FORMAT_NAME = "modelopt_c"
# "1": weights and modelopt state.  "2" (written only when used): also non-persistent
# buffers (BUFFER_PREFIX) and tied tensors stored once ("aliases" in the metadata).
FORMAT_VERSION = "2"
FORMAT_VERSIONS = ("1", "2")
RESERVED_PREFIX = "__modelopt_state__."

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "BUFFER_PREFIX",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "RESERVED_PREFIX",
    "check_file",
    "is_safetensors_file",
    "load_file",
    "read_header",
    "save_file",
]


def _identity(tensor: Any) -> tuple | None:
    """What makes two state-dict entries one tensor (tied weights): same memory, same view."""
    if not hasattr(tensor, "data_ptr") or tensor.is_meta or tensor.numel() == 0 or type(tensor).__name__ == "DTensor":
        return None
    try:
        ptr = tensor.data_ptr()
    except (RuntimeError, TypeError):  # sparse, nested, subclasses: the writer says what is wrong
        return None
    return (tensor.device, ptr, tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))


def save_file(
    path: PathLike,
    state_dict: dict[str, Any],
    modelopt_state: dict[str, Any],
    *,
    progress: Callable[[int, int], object] | None = None,
    buffers: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``state_dict`` and ``modelopt_state`` to ``path`` crash-safely.

    Tensors inside ``modelopt_state`` are stored as ``__modelopt_state__.<i>``;
    the model's weights keep their state_dict names.  An entry that is the same tensor
    as an earlier one (tied weights) is stored once, its name listed in the metadata's
    ``aliases``; ``buffers`` (non-persistent buffers, by key) are stored as
    ``__modelopt_buffer__.<key>``; ``extra`` (periodic.py): its tensors as
    ``__modelopt_extra__.<i>``, the rest in the metadata.  Any of the three makes the
    file format_version "2".
    """
    from .periodic import EXTRA_METADATA_KEY, EXTRA_PREFIX, encode_extra

    where = os.fspath(path)
    extras: list[Any] = []
    payload = _conversion.encode_state(modelopt_state, extras)
    tensors: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state_dict.items():
        if isinstance(name, str) and name.startswith((RESERVED_PREFIX, BUFFER_PREFIX, EXTRA_PREFIX)):
            prefix = next(p for p in (RESERVED_PREFIX, BUFFER_PREFIX, EXTRA_PREFIX) if name.startswith(p))
            raise CheckpointError(f"{where}: state_dict key {name!r} uses the reserved prefix {prefix!r}")
        ident = _identity(tensor)
        if ident is not None and ident in seen:
            aliases[name] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = name
        tensors[name] = tensor
    for i, tensor in enumerate(extras):
        tensors[f"{RESERVED_PREFIX}{i}"] = tensor
    for name, tensor in (buffers or {}).items():
        tensors[f"{BUFFER_PREFIX}{name}"] = tensor
    metadata = {
        "format": FORMAT_NAME,
        "format_version": "2" if aliases or buffers or extra else "1",
        "modelopt_state": base64.b64encode(bytes(payload)).decode("ascii"),
    }
    if aliases:
        metadata["aliases"] = json.dumps(aliases, separators=(",", ":"))
    if extra:
        metadata[EXTRA_METADATA_KEY], extra_tensors = encode_extra(extra, where)
        tensors.update(extra_tensors)
    _conversion.st_write(path, tensors, metadata, progress=progress)


def split_tensors(
    tensors: dict[str, Any], where: str = "", buffers: dict[str, Any] | None = None
) -> tuple[list[Any], dict[str, Any]]:
    """Split a file's tensors into the modelopt-state extras (by index) and the state_dict.

    The ``__modelopt_buffer__.`` tensors go to ``buffers`` (by key) when given, else are dropped."""
    extras: dict[int, Any] = {}
    state_dict: dict[str, Any] = {}
    for name, tensor in tensors.items():
        if name.startswith(RESERVED_PREFIX):
            index = name[len(RESERVED_PREFIX):]
            if not index.isdigit() or str(int(index)) != index:
                raise CheckpointError(f"{where}: bad reserved tensor name {name!r}")
            extras[int(index)] = tensor
        elif name.startswith(BUFFER_PREFIX):
            if buffers is not None:
                buffers[name[len(BUFFER_PREFIX):]] = tensor
        else:
            state_dict[name] = tensor
    if sorted(extras) != list(range(len(extras))):
        raise CheckpointError(f"{where}: the {RESERVED_PREFIX}<i> tensors are not numbered 0..{len(extras) - 1}")
    return [extras[i] for i in range(len(extras))], state_dict


def add_aliases(metadata: dict[str, str], state_dict: dict[str, Any], where: str) -> None:
    """Put the tied names of the metadata's ``aliases`` back: each the very tensor of its target."""
    text = metadata.get("aliases")
    if text is None:
        return
    try:
        aliases = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{where}: the metadata's 'aliases' is not JSON ({exc})") from None
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CheckpointError(f"{where}: the metadata's 'aliases' is not an object of name -> name")
    for alias, target in aliases.items():
        if alias in state_dict or alias.startswith((RESERVED_PREFIX, BUFFER_PREFIX)):
            raise CheckpointError(f"{where}: alias {alias!r} names a tensor the file also stores")
        if target not in state_dict:
            raise CheckpointError(f"{where}: alias {alias!r} points to {target!r}, which the file does not store")
    for alias, target in aliases.items():
        state_dict[alias] = state_dict[target]


def decode_metadata_state(metadata: dict[str, str], extras: list[Any], where: str) -> Any:
    """The modelopt state stored in a modelopt_c file's ``__metadata__``."""
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{where}: not a modelopt_c checkpoint (its __metadata__ has no \"format\": \"{FORMAT_NAME}\"); "
            "it is a plain safetensors file: load its tensors with safetensors.torch.load_file"
        )
    version = metadata.get("format_version")
    if version not in FORMAT_VERSIONS:
        known = " and ".join(map(repr, FORMAT_VERSIONS))
        raise CheckpointError(
            f"{where}: format_version {version!r} is not supported (this modelopt_c reads {known}); upgrade modelopt_c"
        )
    text = metadata.get("modelopt_state")
    if text is None:
        raise CheckpointError(f"{where}: the metadata has no 'modelopt_state'")
    try:
        payload = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise CheckpointError(f"{where}: 'modelopt_state' is not valid base64 ({exc})") from None
    try:
        return _conversion.decode_state(payload, extras)
    except ValueError as exc:  # StateDecodeError: the file's state is malformed
        raise CheckpointError(f"{where}: modelopt_state: {exc}") from exc


def load_file(
    path: PathLike, verify: bool = True, plain: bool = False, buffers: bool = False
) -> tuple[Any, dict[str, Any]]:
    """Read a modelopt_c safetensors file: ``(modelopt_state, state_dict)``.

    The tensors are CPU tensors over a copy-on-write mapping of the file (zero-copy).
    ``verify=True`` (the default) checks every tensor's XXH64 checksum against the
    mapped bytes before returning (one extra read of the data, from the page cache
    when warm); ``verify=False`` skips it. Every defect of the file raises
    :class:`CheckpointError` naming the file.  ``plain=True`` also reads a plain
    safetensors file (not written by modelopt_c): its modelopt_state is then None.
    Tied names stored once come back as the same tensor; the non-persistent buffers
    are left out unless ``buffers=True`` (then under ``BUFFER_PREFIX``, as restore wants).
    """
    from .periodic import split_extra

    where = os.fspath(path)
    metadata, tensors = _conversion.st_read(path, verify=verify, _verify_if_present=True)
    _, tensors = split_extra(tensors)  # a training state saved beside the model: load_extra's
    found: dict[str, Any] = {}
    extras, state_dict = split_tensors(tensors, where, found)
    if plain and metadata.get("format") != FORMAT_NAME:
        return None, state_dict
    state = decode_metadata_state(metadata, extras, where)
    if verify and "checksums" not in metadata:
        # modelopt_c's writer always stores them: this file was made or altered elsewhere
        raise CheckpointError(
            f"{where}: the file has no checksums to verify (modelopt_c always writes them, so it was altered "
            "or made by another tool); pass verify=False to load it unchecked"
        )
    add_aliases(metadata, state_dict, where)
    if buffers:
        state_dict.update((BUFFER_PREFIX + k, v) for k, v in found.items())
    return state, state_dict


def check_file(path: PathLike) -> None:
    """Read every tensor of a safetensors file and check its stored XXH64 checksum."""
    _conversion.st_read(path, verify=True)


def read_header(path: PathLike) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...], int, int]], int]:
    """Validate the header only: ``(metadata, {name: (dtype, shape, begin, end)}, data_start)``."""
    return _conversion.st_read_header(path)


Source = Union[PathLike, bytes, bytearray, memoryview, BinaryIO]


def _kind(source: Source) -> str | None:
    """checkpoint.sniff_format of a path or file object, or of the bytes themselves."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return kind_of_head(bytes(source[:16]))
    try:
        return sniff_format(source, "read")
    except (OSError, ValueError):  # missing, unreadable, not a regular file (CheckpointError)
        return None


def is_safetensors_file(source: Source) -> bool:
    """Whether ``source`` (a path, a binary file object or its first bytes) looks like safetensors:
    a plausible 8-byte little-endian header length, then ``{`` (checkpoint.sniff_format)."""
    return _kind(source) == "safetensors"


def is_torch_zip(source: Source) -> bool:
    """Whether ``source`` starts like a zip archive, the container of ``torch.save``."""
    return _kind(source) == "torch"
