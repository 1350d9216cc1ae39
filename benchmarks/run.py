"""Side-by-side benchmarks of modelopt_c, nvidia-modelopt, torch and safetensors.

    python benchmarks/run.py [--quick | --full] [--axes sizes,counts,bookkeeping,imports]
                             [--counts 1000,10000] [--nvidia-max-tensors N] [--reps N]
                             [--out DIR] [--scratch DIR]

Writes ``results.json``, ``results.md`` and ``results.png`` to ``--out``
(default ``benchmarks/out``), prints the Markdown tables on stdout and progress
on stderr.  See ``benchmarks/README.md`` for what each figure means.

Every measurement runs in a fresh process forked from its library's zygote
(``zygote.py``); the libraries take turns within each repetition, in an order
that rotates from one repetition to the next, so drift of the machine hits all
alike.  Import times are taken in fresh interpreters.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(REPO_ROOT)]

import torch  # noqa: E402  (sizes only: the parent process measures nothing itself)

import libraries  # noqa: E402
import measure  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402
from libraries import FAMILIES, CheckpointMethod  # noqa: E402
from zygote import Zygote  # noqa: E402

GB = 1e9
HIDDEN = models.HIDDEN


@dataclass(frozen=True)
class Settings:
    """What one run measures."""

    mode: str
    checkpoints: tuple[tuple[float, str], ...]  # (target GB of weights, dtype)
    reps: int
    modules: tuple[int, ...]
    bookkeeping_reps: int
    import_reps: int
    cold: bool  # also restore with the page cache dropped, where the machine allows it
    counts: tuple[int, ...]  # the tensor-count axis: models of this many small tensors


# about five minutes on 2 cores: one checkpoint size, 1k and 10k tensors, the headline bookkeeping size
QUICK = Settings("quick", ((0.25, "float32"),), 3, (20000,), 3, 2, cold=False, counts=(1000, 10000))
FULL = Settings(
    "full",
    ((0.1, "float32"), (0.5, "float32"), (1.0, "float32"), (2.0, "float32"), (1.0, "bfloat16")),
    5,
    (1000, 10000, 20000, 100000),
    5,
    10,
    cold=True,
    counts=(1000, 10000, 50000, 100000),
)
AXES = ("sizes", "counts", "bookkeeping", "imports")
# the tensor-count axis: N/2 nn.Linear(COUNT_HIDDEN, COUNT_HIDDEN) layers hold N tensors, nested
# COUNT_FANOUT to a level (models.build_stack): torch's load_state_dict is quadratic in a module's children
COUNT_HIDDEN = 4
COUNT_FANOUT = 32
IMPORTS = {"modelopt_c": "modelopt_c", "nvidia-modelopt": "modelopt.torch.opt"}


class Results:
    """All samples of a run, in series: one per (group, parameters, method or library)."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str, str], dict[str, Any]] = {}

    def add(self, group: str, params: dict[str, Any], name: str, result: dict[str, Any]) -> None:
        """Record one result: a sample if it is ``ok``, else its error."""
        key = (group, json.dumps(params, sort_keys=True), name)
        series = self.series.setdefault(key, {"group": group, "params": params, "name": name, "samples": [], "errors": []})
        if result.get("ok", True):
            series["samples"].append({k: v for k, v in result.items() if k != "ok"})
        else:
            series["errors"].append(result["error"])

    def hopeless(self, group: str, params: dict[str, Any], name: str) -> bool:
        """Whether a series failed and never succeeded: its later repetitions are skipped."""
        series = self.series.get((group, json.dumps(params, sort_keys=True), name))
        return bool(series and series["errors"] and not series["samples"])


def rotated(items: list[Any], rep: int) -> list[Any]:
    """``items`` starting at position ``rep`` (mod length): who goes first changes every repetition."""
    k = rep % len(items)
    return items[k:] + items[:k]


def _outcome(result: dict[str, Any]) -> str:
    """One progress-line summary of a result."""
    if not result.get("ok", True):
        return "skipped: " + result["error"].splitlines()[0][:150]
    text = f"{result['seconds']:.3f} s"
    if "rss_anon" in result:
        text += f", peak extra RssAnon {result['rss_anon']['extra_peak'] / 1e6:.0f} MB"
    return text


class Bench:
    """One run: its settings, the zygotes, the results so far and the progress stream."""

    def __init__(self, settings: Settings, scratch: Path, caches: list[str], nvidia_max_tensors: int | None) -> None:
        self.settings = settings
        self.nvidia_max_tensors = nvidia_max_tensors
        self.scratch = scratch
        self.caches = caches
        self.results = Results()
        self.start = time.monotonic()
        self.zygotes = {family: Zygote(family) for family in FAMILIES}

    def say(self, text: str) -> None:
        """A progress line on stderr, with minutes:seconds since the start."""
        elapsed = int(time.monotonic() - self.start)
        print(f"[{elapsed // 60:3d}:{elapsed % 60:02d}] {text}", file=sys.stderr, flush=True)

    def _task(self, family: str, group: str, params: dict[str, Any], name: str, task: dict[str, Any], rep: int) -> None:
        """Run one task in a fresh process unless its series already failed; record it."""
        if self.results.hopeless(group, params, name):
            return
        result = self.zygotes[family].run(task)
        self.results.add(group, params, name, result)
        where = " ".join(str(params[k]) for k in ("size", "cache") if params.get(k))
        self.say(f"{group:<7} {where} rep {rep + 1}/{self.settings.reps}  {name}: {_outcome(result)}")

    def checkpoints(self) -> None:
        """Saves, restores and the machine limits, size by size."""
        for target_gb, dtype in self.settings.checkpoints:
            layers, weight_bytes = models.stack_shape(target_gb * GB, HIDDEN, getattr(torch, dtype))
            params = {"size": f"{target_gb:g} GB {dtype}", "dtype": dtype, "weight_bytes": weight_bytes, "layers": layers}
            folder = self.scratch / params["size"].replace(" ", "_")
            folder.mkdir()
            base = {"layers": layers, "hidden": HIDDEN, "dtype": dtype, "log": str(folder / "task.log")}
            limits = {**base, "bytes": weight_bytes, "path": str(folder / "limit.bin")}
            self._saves("save", params, folder, base, limits)
            for cache in self.caches:
                self._restores("restore", {**params, "cache": cache}, folder, base, limits)
            shutil.rmtree(folder)

    def counts(self) -> None:
        """The tensor-count axis: saves and restores of N small tensors, count by count.

        The same stack as the size axis, of ``nn.Linear(4, 4)`` layers nested 32 to a level:
        per-tensor costs, not bytes, decide the time.  Warm page cache only; no machine
        limits (a few MB).  nvidia-modelopt's restores above ``nvidia_max_tensors`` (when
        given) are recorded as skipped.
        """
        for count in self.settings.counts:
            layers = count // 2  # _counts: even, at least 2
            params = {"size": f"{2 * layers:,}", "tensors": 2 * layers, "layers": layers}
            folder = self.scratch / f"{2 * layers}_tensors"
            folder.mkdir()
            base = {"layers": layers, "hidden": COUNT_HIDDEN, "dtype": "float32", "fanout": COUNT_FANOUT,
                    "log": str(folder / "task.log")}
            restore_params = {**params, "cache": "warm"}
            if self.nvidia_max_tensors is not None and 2 * layers > self.nvidia_max_tensors:
                why = f"nvidia-modelopt restores run up to {self.nvidia_max_tensors:,} tensors (--nvidia-max-tensors)"
                self.results.add("count restore", restore_params, libraries.REFERENCE_METHOD, {"ok": False, "error": why})
                self.say(f"count restore {params['size']} warm  {libraries.REFERENCE_METHOD}: skipped: {why}")
            self._saves("count save", params, folder, base, None)
            self._restores("count restore", restore_params, folder, base, None)
            shutil.rmtree(folder)

    def _saves(self, group: str, params: dict[str, Any], folder: Path, base: dict[str, Any],
               limits: dict[str, Any] | None) -> None:
        """Every save method (and, given ``limits``, the machine's write and memcpy), interleaved."""
        jobs: list[CheckpointMethod | str] = [*libraries.SAVE_METHODS, *(["write", "memcpy"] if limits else [])]
        for rep in range(self.settings.reps):
            for job in rotated(jobs, rep):
                if isinstance(job, str):
                    self._task("baseline", "limit", params, job, {**limits, "kind": job}, rep)
                else:
                    task = {**base, "kind": "save", "method": job.name, "path": str(folder / job.file)}
                    self._task(job.family, group, params, job.name, task, rep)

    def _restores(self, group: str, params: dict[str, Any], folder: Path, base: dict[str, Any],
                  limits: dict[str, Any] | None) -> None:
        """Every restore method (and, given ``limits``, the machine's read), interleaved."""
        jobs: list[CheckpointMethod | str] = [*libraries.METHODS, *(["read"] if limits else [])]
        for rep in range(self.settings.reps):
            for job in rotated(jobs, rep):
                if isinstance(job, str):
                    self._task("baseline", "limit", params, job, {**limits, "kind": job, "cache": params["cache"]}, rep)
                    continue
                path = folder / job.file
                if self.zygotes[job.family].ready and not path.exists():
                    self.results.add(group, params, job.name, {"ok": False, "error": "no checkpoint: its save failed"})
                    continue
                task = {**base, "kind": "restore", "method": job.name, "path": str(path), "cache": params["cache"]}
                self._task(job.family, group, params, job.name, task, rep)

    def bookkeeping(self) -> None:
        """The state bookkeeping calls on models with many modules, in both modelopt libraries."""
        reps = self.settings.bookkeeping_reps
        for modules in self.settings.modules:
            for rep in range(reps):
                for family in rotated(["modelopt_c", "nvidia-modelopt"], rep):
                    failed = {"modules": modules, "op": "all"}
                    if self.results.hopeless("bookkeeping", failed, family):
                        continue
                    task = {"kind": "bookkeeping", "modules": modules, "log": str(self.scratch / "bookkeeping.log")}
                    result = self.zygotes[family].run(task)
                    if not result["ok"]:
                        self.results.add("bookkeeping", failed, family, result)
                        self.say(f"bookkeeping {modules} modules  {family}: {_outcome(result)}")
                        continue
                    ops = result["op_seconds"]
                    ops["is_converted + modelopt_state"] = ops["is_converted"] + ops["modelopt_state"]
                    for op, seconds in ops.items():
                        self.results.add("bookkeeping", {"modules": modules, "op": op}, family, {"seconds": seconds})
                    self.say(f"bookkeeping {modules} modules rep {rep + 1}/{reps}  {family}: "
                             f"is_converted + modelopt_state {ops['is_converted + modelopt_state'] * 1e3:.3f} ms")

    def imports(self) -> None:
        """Import times in fresh interpreters: torch alone, then the library on top of it."""
        paths = [str(REPO_ROOT), str(HERE)]
        reps = self.settings.import_reps
        for rep in range(reps):
            for family in rotated(list(IMPORTS), rep):
                if self.results.hopeless("import", {"variant": "after torch"}, family):
                    continue
                try:
                    torch_s, module_s = measure.import_seconds(IMPORTS[family], paths)
                except RuntimeError as exc:
                    for variant in ("after torch", "with torch"):
                        self.results.add("import", {"variant": variant}, family, {"ok": False, "error": str(exc)})
                    self.say(f"import {family}: skipped: {exc}")
                    continue
                self.results.add("import", {"variant": "after torch"}, family, {"seconds": module_s})
                self.results.add("import", {"variant": "with torch"}, family, {"seconds": torch_s + module_s})
                self.results.add("import", {"variant": "torch alone"}, "torch", {"seconds": torch_s})
                self.say(f"import  rep {rep + 1}/{reps}  {IMPORTS[family]}: {module_s:.3f} s after torch")

    def close(self) -> None:
        for zygote in self.zygotes.values():
            zygote.close()


def machine_info(scratch: Path) -> dict[str, Any]:
    """What the figures were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kb = int(next(line.split()[1] for line in meminfo if line.startswith("MemTotal")))

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb * 1024 / GB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "nvidia_modelopt": version("nvidia-modelopt"),
        "safetensors": version("safetensors"),
        "git_commit": git("rev-parse", "--short", "HEAD") + (" (dirty)" if git("status", "--porcelain") else ""),
        "scratch_filesystem": _filesystem(scratch),
    }


def _filesystem(path: Path) -> str:
    """Device and type of the mount that holds ``path``."""
    device, fstype, where = "?", "?", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mount, kind = line.split()[:3]
        if str(path.resolve()).startswith(mount) and len(mount) >= len(where):
            device, fstype, where = dev, kind, mount
    return f"{device} ({fstype}) on {where}"


def _axes(text: str) -> tuple[str, ...]:
    """``--axes``: a comma-separated subset of AXES, in AXES order."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(AXES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown axis {', '.join(unknown) or '(none given)'}: choose from {', '.join(AXES)}")
    return tuple(axis for axis in AXES if axis in names)


def _counts(text: str) -> tuple[int, ...]:
    """``--counts``: comma-separated tensor counts, even and at least 2 (the layers hold a weight and a bias each)."""
    try:
        counts = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give tensor counts as integers, e.g. 1000,10000") from None
    if any(c < 2 or c % 2 for c in counts) or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"{text!r}: every count must be even, at least 2, and given once")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_const", dest="settings", const=QUICK, help="0.25 GB, 1k and 10k tensors, 20k modules, warm cache (default; ~5 min)")
    which.add_argument("--full", action="store_const", dest="settings", const=FULL, help="0.1 to 2 GB and bf16, 1k-100k tensors, 1k-100k modules, warm and cold cache (~65 min)")
    parser.add_argument("--axes", type=_axes, default=AXES, metavar="LIST",
                        help=f"what to measure, comma-separated, from {','.join(AXES)} (default: all)")
    parser.add_argument("--counts", type=_counts, metavar="LIST",
                        help="tensor counts of the count axis, comma-separated (default: quick 1000,10000; "
                        "full 1000,10000,50000,100000)")
    parser.add_argument("--nvidia-max-tensors", type=int, metavar="N",
                        help="largest tensor count nvidia-modelopt restores at (default: every count; "
                        "its restore takes ~15 s at 50k tensors here)")
    parser.add_argument("--reps", type=int, metavar="N",
                        help="repetitions per checkpoint figure (default: quick 3, full 5)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="where results go (default: benchmarks/out)")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()), help="where checkpoint files go")
    args = parser.parse_args(argv)
    settings = args.settings or QUICK
    if args.counts:
        settings = replace(settings, counts=args.counts)
    if args.reps is not None:
        if args.reps < 1:
            parser.error(f"argument --reps: {args.reps}: give at least 1")
        settings = replace(settings, reps=args.reps)

    notes: list[str] = []
    caches = ["warm"]
    if settings.cold:
        if measure.can_drop_page_cache():
            caches.append("cold")
        else:
            notes.append(f"cold-cache restores not measured: {measure.DROP_CACHES} is not writable")
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="modelopt_c_bench_", dir=args.scratch))
    bench = Bench(settings, scratch, caches, args.nvidia_max_tensors)
    bench.say(f"{settings.mode} run of {', '.join(args.axes)}; checkpoints in {scratch}; page cache: {', '.join(caches)}")
    try:
        for family, zygote in bench.zygotes.items():
            hello = zygote.hello
            bench.say(f"{family}: " + (f"ready ({hello['version']})" if zygote.ready else f"unavailable: {hello['error']}"))
            notes += [f"{family}: {note}" for note in hello.get("notes", [])]
        if "sizes" in args.axes:
            bench.checkpoints()
        if "counts" in args.axes:
            bench.counts()
        if "bookkeeping" in args.axes:
            bench.bookkeeping()
    finally:
        bench.close()
        shutil.rmtree(scratch, ignore_errors=True)
    if "imports" in args.axes:
        bench.imports()

    run_info = {
        "settings": asdict(settings),
        "axes": list(args.axes),
        "nvidia_max_tensors": args.nvidia_max_tensors,
        "page_cache": caches,
        "machine": machine_info(args.scratch),
        "libraries": {family: zygote.hello for family, zygote in bench.zygotes.items()},
        "notes": notes,
        "wall_seconds": round(time.monotonic() - bench.start, 1),
    }
    print(report.write_all(args.out, run_info, list(bench.results.series.values())))
    bench.say(f"done in {run_info['wall_seconds']:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
