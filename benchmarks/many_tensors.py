"""Restore and save time against the number of tensors (the tensor-count axis).

A model of N small tensors (``nn.Linear(4, 4)`` layers: N/2 layers) is saved and
restored in one process per (N, method), in rotating order, fresh files each time:

* ``modelopt_c torch format``: ``mto.restore`` of the ``.pt`` file (modelopt_c's own
  restricted reader of torch's zip format, ``modelopt_c/torch_zip.py``);
* ``modelopt_c torch format via torch.load``: the same file, the same code, but the
  fast reader switched off, so ``torch.load(weights_only=True, mmap=True)`` reads it
  (what every release before this one did);
* ``modelopt_c safetensors format``;
* ``nvidia-modelopt``: its ``mto.save`` / ``mto.restore`` (skipped above
  ``--nvidia-max`` tensors: its restore takes minutes there).

    python benchmarks/many_tensors.py [--counts 1000,10000,50000] [--reps 3]

Writes ``many_tensors.md`` / ``many_tensors.json`` into ``--out`` (default
benchmarks/out) and prints the table: medians, and each method's time over the
fast path's (above 1: the fast path is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CHILD = r"""
import json, os, sys, time
import torch, torch.nn as nn
n, method, path, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
torch.manual_seed(0)
def build():
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(n // 2)])
if method == "nvidia-modelopt":
    import modelopt.torch.opt as mto
else:
    import modelopt_c as mto
    if method.endswith("via torch.load"):
        from modelopt_c import torch_zip
        torch_zip.load = lambda fd: None
model = build()
if mode == "save":
    t = time.perf_counter(); mto.save(model, path); dt = time.perf_counter() - t
    if method == "nvidia-modelopt":  # the same durability as ours: the bytes on disk
        t = time.perf_counter(); fd = os.open(path, os.O_RDONLY); os.fsync(fd); os.close(fd)
        dt += time.perf_counter() - t
else:
    fresh = build()
    t = time.perf_counter(); mto.restore(fresh, path); dt = time.perf_counter() - t
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
print(json.dumps({"seconds": dt}))
"""

METHODS = {
    "modelopt_c torch format": "pt",
    "modelopt_c torch format via torch.load": "pt",
    "modelopt_c safetensors format": "safetensors",
    "nvidia-modelopt": "pt",
}


def run(n: int, method: str, path: str, mode: str) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), method, path, mode], capture_output=True, text=True,
                         env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{method} {mode} {n}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1000,10000,50000", help="tensor counts, comma-separated")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--nvidia-max", type=int, default=10000, help="largest count nvidia-modelopt runs at")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for n in counts:
            methods = [m for m in METHODS if m != "nvidia-modelopt" or n <= args.nvidia_max]
            for rep in range(args.reps):
                for i in range(len(methods)):
                    method = methods[(i + rep) % len(methods)]
                    path = os.path.join(scratch, f"{n}-{rep}-{i}.{METHODS[method]}")
                    for mode in ("save", "restore"):
                        if mode == "save" and method.endswith("via torch.load"):
                            run(n, "modelopt_c torch format", path, "save")  # the same file as the fast path's
                            continue
                        seconds = run(n, method, path, mode)
                        results.setdefault(str(n), {}).setdefault(mode, {}).setdefault(method, []).append(seconds)
                        print(f"{n:>6} tensors  {mode:<7} {method:<40} {seconds:7.3f} s", file=sys.stderr)
                    os.unlink(path)
    lines = ["| tensors | operation | method | median (s) | time / fast path |", "| --- | --- | --- | --- | --- |"]
    for n, modes in results.items():
        for mode, by_method in modes.items():
            base = statistics.median(by_method["modelopt_c torch format"])
            for method, samples in by_method.items():
                med = statistics.median(samples)
                lines.append(f"| {n} | {mode} | {method} | {med:.3f} | {med / base:.2f}x |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "many_tensors.json").write_text(json.dumps(results, indent=1))
    (args.out / "many_tensors.md").write_text(
        f"# Time against tensor count\n\n`python benchmarks/many_tensors.py --counts {args.counts} --reps {args.reps}`"
        f"\n\n{table}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
