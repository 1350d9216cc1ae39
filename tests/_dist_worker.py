"""One rank of the spawned process groups of tests/test_distributed.py.

Usage: python tests/_dist_worker.py <phase> <folder> <rank> <world> <port>.
Each rank joins a gloo group on 127.0.0.1 with a short timeout, runs the phase and
prints one line ``RESULT <json>``; the test compares the ranks' lines.  Every model is
TinyNet (seed 0) with the test modes t_replace + t_sparse applied before sharding, so
its weights include the modes' buffers; ``ref.pt`` is its full state dict (torch.save),
``ref2.pt`` the same after a change (the second save of the killed-rank phase).
"""

from __future__ import annotations

import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

import modelopt_c as mto  # noqa: E402
from modelopt_c import checkpoint  # noqa: E402
from modes import TinyNet, facade, register  # noqa: E402

REGISTERED = register(facade("modelopt_c"))
MODES = ["t_replace", ("t_sparse", {"sparsity": 0.5})]


def converted(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return mto.apply_mode(TinyNet(width=width), MODES)


def shard(model: nn.Module, kind: str, world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.fc1, mesh=mesh)
        fully_shard(model.fc2, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(model, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    return model


def full(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.full_tensor() if hasattr(v, "full_tensor") else v
    return out


def same_as(model: nn.Module, ref_path: str) -> list[str]:
    """The keys whose gathered values differ from the reference (bitwise); [] when all agree."""
    ref = torch.load(ref_path, weights_only=True)
    got = full(model)
    if sorted(got) != sorted(ref):
        return [f"keys {sorted(got)} != {sorted(ref)}"]
    return [k for k in ref if not (got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]))]


def kinds(model: nn.Module) -> list[str]:
    return sorted({type(v).__name__ for v in model.state_dict().values()})


def phase_ddp(folder: str, rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    writes = []
    original = checkpoint.save_torch_file

    def counting(path, obj, **kw):
        writes.append(os.path.basename(os.fspath(path)))
        return original(path, obj, **kw)

    checkpoint.save_torch_file = counting
    model = converted()
    ddp = DDP(model)
    path = os.path.join(folder, "ddp.pt")
    mto.save(ddp, path)  # rank 0 writes; everyone returns once the file is complete
    size_after_return = os.path.getsize(path)
    restored = mto.restore(TinyNet(), path)
    ok0 = same_as(restored, os.path.join(folder, "ref.pt"))
    mto.save(ddp, os.path.join(folder, "ddp1.pt"), rank=1)  # another writer, named
    mine = os.path.join(folder, f"ddp-rank{rank}.pt")
    mto.save(ddp, mine, rank="all")  # every rank its own path
    try:
        mto.save(ddp, os.path.join(folder, "bad.pt"), rank=world)
        bad = "saved"
    except ValueError as exc:
        bad = f"ValueError: {exc}"
    try:  # the writer fails: it raises its own error, the others learn it
        mto.save(ddp, os.path.join(folder, "no", "such", "x.pt"))
        failed = "saved"
    except Exception as exc:  # noqa: BLE001 - the message is the result
        failed = f"{type(exc).__name__}: {exc}"
    return {
        "failed_write": failed,
        "writes": writes,
        "size_after_return": size_after_return,
        "restored_diff": ok0,
        "restored_act": type(restored.act).__name__,
        "others_exist": sorted(n for n in os.listdir(folder) if n.startswith("ddp")),
        "bad_rank": bad,
    }


def phase_save(folder: str, rank: int, world: int) -> dict:
    out = {}
    for kind in ("fsdp", "tp"):
        model = shard(converted(), kind, world)
        target = os.path.join(folder, f"{kind}-{world}")
        mto.save(model, target)
        out[f"{kind}_kinds"] = kinds(model)
        out[f"{kind}_files"] = sorted(os.listdir(target))
        # the same world size: a fresh sharded model, modes replayed on it, weights loaded
        fresh = shard(TinyNet(), kind, world)
        fresh = mto.restore(fresh, target)
        out[f"{kind}_same_size_diff"] = same_as(fresh, os.path.join(folder, "ref.pt"))
        out[f"{kind}_act"] = type(fresh.act).__name__
    return out


def phase_restore(folder: str, rank: int, world: int, source_world: int) -> dict:
    out = {}
    for kind in ("fsdp", "tp"):
        model = shard(TinyNet(), kind, world)
        model = mto.restore(model, os.path.join(folder, f"{kind}-{source_world}"))
        out[f"{kind}_diff"] = same_as(model, os.path.join(folder, "ref.pt"))
        out[f"{kind}_kinds"] = kinds(model)
    return out


def phase_kill(folder: str, rank: int, world: int) -> dict:
    import torch.distributed.checkpoint as dcp

    model = shard(converted(), "tp", world)
    target = os.path.join(folder, "killed")
    mto.save(model, target)  # the previous checkpoint: complete
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    if rank == 0:
        torch.save(full(model), os.path.join(folder, "ref2.pt"))
    else:
        full(model)  # the gather is collective
    if rank == 1:
        def die(*args, **kwargs):
            os._exit(17)  # killed in the middle of writing its shards

        dcp.FileSystemWriter.write_data = die
    try:
        mto.save(model, target)
        return {"error": None}
    except Exception as exc:  # noqa: BLE001 - the message is the result
        return {"error": f"{type(exc).__name__}: {exc}", "is_checkpoint_error": isinstance(exc, mto.CheckpointError),
                "left": sorted(os.listdir(folder))}


def _int8_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def phase_int8(folder: str, rank: int, world: int) -> dict:
    """nvidia-modelopt's INT8 quantization on an FSDP2 model: saved and restored through us."""
    import modelopt.torch.quantization as mtq
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def calibrate(model):
        torch.manual_seed(2)
        for _ in range(4):
            model(torch.randn(8, 16))

    def sharded(model):
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    quantized = mtq.quantize(_int8_net(), mtq.INT8_DEFAULT_CFG, calibrate)
    if rank == 0:
        torch.save(dict(quantized.state_dict()), os.path.join(folder, "int8-ref.pt"))
    torch.manual_seed(1)
    x = torch.randn(4, 16)
    want = quantized(x)
    target = os.path.join(folder, "int8")
    mto.save(sharded(quantized), target)
    restored = mto.restore(sharded(_int8_net()), target)
    return {
        "diff": same_as(restored, os.path.join(folder, "int8-ref.pt")),
        "class": type(restored[0]).__name__,
        "same_output": bool(torch.equal(restored(x), want)),
    }


def main() -> None:
    phase, folder, rank, world, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20))
    if rank == 0 and phase in ("ddp", "save", "kill"):
        torch.save(dict(converted().state_dict()), os.path.join(folder, "ref.pt"))
    dist.barrier()
    if phase == "ddp":
        result = phase_ddp(folder, rank, world)
    elif phase == "save":
        result = phase_save(folder, rank, world)
    elif phase.startswith("restore-from-"):
        result = phase_restore(folder, rank, world, int(phase.rsplit("-", 1)[1]))
    elif phase == "kill":
        result = phase_kill(folder, rank, world)
    elif phase == "int8":
        result = phase_int8(folder, rank, world)
    else:
        raise SystemExit(f"unknown phase {phase!r}")
    print("RESULT " + json.dumps(result), flush=True)
    if phase == "kill":
        os._exit(0)  # a peer is gone: tearing the group down could wait on it
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
