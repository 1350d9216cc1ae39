"""``python -m modelopt_c``: inspect, convert and verify checkpoints; run the demo and benchmarks.

Nothing here runs code from a checkpoint: torch-format files are read with
``torch.load(weights_only=True)`` only, and a refusal is reported, never bypassed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

EXIT_OK, EXIT_CORRUPT, EXIT_USAGE = 0, 1, 2

KIND_TORCH = "torch"
KIND_OURS = "modelopt_c safetensors"
KIND_PLAIN = "safetensors"
KIND_UNKNOWN = "unknown"

EPILOG = """\
examples:
  python -m modelopt_c inspect model.pt
  python -m modelopt_c inspect --json model.safetensors
  python -m modelopt_c convert model.pt model.safetensors
  python -m modelopt_c convert model.safetensors model.pt
  python -m modelopt_c convert ckpt.bin out.bin --to safetensors
  python -m modelopt_c verify model.safetensors && echo intact

exit status: 0 ok, 1 a corrupt/refused/unreadable checkpoint, 2 usage error.
"""


class CheckpointError(Exception):
    """A checkpoint that cannot be read safely (corrupt, refused, or not a checkpoint)."""


def _st():
    from . import st_format

    return st_format


def _torch():
    import torch

    return torch


# --------------------------------------------------------------------------- reading


def detect_kind(path: str) -> str:
    """The checkpoint kind of ``path``, from its first bytes (never its name)."""
    st = _st()
    if st.is_torch_zip(path):
        return KIND_TORCH
    if st.is_safetensors_file(path):
        try:
            metadata, _, _ = st.read_header(path)
        except ValueError:
            return KIND_PLAIN  # looks like one; validation reports what is wrong
        return KIND_OURS if metadata.get("format") == st.FORMAT_NAME else KIND_PLAIN
    return KIND_UNKNOWN


def load_torch_safely(path: str, mmap: bool = True) -> Any:
    """``torch.load`` with ``weights_only=True``; CheckpointError with torch's refusal text."""
    torch = _torch()
    try:
        return torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - every refusal is reported, none bypassed
        text = str(exc).strip().splitlines()
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) refused the file: {type(exc).__name__}: "
            + (text[0] if text else "")
            + (" ..." if len(text) > 1 else "")
        ) from exc


def _codec_available() -> bool:
    from . import _conversion

    return hasattr(_conversion, "encode_state") and hasattr(_conversion, "decode_state")


def load_checkpoint(path: str, verify: bool = False) -> tuple[Any, dict[str, Any], str]:
    """``(modelopt_state or None, state_dict, kind)`` of a checkpoint, loaded safely."""
    kind = detect_kind(path)
    st = _st()
    if kind == KIND_TORCH:
        obj = load_torch_safely(path, mmap=not verify)
        if isinstance(obj, dict) and "model_state_dict" in obj:
            return obj.get("modelopt_state"), dict(obj["model_state_dict"]), kind
        if isinstance(obj, dict) and all(isinstance(v, _torch().Tensor) for v in obj.values()):
            return None, dict(obj), kind
        raise CheckpointError(f"{path}: a torch file, but not a modelopt checkpoint or a state dict")
    if kind in (KIND_OURS, KIND_PLAIN):
        from . import _conversion

        try:
            metadata, tensors = _conversion.st_read(path, verify=verify and "checksums" in _meta(path))
            extras, state_dict = st.split_tensors(tensors, path)
            state = st.decode_metadata_state(metadata, extras, path) if kind == KIND_OURS else None
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
        return state, state_dict, kind
    raise CheckpointError(f"{path}: neither a torch (zip) checkpoint nor a safetensors file")


def _meta(path: str) -> dict[str, str]:
    try:
        return _st().read_header(path)[0]
    except ValueError:
        return {}


# --------------------------------------------------------------------------- inspect


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


def _modes(state: Any) -> tuple[str | None, list[dict[str, Any]]]:
    if not isinstance(state, dict):
        return None, []
    modes = []
    for entry in state.get("modelopt_state_dict") or []:
        try:
            name, body = entry
        except (TypeError, ValueError):
            continue
        body = body if isinstance(body, dict) else {}
        metadata = body.get("metadata") or {}
        modes.append(
            {
                "name": name,
                "config": _jsonable(body.get("config")),
                "metadata": {str(k): _describe(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {},
            }
        )
    return state.get("modelopt_version"), modes


def inspect_file(path: str) -> dict[str, Any]:
    """What is in a checkpoint, as a JSON-able dict (loads no code; maps, never copies)."""
    st = _st()
    kind = detect_kind(path)
    info: dict[str, Any] = {"file": path, "format": kind, "size_bytes": os.path.getsize(path)}
    if kind == KIND_TORCH:
        obj = load_torch_safely(path)
        state, state_dict = None, {}
        if isinstance(obj, dict) and "model_state_dict" in obj:
            state, state_dict = obj.get("modelopt_state"), obj["model_state_dict"]
            info["keys"] = sorted(map(str, obj))
        elif isinstance(obj, dict):
            state_dict = {k: v for k, v in obj.items() if hasattr(v, "dtype")}
            info["keys"] = sorted(map(str, obj))
        info["modelopt_version"], info["modes"] = _modes(state)
        info["tensors"] = _tensor_facts(_torch_items(state_dict))
        return info
    if kind in (KIND_OURS, KIND_PLAIN):
        try:
            metadata, header, data_start = st.read_header(path)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
        info["data_start"] = data_start
        info["metadata"] = {k: f"{len(v)} chars" for k, v in metadata.items()}
        model = [
            (n, d, list(s), e - b) for n, (d, s, b, e) in header.items() if not n.startswith(st.RESERVED_PREFIX)
        ]
        extras = [(n, d, list(s), e - b) for n, (d, s, b, e) in header.items() if n.startswith(st.RESERVED_PREFIX)]
        info["tensors"] = _tensor_facts(model)
        info["state_tensors"] = _tensor_facts(extras)
        info["checksums"] = metadata.get("checksum_algorithm", "none")
        if kind == KIND_OURS:
            info["format_version"] = metadata.get("format_version")
            if _codec_available():
                state, _, _ = load_checkpoint(path)
                info["modelopt_version"], info["modes"] = _modes(state)
            else:
                info["modelopt_version"], info["modes"] = None, []
                info["note"] = "this build has no state codec: modes not decoded"
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
    w(f"file:        {info['file']} ({_human(info['size_bytes'])})")
    w(f"format:      {info['format']}" + (f" v{info['format_version']}" if info.get("format_version") else ""))
    if info.get("modelopt_version") is not None:
        w(f"modelopt:    {info['modelopt_version']}")
    if "keys" in info:
        w(f"keys:        {', '.join(info['keys'])}")
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
    t = info["tensors"]
    w(f"tensors:     {t['count']} ({_human(t['total_bytes'])}, {t['total_bytes']} bytes)")
    w("dtypes:      " + (", ".join(f"{d}: {c}" for d, c in t["dtypes"].items()) or "-"))
    if info.get("state_tensors", {}).get("count"):
        s = info["state_tensors"]
        w(f"state tensors: {s['count']} ({s['total_bytes']} bytes)")
    if info.get("note"):
        w(f"note:        {info['note']}")


# --------------------------------------------------------------------------- writing


def _progress_printer(label: str, every_mb: int, err: TextIO) -> Callable[[int, int], None]:
    step = max(1, every_mb) << 20
    state = {"next": step}

    def report(done: int, total: int) -> None:
        if done >= state["next"] or (done == total and total >= step):
            state["next"] = done + step
            print(f"{label}: {done >> 20} / {total >> 20} MiB written", file=err, flush=True)

    return report


def save_torch_atomically(obj: Any, path: str) -> None:
    """``torch.save`` into a temp file next to ``path``, fsync, rename, fsync the folder."""
    torch = _torch()
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)[:200]}.tmp-{os.getpid()}-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _target_kind(out: str, to: str | None) -> str | None:
    if to:
        return to
    ext = os.path.splitext(out)[1].lower()
    if ext == ".safetensors":
        return "safetensors"
    if ext in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
        return "torch"
    return None


# --------------------------------------------------------------------------- commands


def _cmd_inspect(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        info = inspect_file(args.file)
    except CheckpointError as exc:
        if args.json:
            print(json.dumps({"file": args.file, "error": str(exc)}), file=out)
        print(f"inspect: {exc}", file=err)
        return EXIT_CORRUPT
    if args.json:
        print(json.dumps(info, indent=2, default=repr), file=out)
    else:
        _print_inspect(info, out)
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    target = _target_kind(args.out, args.to)
    if target is None:
        print(f"convert: cannot tell the format of {args.out!r} from its extension; pass --to torch|safetensors", file=err)
        return EXIT_USAGE
    try:
        state, state_dict, kind = load_checkpoint(args.input)
    except CheckpointError as exc:
        print(f"convert: {exc}", file=err)
        return EXIT_CORRUPT
    if state is None:
        print(f"convert: {args.input}: has no modelopt_state (a plain state dict); nothing modelopt-specific to convert", file=err)
        return EXIT_CORRUPT
    try:
        if target == "safetensors":
            _st().save_file(args.out, state_dict, state, progress=_progress_printer("convert", args.progress_mb, err))
        else:
            save_torch_atomically({"modelopt_state": state, "model_state_dict": state_dict}, args.out)
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        print(f"convert: writing {args.out}: {exc}", file=err)
        return EXIT_CORRUPT
    print(f"converted {args.input} ({kind}) -> {args.out} ({target})", file=out)
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    path = args.file
    kind = detect_kind(path)
    try:
        if kind == KIND_UNKNOWN:
            raise CheckpointError(f"{path}: neither a torch (zip) checkpoint nor a safetensors file")
        if kind == KIND_TORCH:
            obj = load_torch_safely(path, mmap=False)  # reads (and CRC-checks) every record
            is_modelopt = isinstance(obj, dict) and "modelopt_state" in obj and "model_state_dict" in obj
            detail = "safe load of every record (weights_only=True)" + (
                ", a modelopt checkpoint" if is_modelopt else ", not a modelopt checkpoint")
        else:
            from . import _conversion

            metadata = _meta(path)
            if "checksums" in metadata:
                _conversion.st_read(path, verify=True)
                detail = "header valid, xxh64 checksums match"
            elif kind == KIND_OURS:
                raise CheckpointError(f"{path}: a modelopt_c file without checksums (its metadata was altered)")
            else:
                _conversion.st_read_header(path)
                detail = "header valid, no checksums stored"
            if kind == KIND_OURS:
                if _codec_available():
                    load_checkpoint(path)
                    detail += ", modelopt_state decodes"
                else:
                    detail += ", modelopt_state not decoded (no state codec in this build)"
    except (CheckpointError, ValueError) as exc:
        print(f"CORRUPT {exc}", file=out)
        return EXIT_CORRUPT
    except OSError as exc:
        print(f"UNREADABLE {path}: {exc}", file=out)
        return EXIT_CORRUPT
    print(f"OK {path} ({kind}): {detail}", file=out)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        from modelopt_c.demo import main as demo_main
    except ImportError as exc:
        print(f"demo: modelopt_c.demo is not available in this install ({exc})", file=err)
        return EXIT_CORRUPT
    return int(demo_main(list(args.args)) or 0)


def _cmd_bench(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
    if not script.is_file():
        print(f"bench: {script} not found (benchmarks ship with the source tree, not the wheel)", file=err)
        return EXIT_CORRUPT
    return subprocess.call([sys.executable, str(script), *args.args])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modelopt_c",
        description="Inspect, convert and verify modelopt checkpoints (torch zip format and the "
        "safetensors-compatible modelopt_c format) without running code from them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="show format, versions, modes, metadata and tensor summary",
                       description="Show what a checkpoint holds: format, versions, modes with their configs, "
                       "a metadata summary, tensor count, total bytes and a dtype histogram.")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("convert", help="torch format <-> modelopt_c safetensors format",
                       description="Convert between the torch format and the modelopt_c safetensors format. "
                       "The direction comes from OUT's extension (.safetensors, or .pt/.pth/.bin/.ckpt) or --to. "
                       "Loads safely, writes crash-safely (temp file, fsync, rename).")
    p.add_argument("input", metavar="IN")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--to", choices=("torch", "safetensors"), help="output format (default: from OUT's extension)")
    p.add_argument("--progress-mb", type=int, default=256, metavar="N", help="print progress to stderr every N MiB")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("verify", help="validate a checkpoint (header + checksums, or a full safe load)",
                       description="Validate a checkpoint: header and xxh64 checksums for safetensors files, a "
                       "full weights_only load for torch files. Exit 0 when intact, 1 when corrupt.")
    p.add_argument("file")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("demo", help="run the demo (modelopt_c.demo)", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="run benchmarks/run.py with the remaining arguments", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m modelopt_c``; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    out, err = sys.stdout, sys.stderr
    if argv and argv[0] in ("demo", "bench"):
        # Everything after the command belongs to the delegate, options included.
        handler = _cmd_demo if argv[0] == "demo" else _cmd_bench
        return handler(argparse.Namespace(command=argv[0], args=argv[1:]), out, err)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    for attr in ("file", "input"):
        path = getattr(args, attr, None)
        if path is not None and not os.path.isfile(path):
            print(f"{args.command}: {path}: no such file", file=err)
            return EXIT_USAGE
    return args.func(args, out, err)


if __name__ == "__main__":
    sys.exit(main())
