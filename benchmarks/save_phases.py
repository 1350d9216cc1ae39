"""Save time against the machine's own write + fsync, and where the time goes, per format.

For each size, in one process, in rotating order, ``--reps`` times (every target absent
and the disk synced first: ``measure.quiet_disk``):

* ``modelopt_c torch format`` / ``modelopt_c safetensors format``: ``mto.save`` (the file
  durable when it returns: fsync, rename, fsync of the folder);
* ``nvidia-modelopt``: its ``mto.save``, then an fsync of the file (the same durability);
* ``machine write + fsync``: ``measure.sequential_write`` of the same number of bytes.

The torch format's phases are timed inside the same saves: *serialise* (torch's pickling
of the checkpoint, in ``torch.serialization._save``), *copy + CRC* (time inside the
writer's ``write`` calls: copying into its buffers and the CRC-32; it also waits there
when the disk is behind), *drain* (the last buffers written) and *commit* (fsync, rename,
fsync of the folder, plus ``modelopt_state``).  The safetensors format's are taken from
its progress hook, whose last report comes when every byte has been handed to the writer:
*state + header + hash + copy* (until then: ``modelopt_state``, the header, xxh64 of
every tensor and the copy into the writer's buffers, waiting for the disk when it is
behind) and *drain + commit* (the last buffers written, the header rewritten with the
checksums, fsync, rename, fsync of the folder).  The
writes run in the writer's own thread all along (O_DIRECT where the file system has it).

    python benchmarks/save_phases.py [--sizes 0.1,0.5,1,2] [--reps 5] [--scratch DIR]

Prints a markdown table: medians [min-max]; ratios are nvidia-modelopt's median (save +
fsync) or the machine's median over ours: above 1, ours is faster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import measure  # noqa: E402
import models  # noqa: E402
import modelopt_c  # noqa: E402
from modelopt_c import torch_zip  # noqa: E402


class TorchPhases:
    """Times the torch-format writer's phases by wrapping its zip writer's methods."""

    def __init__(self) -> None:
        self.copy = self.drain = self.total_in_save = 0.0
        writer, save = torch_zip._ZipWriter, torch_zip.save
        phases = self

        class Timed(writer):
            def __init__(self, sink, archive):
                super().__init__(_TimedSink(sink, phases), archive)

        def timed_save(obj, path, archive):
            start = time.perf_counter()
            try:
                return save(obj, path, archive)
            finally:
                phases.total_in_save += time.perf_counter() - start

        torch_zip._ZipWriter, torch_zip.save = Timed, timed_save

    def reset(self) -> None:
        self.copy = self.drain = self.total_in_save = 0.0


class _TimedSink:
    def __init__(self, sink, phases: TorchPhases) -> None:
        self.sink, self.phases = sink, phases

    def __getattr__(self, name):
        return getattr(self.sink, name)

    def _timed(self, fn, arg):
        start = time.perf_counter()
        try:
            return fn(arg)
        finally:
            self.phases.copy += time.perf_counter() - start

    def write(self, data):
        return self._timed(self.sink.write, data)

    def write_storage(self, storage):
        return self._timed(self.sink.write_storage, storage)


def run_nvidia(model, path: str) -> float:
    import modelopt.torch.opt as nvidia

    start = time.perf_counter()
    nvidia.save(model, path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.1,0.5,1,2", help="model sizes in GB (fp32)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--scratch", default=None, help="folder for the files (default: a temp folder under the repo)")
    args = ap.parse_args()
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="save_phases_", dir=HERE.parent))
    scratch.mkdir(parents=True, exist_ok=True)
    phases = TorchPhases()
    rows = []
    for gb in (float(s) for s in args.sizes.split(",")):
        layers, nbytes = models.stack_shape(gb * 1e9, models.HIDDEN, torch.float32)
        model = models.build_stack(layers, models.HIDDEN, torch.float32, filled=True)
        samples: dict[str, list[float]] = {}
        parts: dict[str, list[float]] = {}
        methods = ["modelopt_c torch format", "modelopt_c safetensors format", "nvidia-modelopt", "machine write + fsync"]
        for rep in range(args.reps):
            for method in methods[rep % 4:] + methods[: rep % 4]:
                path = str(scratch / ("m.safetensors" if "safetensors" in method else "m.pt"))
                measure.quiet_disk(path)
                if method == "modelopt_c torch format":
                    phases.reset()
                    start = time.perf_counter()
                    modelopt_c.save(model, path)
                    dt = time.perf_counter() - start
                    parts.setdefault("torch copy + CRC", []).append(phases.copy)
                    parts.setdefault("torch serialise", []).append(phases.total_in_save - phases.copy)
                    parts.setdefault("torch commit", []).append(dt - phases.total_in_save)
                elif method == "modelopt_c safetensors format":
                    marks: list[float] = []
                    start = time.perf_counter()
                    modelopt_c.save(model, path, progress=lambda done, total: marks.append(time.perf_counter()))
                    dt = time.perf_counter() - start
                    if marks:
                        parts.setdefault("safetensors state + header + hash + copy", []).append(marks[-1] - start)
                        parts.setdefault("safetensors drain + commit", []).append(start + dt - marks[-1])
                elif method == "nvidia-modelopt":
                    dt = run_nvidia(model, path)
                else:
                    write, sync = measure.sequential_write(path, nbytes)
                    dt = write + sync
                samples.setdefault(method, []).append(dt)
                print(f"{gb} GB {method}: {dt:.3f} s", file=sys.stderr)
        for p in list(scratch.iterdir()):
            measure.quiet_disk(str(p))
        nv, mach = statistics.median(samples["nvidia-modelopt"]), statistics.median(samples["machine write + fsync"])
        for method in methods:
            s = samples[method]
            med = statistics.median(s)
            rows.append(f"| {gb:g} GB | {method} | {med:.3f} [{min(s):.3f}-{max(s):.3f}] | "
                        f"{nbytes / med / 1e9:.2f} | {nv / med:.2f}x | {mach / med:.2f}x |")
        for name, s in parts.items():
            rows.append(f"| {gb:g} GB | phase: {name} | {statistics.median(s):.3f} [{min(s):.3f}-{max(s):.3f}] | | | |")
        del model
    scratch.rmdir() if not any(scratch.iterdir()) else None
    print("| size | method | seconds | GB/s | vs nvidia save + fsync | vs machine write + fsync |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
