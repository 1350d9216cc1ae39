"""Spawned gloo process groups on CPU (marker `distributed`: the default run skips them).

Each test starts 2 or 4 ranks of tests/_dist_worker.py in a fresh interpreter with a
free port and a 20 s process-group timeout, under a hard wall-clock limit: a hang
kills every rank and fails the test.  Run with ``python -m pytest -m distributed``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import modelopt_c as mto
from modelopt_c import distributed
from modes import TinyNet

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_dist_worker.py")
LIMIT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(phase: str, folder, world: int, expect_rc: dict[int, int] | None = None) -> list[dict | None]:
    """Run ``phase`` on ``world`` ranks; each rank's RESULT (None for a rank that printed none)."""
    expect_rc = expect_rc or {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    port = str(_free_port())
    procs = [
        subprocess.Popen([sys.executable, WORKER, phase, str(folder), str(r), str(world), port], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    deadline = time.monotonic() + LIMIT_S
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{phase} on {world} ranks did not finish in {LIMIT_S} s (a hang): every rank killed")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        want = expect_rc.get(rank, 0)
        assert p.returncode == want, f"rank {rank} exited {p.returncode} (wanted {want}):\n{err[-3000:]}"
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        results.append(json.loads(lines[-1][7:]) if lines else None)
    return results


def _ref(folder, name="ref.pt") -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(folder, name), weights_only=True)


def _bitwise_equal(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders written by 2 and by 4 ranks (FSDP2 and tensor parallel), with each group's results."""
    folder = tmp_path_factory.mktemp("sharded")
    return folder, {2: spawn("save", folder, 2), 4: spawn("save", folder, 4)}


def test_ddp_saves_once_and_every_rank_restores(tmp_path):
    r0, r1 = spawn("ddp", tmp_path, 2)
    # rank 0 wrote ddp.pt and its own ddp-rank0.pt; rank 1 the named-writer file and its own
    assert r0["writes"] == ["ddp.pt", "ddp-rank0.pt", "x.pt"]  # x.pt: the failed write below
    assert r1["writes"] == ["ddp1.pt", "ddp-rank1.pt"]
    for r in (r0, r1):
        # back from save only once the file is whole: its size is the final size, and it restores
        assert r["size_after_return"] == os.path.getsize(tmp_path / "ddp.pt")
        assert r["restored_diff"] == [] and r["restored_act"] == "Tanh"
        assert r["others_exist"] == ["ddp-rank0.pt", "ddp-rank1.pt", "ddp.pt", "ddp1.pt"]
        assert r["bad_rank"] == "ValueError: save(rank=2): the writing rank must be an int in 0..1, or 'all'."
    ref = _ref(tmp_path)
    for name in ("ddp.pt", "ddp1.pt", "ddp-rank0.pt", "ddp-rank1.pt"):
        _bitwise_equal(mto.restore(TinyNet(), tmp_path / name).state_dict(), ref)
    assert not (tmp_path / "bad.pt").exists()
    missing = str(tmp_path / "no" / "such" / "x.pt")
    assert r0["failed_write"] == f"FileNotFoundError: [Errno 2] No such file or directory: {missing!r}"
    assert r1["failed_write"] == (f"CheckpointError: save: rank 0 failed to write {missing!r} (its own error says "
                                  "why); nothing was written.")


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_and_tensor_parallel_save_and_restore_on_the_same_world_size(saved, world):
    folder, results = saved
    for r in results[world]:
        for kind in ("fsdp", "tp"):
            assert r[f"{kind}_kinds"] == ["DTensor", "Tensor"]  # sharded weights, replicated mode buffers
            shards = [f"__{i}_0.distcp" for i in range(world)]
            assert r[f"{kind}_files"] == sorted([".metadata", distributed.STATE_FILE, *shards])
            assert r[f"{kind}_same_size_diff"] == [] and r[f"{kind}_act"] == "Tanh"
    # nothing but the folders and the reference beside them (no temp folders left)
    assert sorted(os.listdir(folder)) == sorted(["ref.pt", "fsdp-2", "tp-2", "fsdp-4", "tp-4"])


def test_two_rank_folders_restore_onto_four_ranks(saved):
    folder, _ = saved
    for r in spawn("restore-from-2", folder, 4):
        assert r == {"fsdp_diff": [], "fsdp_kinds": ["DTensor", "Tensor"],
                     "tp_diff": [], "tp_kinds": ["DTensor", "Tensor"]}


@pytest.mark.parametrize("source", ["fsdp-2", "tp-2", "fsdp-4", "tp-4"])
def test_sharded_folders_restore_into_one_process(saved, source):
    folder, _ = saved
    model = mto.restore(TinyNet(), folder / source)  # no process group: the whole model here
    assert type(model.act).__name__ == "Tanh" and hasattr(model.fc1, "weight_mask")
    _bitwise_equal(model.state_dict(), _ref(folder))
    state, weights = distributed.load_folder(folder / source)
    assert [name for name, _ in state["modelopt_state_dict"]] == ["t_replace", "t_sparse"]
    _bitwise_equal(weights, _ref(folder))


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    r0, r1 = spawn("kill", tmp_path, 2, expect_rc={1: 17})
    assert r1 is None  # rank 1 died while writing its shards
    assert r0["is_checkpoint_error"] is True
    msg = r0["error"]
    target = str(tmp_path / "killed")
    assert msg.startswith(f"CheckpointError: saving the sharded checkpoint {target!r} failed on rank 0 of 2 (")
    assert msg.endswith(f"; {target!r} was not changed (a previous checkpoint there is still whole).")
    assert "Connection" in msg or "imed out" in msg  # the peer's loss, in gloo's words
    # the first save is intact and restores; the temp folder of the failed one is gone
    assert r0["left"] == ["killed", "ref.pt", "ref2.pt"]
    assert sorted(os.listdir(tmp_path)) == ["killed", "ref.pt", "ref2.pt"]
    model = mto.restore(TinyNet(), tmp_path / "killed")
    _bitwise_equal(model.state_dict(), _ref(tmp_path))
    assert not torch.equal(model.fc1.weight, _ref(tmp_path, "ref2.pt")["fc1.weight"])


def test_nvidia_int8_quantized_fsdp2_model_saves_and_restores_through_us(tmp_path):
    import importlib.util

    if importlib.util.find_spec("modelopt") is None:
        pytest.skip("nvidia-modelopt is not installed (pip install nvidia-modelopt)")
    for r in spawn("int8", tmp_path, 2):
        # its quantize mode replayed on a fresh FSDP2 model, then every shard and amax loaded
        assert r == {"diff": [], "class": "QuantFSDPLinear", "same_output": True}
    state, weights = distributed.load_folder(tmp_path / "int8")
    assert [name for name, _ in state["modelopt_state_dict"]] == ["quantize", "max_calibrate"]
    _bitwise_equal(weights, _ref(tmp_path, "int8-ref.pt"))
