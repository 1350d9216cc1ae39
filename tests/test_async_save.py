"""async_save: a snapshot now, the crash-safe write in the background, errors never silent."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn as nn

import modelopt_c as mto
from modelopt_c import background


def model_with(value: float, layers: int = 3) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)])
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


def restored(path, layers: int = 3) -> nn.Module:
    return mto.restore(nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)]), path)


@pytest.fixture(autouse=True)
def _no_save_left_running():
    yield
    try:
        mto.wait_for_saves()
    except mto.CheckpointError:
        pass


@pytest.mark.parametrize("name", ["m.pt", "m.safetensors"])
def test_the_file_holds_the_model_as_it_was_at_the_call(tmp_path, name):
    model = model_with(1.5)
    handle = mto.async_save(model, tmp_path / name)
    with torch.no_grad():  # the training loop goes on at once
        for p in model.parameters():
            p.fill_(-7.0)
    assert handle.result() is None and handle.done()
    back = restored(tmp_path / name)
    assert all(torch.equal(p, torch.full_like(p, 1.5)) for p in back.parameters())
    assert "done" in repr(handle) and name in repr(handle)


def test_ties_views_and_extra_are_snapshotted_too(tmp_path):
    model = model_with(0.25)
    model[2].weight = model[0].weight  # tied
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 8)).sum().backward()
    opt.step()
    extra = {"optimizer": opt.state_dict(), "step": 12, "view": model[1].weight[2:4]}
    expected_view = model[1].weight[2:4].detach().clone()
    expected_momentum = [v["momentum_buffer"].clone() for v in opt.state_dict()["state"].values()]
    handle = mto.async_save(model, tmp_path / "t.safetensors", extra=extra)
    opt.step()  # changes the momentum buffers in place
    handle.result()
    got = mto.load_extra(tmp_path / "t.safetensors")
    assert got["step"] == 12 and torch.equal(got["view"], expected_view)
    for saved, want in zip(got["optimizer"]["state"].values(), expected_momentum):
        assert torch.equal(saved["momentum_buffer"], want)
    snap = background._snapshot(model.state_dict(), {})
    assert snap["0.weight"].untyped_storage().data_ptr() == snap["2.weight"].untyped_storage().data_ptr()
    assert snap["0.weight"].untyped_storage().data_ptr() != model[0].weight.untyped_storage().data_ptr()


def test_one_save_in_flight_and_in_order(tmp_path, monkeypatch):
    release = threading.Event()
    order = []
    real = background.write_checkpoint

    def slow_write(f, *args, **kwargs):
        if f.endswith("first.pt"):
            assert release.wait(30)
        real(f, *args, **kwargs)
        order.append(os.path.basename(f))

    monkeypatch.setattr(background, "write_checkpoint", slow_write)
    model = model_with(1.0)
    first = mto.async_save(model, tmp_path / "first.pt")
    assert not first.done()
    threading.Timer(0.2, release.set).start()
    second = mto.async_save(model, tmp_path / "second.pt")  # waits for the first to finish
    assert first.done()
    second.result()
    assert order == ["first.pt", "second.pt"]


def test_a_failure_surfaces_on_the_handle_and_once_at_the_next_save(tmp_path):
    model = model_with(1.0)
    missing = tmp_path / "no" / "such" / "dir" / "m.pt"
    handle = mto.async_save(model, missing)
    with pytest.raises(mto.CheckpointError, match=r"the background save to .*m\.pt.* failed") as info:
        handle.result()
    assert isinstance(info.value.__cause__, (OSError, mto.CheckpointError))
    mto.async_save(model, tmp_path / "ok.pt").result()  # already seen: the next save goes ahead

    mto.async_save(model, missing)  # this time nobody looks at the handle
    with pytest.raises(mto.CheckpointError, match="nothing called its handle's result"):
        mto.save(model, tmp_path / "next.pt")
    assert not (tmp_path / "next.pt").exists()
    mto.save(model, tmp_path / "next.pt")  # reported once
    assert (tmp_path / "next.pt").exists()


def test_refusals_happen_in_the_call(tmp_path):
    model = model_with(1.0)
    with pytest.raises(TypeError, match="async_save needs a file path"):
        mto.async_save(model, open(os.devnull, "wb"))
    with pytest.raises(ValueError):
        mto.async_save(model, tmp_path / "no-number.pt", keep_last=2)


def test_a_kill_during_the_background_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    mto.save(model_with(2.0), path)
    code = textwrap.dedent(f"""
        import os, torch, torch.nn as nn, modelopt_c as mto
        from modelopt_c import background, checkpoint
        real = checkpoint._save_torch_progress
        def write_then_die(f, ckpt, kwargs, progress):
            checkpoint.save_torch_file(f, ckpt, _started=lambda temp: os.kill(os.getpid(), 9))
        background.write_checkpoint.__globals__["_save_torch_progress"] = write_then_die
        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)])
        mto.async_save(model, {str(path)!r}).result()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    back = restored(path)
    assert all(torch.equal(p, torch.full_like(p, 2.0)) for p in back.parameters())


def test_the_next_save_copies_into_the_last_ones_buffers(tmp_path):
    model = model_with(1.0)
    mto.async_save(model, tmp_path / "a.pt").result()
    kept = {b.data_ptr() for free in background._pool.values() for b in free}
    assert len(kept) == len(model.state_dict())  # one buffer per storage
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    copies: dict = {}
    snap = background._snapshot(model.state_dict(), copies)  # takes the kept buffers
    assert {t.untyped_storage().data_ptr() for t in snap.values()} == kept
    assert all(torch.equal(t, torch.full_like(t, 3.0)) for t in snap.values())
    background._keep(list(copies.values()))  # give them back, as a finished save does
    mto.async_save(model, tmp_path / "b.pt").result()
    assert all(torch.equal(p, torch.full_like(p, 3.0)) for p in restored(tmp_path / "b.pt").parameters())
    assert all(torch.equal(p, torch.full_like(p, 1.0)) for p in restored(tmp_path / "a.pt").parameters())
    mto.wait_for_saves(release=True)
    assert background._pool == {}


def test_without_pinned_memory_the_buffers_are_plain_and_it_is_said_once(monkeypatch, recwarn):
    # a device source asks for page-locked buffers; without them (no accelerator here, or
    # none left) the copy goes to plain memory and a UserWarning says so, once per process
    monkeypatch.setattr(background, "_unpinned_noted", False)
    monkeypatch.setattr(background, "_pool", {})
    first, second = background._buffer(64, True), background._buffer(32, True)
    assert first.numel() == 64 and second.numel() == 32 and first.dtype == torch.uint8
    notes = [w for w in recwarn if "page-locked" in str(w.message)]
    if torch.cuda.is_available():
        assert first.is_pinned() and not notes
        return
    assert not first.is_pinned() and len(notes) == 1 and notes[0].category is UserWarning
    # torch's reason in the parentheses varies with the build (CPU wheel, CUDA wheel without a driver)
    assert re.fullmatch(
        r"modelopt_c: no page-locked \(pinned\) host memory for async_save's copies \(.+\): tensors on the "
        r"device are copied into plain host memory, synchronously \(async_save returns later; the file is the "
        r"same\)\. Said once per process\.", str(notes[0].message)), str(notes[0].message)
    background._keep([first])  # a finished save gives it back: the next device copy takes it
    assert background._buffer(64, True).data_ptr() == first.data_ptr()
