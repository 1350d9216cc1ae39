"""What a model or a checkpoint holds, in words and tables: ``describe()``, the CLI's
``inspect`` report, and the rich displays (IPython ``_repr_pretty_``, Jupyter
``_repr_html_``) of the state manager and of a summary.

Reading a file here loads no code (the library's safe loaders) and maps, never copies.
``python -m modelopt_c inspect`` prints :func:`format_text` of :func:`inspect_file`;
``describe(path)`` returns a :class:`Summary` of the same dict.
"""

from __future__ import annotations

import collections
import html
import io
import json
import os
from typing import Any, TextIO

from . import st_format
from .checkpoint import CheckpointError, load_checkpoint, sniff_format, torch_load_checked

__all__ = ["Summary", "describe", "format_text", "inspect_file", "inspect_model"]

KIND_TORCH = "torch"
KIND_OURS = "modelopt_c safetensors"
KIND_PLAIN = "safetensors"
KIND_UNKNOWN = "unknown"
KIND_DCP = "dcp folder"

def _torch():
    import torch

    return torch


def detect_kind(path: str) -> str:
    """The checkpoint kind of ``path``, from its first bytes (never its name): the
    library's sniffer, then the safetensors metadata for ours or a plain file."""
    kind = sniff_format(path, "read")
    if kind == "torch":
        return KIND_TORCH
    if kind == "safetensors":
        return KIND_OURS if _meta(path).get("format") == st_format.FORMAT_NAME else KIND_PLAIN
    return KIND_UNKNOWN  # a legacy (pre-zip) torch file too: its records cannot be checked


def load_torch_safely(path: str, mmap: bool = True) -> Any:
    """The library's safe ``torch.load`` (``weights_only=True``), as restore loads: every
    failure of a damaged file is a CheckpointError naming it, a refusal says so."""
    return torch_load_checked(path, {} if mmap else {"mmap": False})

def _meta(path: str) -> dict[str, str]:
    try:
        return st_format.read_header(path)[0]
    except ValueError:
        return {}


# ---- inspect ---------------------------------------------------------------------------


def _tensor_facts(items: list[tuple[str, str, list[int], int]]) -> dict[str, Any]:
    hist = collections.Counter(dtype for _, dtype, _, _ in items)
    return {
        "count": len(items),
        "total_bytes": sum(nbytes for *_, nbytes in items),
        "dtypes": dict(sorted(hist.items())),
    }


def _torch_items(state_dict: dict[str, Any]) -> list[tuple[str, str, list[int], int]]:
    out = []
    for name, t in state_dict.items():
        if hasattr(t, "dtype") and hasattr(t, "shape"):
            out.append((name, str(t.dtype).replace("torch.", ""), list(t.shape), t.numel() * t.element_size()))
    return out


def _describe(value: Any) -> str:
    torch = _torch()
    if isinstance(value, torch.Tensor):
        return f"tensor {str(value.dtype).replace('torch.', '')} {list(value.shape)}"
    if isinstance(value, (dict, list, tuple, set)):
        return f"{type(value).__name__} of {len(value)}"
    if isinstance(value, (str, bytes)):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _modes(state: Any, path: str = "") -> tuple[str | None, list[dict[str, Any]]]:
    """(modelopt_version, modes) of a modelopt_state; CheckpointError when it has the wrong shape."""
    if state is None:
        return None, []
    where = f"{path}: modelopt_state" if path else "modelopt_state"
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} is {_a(state)}, not a dict")
    entries = state.get("modelopt_state_dict", [])
    if not isinstance(entries, (list, tuple)):
        raise CheckpointError(f"{where}['modelopt_state_dict'] is {_a(entries)}, not a list")
    modes = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise CheckpointError(f"{where}['modelopt_state_dict'][{i}] is {_a(entry)}, not a (name, state) pair")
        name, body = entry
        if not isinstance(name, str) or not isinstance(body, dict):
            raise CheckpointError(
                f"{where}['modelopt_state_dict'][{i}] is ({_a(name)}, {_a(body)}), not a (str, dict) pair")
        metadata = body.get("metadata", {})
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{where}: mode {name!r}: metadata is {_a(metadata)}, not a dict")
        modes.append(
            {
                "name": name,
                "config": _jsonable(body.get("config")),
                "metadata": {str(k): _describe(v) for k, v in metadata.items()},
            }
        )
    version = state.get("modelopt_version")
    return (version if version is None or isinstance(version, str) else repr(version)), modes


def _a(value: Any) -> str:
    """'a list', 'an int', 'None': a value's type, for messages."""
    if value is None:
        return "None"
    name = type(value).__name__
    return ("an " if name[:1] in "aeiou" else "a ") + name


def inspect_folder(path: str) -> dict[str, Any]:
    """What a DCP folder holds, from its metadata (no tensor is read)."""
    from . import distributed

    facts = distributed.folder_facts(path)
    info: dict[str, Any] = {"file": path, "format": KIND_DCP, "size_bytes": facts["size_bytes"]}
    info["data_files"] = facts["data_files"]
    info["modelopt_version"], info["modes"] = _modes(facts["state"], path)
    info["tensors"] = _tensor_facts(facts["tensors"])
    if facts["other_items"]:
        info["other_items"] = facts["other_items"]
    return info


def inspect_file(path: str) -> dict[str, Any]:
    """What is in a checkpoint, as a JSON-able dict (loads no code; maps, never copies)."""
    from . import distributed

    st = st_format
    if distributed.is_dcp_folder(path):
        return inspect_folder(path)
    kind = detect_kind(path)
    info: dict[str, Any] = {"file": path, "format": kind, "size_bytes": os.path.getsize(path)}
    if kind == KIND_TORCH:
        obj = load_torch_safely(path)
        state, state_dict = None, {}
        if isinstance(obj, dict) and "model_state_dict" in obj:
            state, state_dict = obj.get("modelopt_state"), obj["model_state_dict"]
            if not isinstance(state_dict, dict):
                raise CheckpointError(f"{path}: model_state_dict is {_a(state_dict)}, not a dict")
            info["keys"] = sorted(map(str, obj))
        elif isinstance(obj, dict):
            state_dict = {k: v for k, v in obj.items() if hasattr(v, "dtype")}
            info["keys"] = sorted(map(str, obj))
        else:
            raise CheckpointError(f"{path}: a torch file holding {_a(obj)}, not a modelopt checkpoint or a state dict")
        info["modelopt_version"], info["modes"] = _modes(state, path)
        info["tensors"] = _tensor_facts(_torch_items(state_dict))
        return info
    if kind in (KIND_OURS, KIND_PLAIN):
        try:
            metadata, header, data_start = st.read_header(path)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
        info["data_start"] = data_start
        info["metadata"] = {k: f"{len(v)} chars" for k, v in metadata.items()}
        from .periodic import EXTRA_PREFIX

        model = [
            (n, d, list(s), e - b) for n, (d, s, b, e) in header.items()
            if not n.startswith((st.RESERVED_PREFIX, st.BUFFER_PREFIX, EXTRA_PREFIX))
        ]
        training = [(n, d, list(s), e - b) for n, (d, s, b, e) in header.items() if n.startswith(EXTRA_PREFIX)]
        if training:
            info["extra_tensors"] = _tensor_facts(training)
        extras = [(n, d, list(s), e - b) for n, (d, s, b, e) in header.items() if n.startswith(st.RESERVED_PREFIX)]
        info["tensors"] = _tensor_facts(model)
        info["state_tensors"] = _tensor_facts(extras)
        buffers = [(n, d, list(s), e - b) for n, (d, s, b, e) in header.items() if n.startswith(st.BUFFER_PREFIX)]
        if buffers:  # version 2: non-persistent buffers (docs/FORMAT.md)
            info["buffer_tensors"] = _tensor_facts(buffers)
        info["checksums"] = metadata.get("checksum_algorithm", "none")
        if kind == KIND_OURS:
            info["format_version"] = metadata.get("format_version")
            try:
                state, _ = load_checkpoint(path, {"verify": False}, plain=True)
            except ValueError as exc:  # the safetensors reader's own errors
                raise CheckpointError(str(exc)) from exc
            info["modelopt_version"], info["modes"] = _modes(state, path)
        return info
    raise CheckpointError(f"{path}: neither a torch (zip) checkpoint nor a safetensors file")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_inspect(info: dict[str, Any], out: TextIO) -> None:
    w = lambda s="": print(s, file=out)  # noqa: E731
    if "file" in info:
        w(f"file:        {info['file']} ({_human(info['size_bytes'])})")
    else:  # describe(model), a manager's display
        w(f"model:       {info['model']}")
    if "format" in info:
        w(f"format:      {info['format']}" + (f" v{info['format_version']}" if info.get("format_version") else ""))
    if info.get("modelopt_version") is not None:
        w(f"modelopt:    {info['modelopt_version']}")
    if "keys" in info:
        w(f"keys:        {', '.join(info['keys'])}")
    if "data_files" in info:
        w(f"data files:  {len(info['data_files'])} ({', '.join(info['data_files'])})")
    if "metadata" in info:
        w("metadata:")
        for k, v in info["metadata"].items():
            w(f"  {k}: {v}")
        w(f"checksums:   {info['checksums']}")
    modes = info.get("modes") or []
    w(f"modes:       {len(modes)}")
    for i, mode in enumerate(modes):
        w(f"  [{i}] {mode['name']}")
        w(f"      config:   {json.dumps(mode['config'], sort_keys=True)}")
        for k, v in mode["metadata"].items():
            w(f"      metadata: {k}: {v}")
    if info.get("export_pending"):
        w("export pending: " + ", ".join(f"{m} needs {e}" for m, e in info["export_pending"]))
    if info.get("export_pending_unknown"):
        w(f"export pending: unknown ({info['export_pending_unknown']})")
    if "tensors" not in info:
        return
    t = info["tensors"]
    w(f"tensors:     {t['count']} ({_human(t['total_bytes'])}, {t['total_bytes']} bytes)")
    w("dtypes:      " + (", ".join(f"{d}: {c}" for d, c in t["dtypes"].items()) or "-"))
    if info.get("state_tensors", {}).get("count"):
        s = info["state_tensors"]
        w(f"state tensors: {s['count']} ({s['total_bytes']} bytes)")
    if info.get("extra_tensors"):  # save(..., extra=...): load_extra reads them
        s = info["extra_tensors"]
        w(f"extra tensors: {s['count']} ({s['total_bytes']} bytes)")




def format_text(info: dict[str, Any]) -> str:
    """The text report of ``python -m modelopt_c inspect`` for an :func:`inspect_file` dict."""
    out = io.StringIO()
    _print_inspect(info, out)
    return out.getvalue()


# ---- models and managers -------------------------------------------------------------


def _manager_info(manager: Any, model_name: str) -> dict[str, Any]:
    """The inspect dict of a manager's state (read as it is: no update_for_save hook runs)."""
    state = {"modelopt_state_dict": manager.state_dict(), "modelopt_version": manager.state_version}
    info: dict[str, Any] = {"model": model_name}
    info["modelopt_version"], info["modes"] = _modes(state)
    try:
        info["export_pending"] = [list(pair) for pair in manager._export_stack]
    except (KeyError, AssertionError) as exc:  # a mode no registry knows: still show the rest
        info["export_pending_unknown"] = str(exc)
    return info


def inspect_model(model: Any) -> dict[str, Any]:
    """What ``inspect_file`` reports for a file, for a model in memory: its modes (as they
    would be saved, without running the modes' update_for_save) and its state_dict's tensors."""
    from ._conversion import ModeloptStateManager

    name = type(model).__name__
    if ModeloptStateManager.is_converted(model, is_root=True):
        info = _manager_info(ModeloptStateManager(model), name)
    else:
        info = {"model": name, "modelopt_version": None, "modes": []}
    info["tensors"] = _tensor_facts(_torch_items(model.state_dict()))
    return info


def describe(model_or_path: Any) -> Summary:
    """A :class:`Summary` of a model or a checkpoint file: the same content as
    ``python -m modelopt_c inspect`` (``str()`` of it is that report; ``.info`` its
    ``--json`` dict), displayed as a table in Jupyter.  Loads no code from a file."""
    if isinstance(model_or_path, (str, os.PathLike)):
        return Summary(inspect_file(os.fspath(model_or_path)))
    from ._runtime import unwrap

    return Summary(inspect_model(unwrap(model_or_path, "force")))


# ---- displays ---------------------------------------------------------------------------

# beyond these, a table shows the first rows and says how many it left out
_MAX_ROWS = 20
_MAX_CONFIG_CHARS = 120


class Summary:
    """What a model or a checkpoint holds (see :func:`describe`).

    ``str()``/``repr()``: the text report of ``python -m modelopt_c inspect``; ``info``:
    its ``--json`` dict; in IPython a pretty text, in Jupyter a compact table (long
    configs folded, long mode lists cut to their first rows).
    """

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    def __str__(self) -> str:
        return format_text(self.info)

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Summary) and self.info == other.info

    __hash__ = None  # type: ignore[assignment]

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(format_text(self.info).rstrip("\n"))

    def _repr_html_(self) -> str:
        return _html(self.info)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _folded(text: str) -> str:
    """A long text in a <details> element: its start shown, the rest one click away."""
    if len(text) <= _MAX_CONFIG_CHARS:
        return f"<code>{_esc(text)}</code>"
    return (f"<details><summary><code>{_esc(text[:_MAX_CONFIG_CHARS])}…</code> ({len(text)} chars)</summary>"
            f"<pre style='white-space:pre-wrap'>{_esc(text)}</pre></details>")


def _html(info: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    if "file" in info:
        rows.append(("file", f"{_esc(info['file'])} ({_esc(_human(info['size_bytes']))})"))
    elif "manager" in info:
        rows.append(("manager", _esc(info["manager"])))
    else:
        rows.append(("model", _esc(info.get("model"))))
    if "format" in info:
        rows.append(("format", _esc(info["format"]) + (f" v{_esc(info['format_version'])}" if info.get("format_version") else "")))
    if info.get("modelopt_version") is not None:
        rows.append(("modelopt", _esc(info["modelopt_version"])))
    if "checksums" in info:
        rows.append(("checksums", _esc(info["checksums"])))
    if info.get("export_pending_unknown"):
        rows.append(("export pending", "unknown: " + _esc(info["export_pending_unknown"])))
    if info.get("export_pending"):
        rows.append(("export pending", _esc(", ".join(f"{m} needs {e}" for m, e in info["export_pending"]))))
    if "tensors" in info:
        t = info["tensors"]
        rows.append(("tensors", f"{t['count']} ({_esc(_human(t['total_bytes']))})"))
        rows.append(("dtypes", _esc(", ".join(f"{d}: {c}" for d, c in t["dtypes"].items()) or "-")))
    modes = info.get("modes") or []
    rows.append(("modes", str(len(modes))))
    head = "".join(f"<tr><th style='text-align:left'>{k}</th><td style='text-align:left'>{v}</td></tr>" for k, v in rows)
    body = ""
    for i, mode in enumerate(modes[:_MAX_ROWS]):
        meta = "<br>".join(f"{_esc(k)}: {_esc(v)}" for k, v in list(mode["metadata"].items())[:_MAX_ROWS])
        if len(mode["metadata"]) > _MAX_ROWS:
            meta += f"<br>… {len(mode['metadata']) - _MAX_ROWS} more"
        body += (f"<tr><td>{i}</td><td><b>{_esc(mode['name'])}</b></td>"
                 f"<td style='text-align:left'>{_folded(json.dumps(mode['config'], sort_keys=True))}</td>"
                 f"<td style='text-align:left'>{meta}</td></tr>")
    if len(modes) > _MAX_ROWS:
        body += f"<tr><td colspan='4'>… {len(modes) - _MAX_ROWS} more modes (str() of it lists all)</td></tr>"
    table = ""
    if modes:
        table = ("<table class='modelopt-c-modes'><thead><tr><th>#</th><th>mode</th><th>config</th>"
                 f"<th>metadata</th></tr></thead><tbody>{body}</tbody></table>")
    return f"<div class='modelopt-c-summary'><table>{head}</table>{table}</div>"


def _manager_repr_pretty(self: Any, p: Any, cycle: bool) -> None:
    if cycle:
        p.text(repr(self))
        return
    p.text(repr(self))
    text = format_text(_manager_info(self, "(the manager's model)")).rstrip("\n")
    for line in text.splitlines()[1:]:  # the model line says nothing the manager knows
        p.break_()
        p.text("  " + line)


def _manager_repr_html(self: Any) -> str:
    return _html({**_manager_info(self, ""), "manager": repr(self)})


def _attach_displays() -> None:
    """The manager's rich displays: presentation, so Python, set on the native type."""
    from ._conversion import ModeloptStateManager

    ModeloptStateManager._repr_pretty_ = _manager_repr_pretty  # type: ignore[attr-defined]
    ModeloptStateManager._repr_html_ = _manager_repr_html  # type: ignore[attr-defined]


_attach_displays()
