"""Periodic saves: extra= beside the model (both formats, nvidia-modelopt still restores),
load_extra, keep_last rotation, and a training run killed with SIGKILL that resumes
bit-identically (examples/train_resume.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import modelopt_c as mto
from modelopt_c import periodic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "examples", "train_resume.py")


def _trained():
    torch.manual_seed(0)
    model = mto.apply_mode(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), "t_replace")
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        sched.step()
    extra = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": 7,
             "rng": torch.get_rng_state(), "note": "run-a", "betas": (0.9, 0.999)}
    return model, extra


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", ["c.pt", "c.safetensors"])
def test_extra_round_trip(tmp_path, name):
    model, extra = _trained()
    path = tmp_path / name
    mto.save(model, path, extra=extra)
    assert _same(mto.load_extra(path), extra)
    fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    restored = mto.restore(fresh, path)  # the extra tensors are not taken for weights
    assert _same(restored.state_dict(), model.state_dict())
    info = mto.describe(path).info
    assert info["tensors"]["count"] == 4
    if name.endswith(".pt"):
        assert info["keys"] == ["betas", "model_state_dict", "modelopt_state", "note", "optimizer", "rng",
                                "scheduler", "step"]
    else:
        assert info["extra_tensors"]["count"] == 4 * 3 + 1 and "extra" in info["metadata"]


@pytest.mark.parametrize("name", ["c.pt", "c.safetensors"])
def test_load_extra_takes_map_location_as_torch_load(tmp_path, name):
    model, extra = _trained()
    path = tmp_path / name
    mto.save(model, path, extra=extra)
    got = mto.load_extra(path, map_location="meta")
    state = got["optimizer"]["state"][0]
    assert state["exp_avg"].device.type == "meta" and state["exp_avg"].shape == (8, 8)
    assert got["step"] == 7 and got["rng"].device.type == "meta"
    calls = []
    got = mto.load_extra(path, map_location=lambda storage, location: calls.append(location))
    assert _same(got, extra) and calls and set(calls) == {"cpu"}
    assert _same(mto.load_extra(path, map_location={"cpu": "cpu"}), extra)
    with pytest.raises(TypeError, match=rf"{name}': map_location must be a device \(str, int or torch\.device\), a "
                       r"dict \{saved location: location\} or a function\(storage, location\) as for torch\.load, "
                       r"not float\."):
        mto.load_extra(path, map_location=1.5)


def test_without_extra_load_extra_is_empty(tmp_path):
    model, _ = _trained()
    for name in ("a.pt", "a.safetensors"):
        mto.save(model, tmp_path / name)
        assert mto.load_extra(tmp_path / name) == {}


def test_nvidia_modelopt_restores_a_file_with_extra(tmp_path):
    from _optional import optional_import

    nvidia = optional_import("modelopt.torch.opt", "nvidia-modelopt")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mto.save(model, tmp_path / "c.pt", extra={"optimizer": opt.state_dict(), "step": 3})
    restored = nvidia.restore(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), tmp_path / "c.pt")
    assert _same(restored.state_dict(), model.state_dict())


def test_extra_errors(tmp_path):
    model, _ = _trained()
    with pytest.raises(TypeError, match=r"^extra must be a dict \(e\.g\. \{'optimizer': opt\.state_dict\(\), "
                       r"'step': step\}\), not list\.$"):
        mto.save(model, tmp_path / "a.pt", extra=[1])
    with pytest.raises(ValueError, match=r"^extra key 'model_state_dict' is the checkpoint's own"):
        mto.save(model, tmp_path / "a.pt", extra={"model_state_dict": {}})
    with pytest.raises(TypeError, match=r"^extra's keys must be str; got 3\.$"):
        mto.save(model, tmp_path / "a.safetensors", extra={3: 1})
    with pytest.raises(TypeError, match=r"a\.safetensors: extra cannot be stored in the safetensors-compatible "
                       r"format: .*save to a \.pt path for the torch format"):
        mto.save(model, tmp_path / "a.safetensors", extra={"obj": object()})
    assert os.listdir(tmp_path) == []
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(mto.CheckpointError, match=r"plain\.pt' is not a modelopt checkpoint written by save\(\): "
                       r"it holds no extra$"):
        mto.load_extra(tmp_path / "plain.pt")
    (tmp_path / "junk.bin").write_bytes(b"junk" * 10)
    with pytest.raises(mto.CheckpointError, match=r"junk\.bin' is not a checkpoint"):
        mto.load_extra(tmp_path / "junk.bin")


def test_reserved_extra_prefix_in_a_state_dict_is_refused(tmp_path):
    class Odd(nn.Module):
        def state_dict(self, *args, **kwargs):
            return {"__modelopt_extra__.0": torch.ones(1)}

    with pytest.raises(mto.CheckpointError, match=r"state_dict key '__modelopt_extra__\.0' uses the reserved "
                       r"prefix '__modelopt_extra__\.'"):
        mto.save(Odd(), tmp_path / "o.safetensors")


def test_keep_last_rotation(tmp_path):
    model, extra = _trained()
    (tmp_path / "other-000001.pt").write_bytes(b"x")  # another series: untouched
    (tmp_path / "ckpt-notes.txt").write_bytes(b"x")
    for step in (1, 2, 10, 3):  # numbers, not names, decide: 000010 is the newest
        mto.save(model, tmp_path / f"ckpt-{step:06d}.pt", keep_last=2, extra={"step": step})
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000003.pt", "ckpt-000010.pt", "ckpt-notes.txt", "other-000001.pt"]
    assert periodic.checkpoint_series(tmp_path / "ckpt-000099.pt") == [
        (3, str(tmp_path / "ckpt-000003.pt")), (10, str(tmp_path / "ckpt-000010.pt"))]
    with pytest.raises(ValueError, match=r"^keep_last needs a numbered file name such as 'ckpt-\{step\}\.pt'; "
                       r"'last\.pt' has no number\.$"):
        mto.save(model, tmp_path / "last.pt", keep_last=2)
    assert not (tmp_path / "last.pt").exists()
    with pytest.raises(ValueError, match=r"^keep_last must be a positive int, not 0\.$"):
        mto.save(model, tmp_path / "ckpt-000011.pt", keep_last=0)


def _losses(path) -> dict[int, str]:
    out: dict[int, str] = {}
    with open(path) as f:
        for line in f:
            step, value = line.split()
            out[int(step)] = value  # a step redone after a resume: its last value
    return out


@pytest.mark.slow  # three training processes: ~15 s alone, more under load (CI runs -m slow)
def test_sigkill_mid_training_then_resume_is_bit_identical(tmp_path):
    steps = 24
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, TRAIN, "--steps", str(steps)]
    ref = subprocess.Popen(cmd + ["--dir", str(tmp_path / "ref"), "--log", str(tmp_path / "ref.log")], env=env)
    run = subprocess.Popen(cmd + ["--dir", str(tmp_path / "run"), "--log", str(tmp_path / "run.log")], env=env)
    try:
        deadline = time.monotonic() + 120  # a guard against a hung child, not a measurement
        while run.poll() is None and time.monotonic() < deadline:
            if (tmp_path / "run.log").exists() and len(_losses(tmp_path / "run.log")) >= steps // 2:
                break
            time.sleep(0.02)
        assert run.poll() is None, "the run ended before it could be killed"
        os.kill(run.pid, signal.SIGKILL)
        assert run.wait(60) == -signal.SIGKILL
        killed_at = max(_losses(tmp_path / "run.log"))
        assert killed_at < steps - 1
        resumed = subprocess.run(cmd + ["--dir", str(tmp_path / "run"), "--log", str(tmp_path / "run.log")],
                                 env=env, timeout=120, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr
        assert ref.wait(120) == 0
    finally:
        for p in (ref, run):
            if p.poll() is None:
                p.kill()
    want, got = _losses(tmp_path / "ref.log"), _losses(tmp_path / "run.log")
    assert sorted(want) == list(range(steps)) and got == want
    # the last two checkpoints only, no temp file of the killed save left behind
    assert sorted(os.listdir(tmp_path / "run")) == [f"ckpt-{steps - 2:06d}.pt", f"ckpt-{steps - 1:06d}.pt"]
    assert mto.load_extra(tmp_path / "run" / f"ckpt-{steps - 1:06d}.pt")["step"] == steps - 1


def test_a_killed_save_s_temp_file_goes_at_the_next_save_to_any_name(tmp_path):
    # the child is killed while its save holds the temp file: the progress hook, called
    # once the temp file exists and before torch.save writes, blocks it there
    script = (
        "import sys, time, torch, modelopt_c as mto\n"
        "def hook(done, total):\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(3600)\n"
        "mto.save(torch.nn.Linear(64, 64), sys.argv[1], progress=hook)\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONWARNINGS": "ignore"}
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "big.pt")], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "writing\n"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
    (temp,) = os.listdir(tmp_path)
    assert temp.startswith(".big.pt.tmp-")
    mto.save(nn.Linear(1, 1), tmp_path / "other.pt")  # a different name, same folder
    assert os.listdir(tmp_path) == ["other.pt"]
