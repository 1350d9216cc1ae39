"""The sharded series: save / restore of an FSDP2 model against the number of ranks.

    python benchmarks/sharded.py                      # 1, 2, 4 gloo ranks on CPU, 64 MB fp32, 3 repetitions
    python benchmarks/sharded.py --ranks 2,4 --mb 256 --reps 5 --out DIR --scratch DIR

For each world size, three methods save the same model (a stack of
``nn.Linear(1024, 1024)``, every layer and the root under ``fully_shard``) into a
folder and restore it into a fresh sharded model:

* ``modelopt_c``: ``modelopt_c.save(model, folder)`` / ``modelopt_c.restore(model, folder)``
  (DCP for the shards, the modelopt state in msgpack, the folder swapped in whole; the
  restore replays the modes, then DCP-loads);
* ``nvidia-modelopt``: its documented distributed path: ``mto.modelopt_state`` saved with
  ``torch.save`` by rank 0 plus ``dcp.save`` of the state dict; restore is
  ``mto.restore_from_modelopt_state`` then ``dcp.load``;
* ``dcp``: ``torch.distributed.checkpoint.save`` / ``load`` of the state dict alone.

Both modelopt methods carry the trivial mode ``bench_trivial`` (benchmarks/libraries.py).
Every (world size, method) runs in its own freshly spawned process group (no library
next to another), the methods take turns in an order that rotates per repetition, and
the folder of the previous save is removed and ``sync`` run before each save, untimed.
A time is rank 0's wall clock between two barriers around the call (so, the slowest
rank's).  The first save/restore of each group is a warm-up and not counted.  Ratios
are the other method's median over modelopt_c's (above 1: modelopt_c is faster).
Writes ``sharded.json`` and ``sharded.md`` into ``--out`` (default benchmarks/out) and
prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ("modelopt_c", "nvidia-modelopt", "dcp")


# ---------------------------------------------------------------- one rank (--worker)


def _worker(method: str, world: int, rank: int, port: str, folder: str, layers: int, reps: int) -> None:
    sys.path.insert(0, str(HERE))
    import libraries

    family = {"modelopt_c": "modelopt_c", "nvidia-modelopt": "nvidia-modelopt", "dcp": "baseline"}[method]
    lib = libraries.load_family(family)
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import torch.nn as nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    mesh = init_device_mesh("cpu", (world,))
    mto = lib.api if method != "dcp" else None

    def build(n: int, converted: bool, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(n)])
        if converted:
            model = mto.apply_mode(model, [libraries.TRIVIAL_MODE])
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def save(model: nn.Module, path: str) -> None:
        if method == "modelopt_c":
            mto.save(model, path)
        elif method == "nvidia-modelopt":
            state = mto.modelopt_state(model)
            if rank == 0:
                os.makedirs(path, exist_ok=True)
                torch.save(state, os.path.join(path, "modelopt_state.pt"))
            dcp.save(model.state_dict(), checkpoint_id=path)
        else:
            dcp.save(model.state_dict(), checkpoint_id=path)

    def restore(model: nn.Module, path: str) -> nn.Module:
        if method == "modelopt_c":
            return mto.restore(model, path)
        if method == "nvidia-modelopt":
            state = torch.load(os.path.join(path, "modelopt_state.pt"), weights_only=False)
            model = mto.restore_from_modelopt_state(model, state)
        sd = model.state_dict()
        dcp.load(sd, checkpoint_id=path)
        return model

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    converted = method != "dcp"
    source = build(layers, converted, seed=0)
    want = source[0].weight.to_local().clone()
    path = os.path.join(folder, f"{method}-{world}")
    saves, restores = [], []
    for rep in range(reps + 1):  # the first is the warm-up
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
            os.sync()
        s = timed(lambda: save(source, path))
        fresh = build(layers, False, seed=rep + 1)
        box = {}
        r = timed(lambda: box.setdefault("m", restore(fresh, path)))
        got = box["m"][0].weight.to_local()
        if not torch.equal(got, want):
            raise SystemExit(f"{method}: rank {rank}: restored weights differ")
        if rep:
            saves.append(s)
            restores.append(r)
    if rank == 0:
        print("RESULT " + json.dumps({"save": saves, "restore": restores}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- the driver


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _group(method: str, world: int, folder: Path, layers: int, reps: int, limit: float) -> dict:
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", method, str(world), str(r), port, str(folder),
                               str(layers), str(reps)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(world)]
    try:
        outs = [p.communicate(timeout=limit) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs):
        bad = next(i for i, p in enumerate(procs) if p.returncode)
        return {"error": outs[bad][1].strip().splitlines()[-1] if outs[bad][1].strip() else f"exit {procs[bad].returncode}"}
    line = [ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[7:])


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.0f} ms [{min(xs) * 1e3:.0f}–{max(xs) * 1e3:.0f}]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        m, w, r, port, folder, layers, reps = argv[1:8]
        _worker(m, int(w), int(r), port, folder, int(layers), int(reps))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2,4", help="world sizes, comma-separated (default 1,2,4)")
    parser.add_argument("--mb", type=int, default=64, help="fp32 weight size in MB (4 MB per layer; default 64)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per group (default 3)")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--limit", type=float, default=600, help="seconds allowed per process group")
    args = parser.parse_args(argv)
    layers = max(1, round(args.mb * 1e6 / (1024 * 1024 * 4)))
    ranks = [int(x) for x in args.ranks.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="sharded-", dir=args.scratch))
    results: dict[str, dict[str, dict]] = {}
    try:
        for world in ranks:
            # the methods take turns; each group does all its repetitions (a process group
            # per repetition would mostly time the spawn), the order rotates by world size
            order = METHODS[world % 3:] + METHODS[:world % 3]
            for method in order:
                print(f"sharded: {world} rank(s), {method} ...", file=sys.stderr, flush=True)
                results.setdefault(str(world), {})[method] = _group(method, world, folder, layers, args.reps,
                                                                    args.limit)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    mb = layers * 1024 * 1024 * 4 / 1e6
    lines = [f"### Sharded checkpoints (FSDP2 on CPU, gloo; {layers} x Linear(1024, 1024), {mb:.0f} MB fp32)", "",
             "| ranks | method | save | restore | save: other / modelopt_c | restore: other / modelopt_c |",
             "| --- | --- | --- | --- | --- | --- |"]
    for world in ranks:
        row = results[str(world)]
        ours = row.get("modelopt_c", {})
        for method in METHODS:
            r = row[method]
            if "error" in r:
                lines.append(f"| {world} | {method} | failed: {r['error']} | | | |")
                continue
            ratio = lambda k: (f"{statistics.median(r[k]) / statistics.median(ours[k]):.2f}"  # noqa: E731
                               if method != "modelopt_c" and k in ours else "")
            lines.append(f"| {world} | {method} | {_fmt(r['save'])} | {_fmt(r['restore'])} | {ratio('save')} | "
                         f"{ratio('restore')} |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sharded.md").write_text(table)
    (args.out / "sharded.json").write_text(json.dumps({"layers": layers, "reps": args.reps, "results": results},
                                                      indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
