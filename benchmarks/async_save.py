"""How long a training step waits for a save: async_save's blocking time against the save calls.

    python benchmarks/async_save.py [--mb 537] [--reps 4]

One process, interleaved reps, fresh files: ``modelopt_c.async_save`` (the time until it
returns, and until its handle's result), ``modelopt_c.save``, and nvidia-modelopt's
``mto.save`` with and without an fsync of the file. The first async_save copies into
fresh host memory; later ones reuse the buffers it kept ("steady" is the median of reps
2..n). Prints medians and each over nvidia-modelopt's save call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import modelopt_c as mto  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=537, help="model size in MB (2048x2048 fp32 layers)")
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args(argv)
    import modelopt.torch.opt as nvidia

    layers = max(1, round(args.mb * 1e6 / ((2048 * 2048 + 2048) * 4)))
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(layers)])
    res: dict[str, list[float]] = {k: [] for k in ("async_save returns", "async_save done", "modelopt_c save",
                                                   "nvidia save", "nvidia save + fsync")}
    with tempfile.TemporaryDirectory() as d:
        for rep in range(args.reps):
            t = time.perf_counter()
            handle = mto.async_save(model, os.path.join(d, f"a{rep}.pt"))
            t1 = time.perf_counter()
            handle.result()
            res["async_save returns"].append(t1 - t)
            res["async_save done"].append(time.perf_counter() - t)
            t = time.perf_counter()
            mto.save(model, os.path.join(d, f"s{rep}.pt"))
            res["modelopt_c save"].append(time.perf_counter() - t)
            path = os.path.join(d, f"n{rep}.pt")
            t = time.perf_counter()
            nvidia.save(model, path)
            t1 = time.perf_counter()
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            res["nvidia save"].append(t1 - t)
            res["nvidia save + fsync"].append(time.perf_counter() - t)
            for f in os.listdir(d):
                os.unlink(os.path.join(d, f))
    base = statistics.median(res["nvidia save"])
    print(f"{layers} layers, {layers * (2048 * 2048 + 2048) * 4 / 1e6:.0f} MB, {args.reps} reps (medians)")
    for name, samples in res.items():
        med = statistics.median(samples)
        print(f"| {name} | {med:.3f} s | {med / base:.2f}x |")
    steady = statistics.median(res["async_save returns"][1:]) if args.reps > 1 else float("nan")
    print(f"| async_save returns, steady (reps 2..n) | {steady:.3f} s | {steady / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
