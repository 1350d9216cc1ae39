"""Periodic training checkpoints: the rest of a training state beside the model.

``save(model, path, extra={...})`` stores ``extra`` (optimizer and scheduler state
dicts, the step, RNG states: anything made of tensors, numbers, strings, bytes,
lists, tuples and dicts) in the same crash-safe file as the model:

* torch format: as further top-level keys beside ``modelopt_state`` and
  ``model_state_dict`` -- nvidia-modelopt's ``restore`` reads its two keys and
  ignores the others, so the file stays its checkpoint;
* the safetensors-compatible format: the tensors as ``__modelopt_extra__.<i>``, the
  rest as the state codec's msgpack (base64) under the metadata key ``extra``
  (docs/FORMAT.md); our restore leaves both out of the model's weights.

``load_extra(path)`` reads it back, safely (weights_only for the torch format).
``keep_last=N`` keeps the newest N checkpoints of a numbered series
(``ckpt-000120.pt``: the number is the last run of digits of the name).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from typing import Any

from . import _conversion
from .checkpoint import CheckpointError, describe_file, map_tensors, restore_location, sniff_format, torch_load_checked

__all__ = ["EXTRA_PREFIX", "checkpoint_series", "load_extra", "rotate"]

EXTRA_PREFIX = "__modelopt_extra__."
EXTRA_METADATA_KEY = "extra"
_RESERVED = ("modelopt_state", "model_state_dict")


def check_extra(extra: Any) -> dict[str, Any]:
    """``extra`` as a dict with str keys, none of them the checkpoint's own."""
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict (e.g. {{'optimizer': opt.state_dict(), 'step': step}}), "
                        f"not {type(extra).__name__}.")
    for key in extra:
        if not isinstance(key, str):
            raise TypeError(f"extra's keys must be str; got {key!r}.")
        if key in _RESERVED:
            raise ValueError(f"extra key {key!r} is the checkpoint's own (modelopt_state, model_state_dict); "
                             "use another name.")
    return extra


def torch_checkpoint(state: dict, weights: dict, extra: dict[str, Any] | None) -> dict[str, Any]:
    """The object torch.save writes: nvidia-modelopt's two keys, then the extra ones."""
    ckpt = {"modelopt_state": state, "model_state_dict": weights}
    if extra:
        ckpt.update(check_extra(extra))
    return ckpt


def encode_extra(extra: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """(metadata text, tensors by reserved name) of ``extra`` for the safetensors format."""
    tensors: list[Any] = []
    check_extra(extra)
    try:
        payload = _conversion.encode_state(extra, tensors)
    except (TypeError, OverflowError) as exc:
        raise TypeError(f"{where}: extra cannot be stored in the safetensors-compatible format: {exc} "
                        "(save to a .pt path for the torch format, which takes anything weights_only loads).") from exc
    names = {f"{EXTRA_PREFIX}{i}": t for i, t in enumerate(tensors)}
    return base64.b64encode(bytes(payload)).decode("ascii"), names


def split_extra(tensors: dict[str, Any]) -> tuple[dict[int, Any], dict[str, Any]]:
    """The extra tensors (by index) out of a safetensors file's tensors, and the rest."""
    extra: dict[int, Any] = {}
    rest: dict[str, Any] = {}
    for name, tensor in tensors.items():
        if name.startswith(EXTRA_PREFIX):
            index = name[len(EXTRA_PREFIX):]
            if not index.isdigit() or str(int(index)) != index:
                raise CheckpointError(f"bad reserved tensor name {name!r}")
            extra[int(index)] = tensor
        else:
            rest[name] = tensor
    return extra, rest


def decode_extra(metadata: dict[str, str], extra_tensors: dict[int, Any], where: str) -> dict[str, Any]:
    text = metadata.get(EXTRA_METADATA_KEY)
    if text is None:
        if extra_tensors:
            raise CheckpointError(f"{where}: {EXTRA_PREFIX}<i> tensors without the 'extra' metadata")
        return {}
    if sorted(extra_tensors) != list(range(len(extra_tensors))):
        raise CheckpointError(f"{where}: the {EXTRA_PREFIX}<i> tensors are not numbered 0..{len(extra_tensors) - 1}")
    try:
        payload = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise CheckpointError(f"{where}: 'extra' is not valid base64 ({exc})") from None
    try:
        value = _conversion.decode_state(payload, [extra_tensors[i] for i in range(len(extra_tensors))])
    except ValueError as exc:
        raise CheckpointError(f"{where}: extra: {exc}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: extra is a {type(value).__name__}, not a dict")
    return value


def load_extra(f: Any, **kwargs: Any) -> dict[str, Any]:
    """What ``save(..., extra=...)`` stored with the model ({} when nothing was).

    Loaded safely: torch-format files with weights_only=True (``map_location`` 'cpu'
    unless given; pass ``weights_only=False`` only for a trusted file), the
    safetensors format through its validating reader (``verify``: checksums, on by
    default; ``map_location`` in every form torch.load takes places its tensors, saved at 'cpu').  Every defect of the file is a CheckpointError naming it.
    """
    name = describe_file(f)
    kind = sniff_format(f, "load_extra")
    if kind == "safetensors":
        from . import st_format

        restore = restore_location(kwargs.pop("map_location", None), name)  # checked before the file is read
        metadata, tensors = _conversion.st_read(f, verify=kwargs.pop("verify", True), _verify_if_present=True)
        extra_tensors, _ = split_extra(tensors)
        if metadata.get("format") != st_format.FORMAT_NAME:
            raise CheckpointError(f"{name}: a plain safetensors file, not a modelopt_c checkpoint: it holds no extra")
        extra_tensors = map_tensors(extra_tensors, restore)  # e.g. an optimizer's state onto the GPU
        return decode_extra(metadata, extra_tensors, os.fspath(f))
    if kind is None:
        raise CheckpointError(f"{name} is not a checkpoint (neither torch's format nor safetensors): nothing was loaded.")
    kwargs.pop("verify", None)
    obj = torch_load_checked(f, kwargs)
    if not (isinstance(obj, dict) and "model_state_dict" in obj and "modelopt_state" in obj):
        raise CheckpointError(f"{name} is not a modelopt checkpoint written by save(): it holds no extra")
    return {k: v for k, v in obj.items() if k not in _RESERVED}


# ---- keep_last ---------------------------------------------------------------------------

_NUMBER = re.compile(r"\d+")


def checkpoint_series(path: Any) -> list[tuple[int, str]]:
    """The files of ``path``'s numbered series in its folder, as (number, path), oldest first.

    The series: names equal to ``path``'s except for its last run of digits
    (``ckpt-000120.pt`` -> ``ckpt-<n>.pt``).  Hidden temp files are never part of it.
    """
    folder, base = os.path.split(os.fspath(path))
    matches = list(_NUMBER.finditer(base))
    if not matches:
        raise ValueError(f"keep_last needs a numbered file name such as 'ckpt-{{step}}.pt'; {base!r} has no number.")
    last = matches[-1]
    pattern = re.compile(re.escape(base[: last.start()]) + r"(\d+)" + re.escape(base[last.end():]) + r"\Z")
    series = []
    for entry in os.listdir(folder or "."):
        m = pattern.match(entry)
        if m and not entry.startswith("."):
            series.append((int(m.group(1)), os.path.join(folder, entry)))
    return sorted(series)


def rotate(path: Any, keep_last: int) -> list[str]:
    """After ``path`` was written: remove the oldest files of its series beyond the newest
    ``keep_last`` (by number; ``path`` itself is always kept).  Returns the removed paths."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be a positive int, not {keep_last!r}.")
    series = checkpoint_series(path)
    target = os.path.abspath(os.fspath(path))
    removed = []
    for _, old in series[: max(0, len(series) - keep_last)]:
        if os.path.abspath(old) == target:
            continue
        try:
            os.unlink(old)
            removed.append(old)
        except FileNotFoundError:  # another process rotated it already
            pass
    return removed
