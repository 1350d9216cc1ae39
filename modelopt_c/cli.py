"""``python -m modelopt_c``: inspect, convert and verify checkpoints; run the demo and benchmarks.

Nothing here runs code from a checkpoint: torch-format files are read with
``torch.load(weights_only=True)`` only, and a refusal is reported, never bypassed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

from . import distributed, st_format
from .checkpoint import (
    CheckpointError,
    _save_torch_progress,
    load_checkpoint as _load,
    open_regular_file,
)
from .periodic import load_extra, torch_checkpoint
from .progress import reporting
from .summary import (  # the inspect report is the library's (describe() shows the same)
    KIND_DCP,
    KIND_OURS,
    KIND_PLAIN,  # noqa: F401  (re-exported: the kinds detect_kind returns)
    KIND_TORCH,
    KIND_UNKNOWN,
    _a,
    _meta,
    _modes,
    _print_inspect,
    detect_kind,
    inspect_file,
    load_torch_safely,
)

EXIT_OK, EXIT_CORRUPT, EXIT_USAGE = 0, 1, 2

EPILOG = """\
examples:
  python -m modelopt_c inspect model.pt
  python -m modelopt_c inspect --json model.safetensors
  python -m modelopt_c convert model.pt model.safetensors
  python -m modelopt_c convert model.safetensors model.pt
  python -m modelopt_c convert ckpt.bin out.bin --to safetensors
  python -m modelopt_c verify model.safetensors && echo intact
  python -m modelopt_c inspect ckpt_dir            (a DCP folder written by save of a sharded model)
  python -m modelopt_c convert ckpt_dir model.pt   (DCP folder -> one file)
  python -m modelopt_c convert model.pt ckpt_dir --to dcp

exit status: 0 ok, 1 a corrupt/refused/unreadable checkpoint, 2 usage error.
"""


# --------------------------------------------------------------------------- reading


def zip_problems(path: str) -> list[str]:
    """What is wrong with the zip records of a torch-format file: each record's bytes
    against the CRC-32 and size in the central directory, its local header's name, and
    its data descriptor (torch writes one after every record).  [] when all agree."""
    problems: list[str] = []
    try:
        with open(path, "rb") as raw, zipfile.ZipFile(raw) as zf:
            for info in zf.infolist():
                name = info.filename
                try:
                    crc, size = _record_crc(raw, zf, info)
                except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError, struct.error) as exc:
                    problems.append(f"record {name!r}: {exc}")
                    continue
                if size != info.file_size:
                    problems.append(f"record {name!r}: {size} bytes, the directory says {info.file_size}")
                elif crc != info.CRC:
                    problems.append(f"record {name!r}: its bytes have CRC-32 {crc:08x}, the directory says {info.CRC:08x}")
                elif info.flag_bits & 0x08:
                    problem = _descriptor_problem(raw, info)
                    if problem:
                        problems.append(f"record {name!r}: {problem}")
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError, struct.error) as exc:
        problems.append(f"zip directory: {exc}")
    return problems


def _record_crc(raw: Any, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[int, int]:
    """(CRC-32, size) of a record's bytes.  Stored records (torch's) are read straight
    from the file after their local header, whose signature and name must match the
    directory; compressed ones through zipfile (which stops at a CRC mismatch)."""
    if info.compress_type != zipfile.ZIP_STORED:
        crc, size = 0, 0
        with zf.open(info) as member:
            while chunk := member.read(1 << 22):
                crc, size = zlib.crc32(chunk, crc), size + len(chunk)
        return crc, size
    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("no local header where the directory points")
    nlen, xlen = struct.unpack_from("<HH", header, 26)
    local_name = raw.read(nlen)
    if local_name != info.orig_filename.encode("utf-8", "surrogateescape"):
        raise zipfile.BadZipFile(f"the local header names it {local_name.decode('utf-8', 'replace')!r}")
    raw.seek(info.header_offset + 30 + nlen + xlen)
    crc, size, left = 0, 0, info.compress_size
    while left > 0:
        chunk = raw.read(min(left, 1 << 22))
        if not chunk:
            break
        crc, size, left = zlib.crc32(chunk, crc), size + len(chunk), left - len(chunk)
    return crc, size


def _descriptor_problem(raw: Any, info: zipfile.ZipInfo) -> str | None:
    """The data descriptor after a record must repeat the directory's CRC-32 and sizes."""
    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) < 30:
        return "local header cut short"
    nlen, xlen = struct.unpack_from("<HH", header, 26)
    raw.seek(info.header_offset + 30 + nlen)
    extra = raw.read(xlen)
    tags, pos = set(), 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        tags.add(tag)
        pos += 4 + size
    wide = 0x0001 in tags or max(info.compress_size, info.file_size) >= 0xFFFFFFFF  # zip64: 8-byte sizes
    raw.seek(info.header_offset + 30 + nlen + xlen + info.compress_size)
    desc = raw.read(24)
    if desc[:4] == b"PK\x07\x08":
        desc = desc[4:]
    fmt = "<IQQ" if wide else "<III"
    if len(desc) < struct.calcsize(fmt):
        return "data descriptor cut short"
    crc, csize, usize = struct.unpack_from(fmt, desc, 0)
    if (crc, csize, usize) != (info.CRC, info.compress_size, info.file_size):
        return (f"data descriptor says CRC-32 {crc:08x}, {usize} bytes; the directory says "
                f"{info.CRC:08x}, {info.file_size} bytes")
    return None


def load_checkpoint(path: str) -> tuple[Any, dict[str, Any], str]:
    """``(modelopt_state or None, state_dict, kind)`` of a checkpoint, loaded safely by the
    library's loader (a plain state dict too); its parts' shapes are checked here, before
    anything is written."""
    kind = detect_kind(path)
    if kind == KIND_UNKNOWN:
        raise CheckpointError(f"{path}: neither a torch (zip) checkpoint nor a safetensors file")
    try:
        state, state_dict = _load(path, {"verify": False}, plain=True)
    except CheckpointError:
        raise
    except ValueError as exc:  # the safetensors reader's own errors
        raise CheckpointError(str(exc)) from exc
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: model_state_dict is {_a(state_dict)}, not a dict")
    _modes(state, path)
    return state, dict(state_dict), kind


# --------------------------------------------------------------------------- writing


def _progress_printer(label: str, every_mb: int, err: TextIO) -> Callable[[int, int], None]:
    step = max(1, every_mb) << 20
    state = {"next": step}

    def report(done: int, total: int) -> None:
        if done >= state["next"] or (done == total and total >= step):
            state["next"] = done + step
            print(f"{label}: {done >> 20} / {total >> 20} MiB written", file=err, flush=True)

    return report


@contextlib.contextmanager
def _convert_progress(args: argparse.Namespace, err: TextIO) -> Iterator[Callable[[int, int], object] | None]:
    """A tqdm bar on an interactive stderr (modelopt_c.progress), else a line every N MiB."""
    if args.no_progress:
        yield None
        return
    if err is sys.stderr:
        with reporting(None, f"convert {os.path.basename(args.out)}") as hook:
            if hook is not None:
                yield hook
                return
    yield _progress_printer("convert", args.progress_mb, err)


def _target_kind(out: str, to: str | None) -> str | None:
    if to:
        return to
    if os.path.isdir(out) or out.endswith(os.sep):
        return "dcp"
    ext = os.path.splitext(out)[1].lower()
    if ext == ".safetensors":
        return "safetensors"
    if ext in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
        return "torch"
    return None


# --------------------------------------------------------------------------- commands


def _what(path: str, exc: BaseException | str) -> str:
    """What is wrong, on one line, without the file's name the message may start with."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None:
        text = exc.strerror or text
    for prefix in (repr(path) + ": ", repr(path) + " ", path + ": ", path + " "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def _fail(path: str, exc: BaseException | str, err: TextIO) -> int:
    """One line on stderr, ``modelopt_c: <file>: <what is wrong>``; exit status 1."""
    print(f"modelopt_c: {path}: {_what(path, exc)}", file=err)
    return EXIT_CORRUPT


def _cmd_inspect(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        info = inspect_file(args.file)
    except CheckpointError as exc:
        if args.json:
            print(json.dumps({"file": args.file, "error": str(exc)}), file=out)
        return _fail(args.file, exc, err)
    if args.json:
        print(json.dumps(info, indent=2, default=repr), file=out)
    else:
        _print_inspect(info, out)
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    target = _target_kind(args.out, args.to)
    if target is None:
        print(f"convert: cannot tell the format of {args.out!r} from its extension; pass --to torch|safetensors|dcp", file=err)
        return EXIT_USAGE
    try:
        if distributed.is_dcp_folder(args.input):
            (state, state_dict), kind = distributed.load_folder(args.input), KIND_DCP
            _modes(state, args.input)
        else:
            state, state_dict, kind = load_checkpoint(args.input)
    except (CheckpointError, ValueError) as exc:
        return _fail(args.input, exc, err)
    if state is None:
        return _fail(args.input, "has no modelopt_state (a plain state dict); nothing modelopt-specific to convert", err)
    try:
        extra = None if kind == KIND_DCP else load_extra(args.input, verify=False)  # a training state goes along
    except CheckpointError as exc:
        return _fail(args.input, exc, err)
    try:
        with _convert_progress(args, err) as hook:
            if target == "dcp":
                if extra:
                    raise ValueError("a DCP folder has no place for the extra training state; convert to a file")
                distributed.write_folder(args.out, state_dict, state)
            elif target == "safetensors":
                st_format.save_file(args.out, state_dict, state, progress=hook, extra=extra)
            else:
                # save's own torch-format writer, the temp file watched for the hook (False: no output)
                _save_torch_progress(args.out, torch_checkpoint(state, state_dict, extra), {}, hook or False)
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        return _fail(args.out, f"writing failed: {exc}", err)
    print(f"converted {args.input} ({kind}) -> {args.out} ({target})", file=out)
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    path = args.file
    try:
        kind = KIND_DCP if distributed.is_dcp_folder(path) else detect_kind(path)
        if kind == KIND_DCP:
            detail = distributed.check_folder(path)
        elif kind == KIND_UNKNOWN:
            raise CheckpointError(f"{path}: neither a torch (zip) checkpoint nor a safetensors file")
        elif kind == KIND_TORCH:
            problems = zip_problems(path)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise CheckpointError(f"{path}: {problems[0]}{more}")
            obj = load_torch_safely(path, mmap=False)  # every record read
            is_modelopt = isinstance(obj, dict) and "model_state_dict" in obj
            if is_modelopt:  # a checkpoint's parts must have their shapes
                if not isinstance(obj["model_state_dict"], dict):
                    raise CheckpointError(f"{path}: model_state_dict is {_a(obj['model_state_dict'])}, not a dict")
                _modes(obj.get("modelopt_state"), path)
            detail = "zip records match their CRC-32s, safe load of every record (weights_only=True)" + (
                ", a modelopt checkpoint" if is_modelopt else ", not a modelopt checkpoint")
        else:
            metadata = _meta(path)
            if "checksums" in metadata:
                st_format.check_file(path)
                detail = "header valid, xxh64 checksums match"
            elif kind == KIND_OURS:
                raise CheckpointError(f"{path}: a modelopt_c file without checksums (its metadata was altered)")
            else:
                st_format.read_header(path)
                detail = "header valid, no checksums stored"
            if kind == KIND_OURS:
                load_checkpoint(path)
                detail += ", modelopt_state decodes"
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"CORRUPT {path}: {_what(path, exc)}", file=out)
        return _fail(path, exc, err)
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

    p = sub.add_parser("convert", help="torch format <-> modelopt_c safetensors format <-> DCP folder",
                       description="Convert between the torch format, the modelopt_c safetensors format and "
                       "DCP folders (torch.distributed.checkpoint, written by save of a sharded model). "
                       "The direction comes from OUT's extension (.safetensors, or .pt/.pth/.bin/.ckpt; an "
                       "existing folder or a trailing / for DCP) or --to. Loads safely, writes crash-safely "
                       "(temp file or folder, fsync, rename). A DCP folder is gathered whole in this process.")
    p.add_argument("input", metavar="IN")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--to", choices=("torch", "safetensors", "dcp"), help="output format (default: from OUT's extension)")
    p.add_argument("--progress-mb", type=int, default=256, metavar="N",
                   help="print progress to stderr every N MiB (a bar instead on a terminal, with tqdm installed)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
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

    p = sub.add_parser("run", help="run a script with nvidia-modelopt's conversion layer on modelopt_c "
                       "(run [--force] script.py|-m module|-c code [args...])", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m modelopt_c``; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    out, err = sys.stdout, sys.stderr
    if argv and argv[0] == "run":
        # the drop-in switch, then the user's script with its own arguments (modelopt_c.dropin)
        from .dropin import run

        return run(argv[1:])
    if argv and argv[0] in ("demo", "bench"):
        # Everything after the command belongs to the delegate, options included.
        handler = _cmd_demo if argv[0] == "demo" else _cmd_bench
        return handler(argparse.Namespace(command=argv[0], args=argv[1:]), out, err)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    path = getattr(args, "file", None) or getattr(args, "input", None)
    if path is not None and not distributed.is_dcp_folder(path):
        try:
            os.close(open_regular_file(path, args.command))
        except FileNotFoundError:
            print(f"{args.command}: {path}: no such file", file=err)
            return EXIT_USAGE
        except (CheckpointError, OSError) as exc:  # a folder, a FIFO, a device, no permission
            if args.command == "verify":
                print(f"UNREADABLE {path}: {_what(path, exc)}", file=out)
            return _fail(path, exc, err)
    try:
        return args.func(args, out, err)
    except Exception as exc:  # noqa: BLE001 - a bad file never ends in a traceback
        if path is None:
            raise
        return _fail(path, f"{type(exc).__name__}: {exc}", err)


if __name__ == "__main__":
    sys.exit(main())
