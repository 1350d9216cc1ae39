"""The safetensors-compatible checkpoint format (docs/FORMAT.md), Python face.

The bytes are written and read by the native ``st_write`` / ``st_read``; this module
only puts the modelopt state in the header (msgpack via the native state codec,
base64 text) and its tensors under the reserved prefix.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any, BinaryIO, Callable, Union

from . import _conversion
from .checkpoint import CheckpointError, kind_of_head, sniff_format

FORMAT_NAME = "modelopt_c"
FORMAT_VERSION = "1"
RESERVED_PREFIX = "__modelopt_state__."

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "RESERVED_PREFIX",
    "check_file",
    "is_safetensors_file",
    "load_file",
    "read_header",
    "save_file",
]


def save_file(
    path: PathLike,
    state_dict: dict[str, Any],
    modelopt_state: dict[str, Any],
    *,
    progress: Callable[[int, int], object] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``state_dict`` and ``modelopt_state`` to ``path`` crash-safely.

    Tensors inside ``modelopt_state`` are stored as ``__modelopt_state__.<i>``;
    the model's weights keep their state_dict names.  ``extra`` (periodic.py): its
    tensors as ``__modelopt_extra__.<i>``, the rest in the metadata.
    """
    from .periodic import EXTRA_METADATA_KEY, EXTRA_PREFIX, encode_extra

    extras: list[Any] = []
    payload = _conversion.encode_state(modelopt_state, extras)
    tensors: dict[str, Any] = {}
    for name, tensor in state_dict.items():
        for prefix in (RESERVED_PREFIX, EXTRA_PREFIX):
            if isinstance(name, str) and name.startswith(prefix):
                raise CheckpointError(f"{os.fspath(path)}: state_dict key {name!r} uses the reserved prefix {prefix!r}")
        tensors[name] = tensor
    for i, tensor in enumerate(extras):
        tensors[f"{RESERVED_PREFIX}{i}"] = tensor
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "modelopt_state": base64.b64encode(bytes(payload)).decode("ascii"),
    }
    if extra:
        metadata[EXTRA_METADATA_KEY], extra_tensors = encode_extra(extra, os.fspath(path))
        tensors.update(extra_tensors)
    _conversion.st_write(path, tensors, metadata, progress=progress)


def split_tensors(tensors: dict[str, Any], where: str = "") -> tuple[list[Any], dict[str, Any]]:
    """Split a file's tensors into the modelopt-state extras (by index) and the state_dict."""
    extras: dict[int, Any] = {}
    state_dict: dict[str, Any] = {}
    for name, tensor in tensors.items():
        if name.startswith(RESERVED_PREFIX):
            index = name[len(RESERVED_PREFIX):]
            if not index.isdigit() or str(int(index)) != index:
                raise CheckpointError(f"{where}: bad reserved tensor name {name!r}")
            extras[int(index)] = tensor
        else:
            state_dict[name] = tensor
    if sorted(extras) != list(range(len(extras))):
        raise CheckpointError(f"{where}: the {RESERVED_PREFIX}<i> tensors are not numbered 0..{len(extras) - 1}")
    return [extras[i] for i in range(len(extras))], state_dict


def decode_metadata_state(metadata: dict[str, str], extras: list[Any], where: str) -> Any:
    """The modelopt state stored in a modelopt_c file's ``__metadata__``."""
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{where}: not a modelopt_c checkpoint (its __metadata__ has no \"format\": \"{FORMAT_NAME}\"); "
            "it is a plain safetensors file: load its tensors with safetensors.torch.load_file"
        )
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: format_version {version!r} is not supported (this modelopt_c reads {FORMAT_VERSION!r}); "
            "upgrade modelopt_c"
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


def load_file(path: PathLike, verify: bool = True, plain: bool = False) -> tuple[Any, dict[str, Any]]:
    """Read a modelopt_c safetensors file: ``(modelopt_state, state_dict)``.

    The tensors are CPU tensors over a copy-on-write mapping of the file (zero-copy).
    ``verify=True`` (the default) checks every tensor's XXH64 checksum against the
    mapped bytes before returning (one extra read of the data, from the page cache
    when warm); ``verify=False`` skips it. Every defect of the file raises
    :class:`CheckpointError` naming the file.  ``plain=True`` also reads a plain
    safetensors file (not written by modelopt_c): its modelopt_state is then None.
    """
    from .periodic import split_extra

    where = os.fspath(path)
    metadata, tensors = _conversion.st_read(path, verify=verify, _verify_if_present=True)
    _, tensors = split_extra(tensors)  # a training state saved beside the model: load_extra's
    extras, state_dict = split_tensors(tensors, where)
    if plain and metadata.get("format") != FORMAT_NAME:
        return None, state_dict
    state = decode_metadata_state(metadata, extras, where)
    if verify and "checksums" not in metadata:
        # modelopt_c's writer always stores them: this file was made or altered elsewhere
        raise CheckpointError(
            f"{where}: the file has no checksums to verify (modelopt_c always writes them, so it was altered "
            "or made by another tool); pass verify=False to load it unchecked"
        )
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
