"""save / restore in the torch format: SPEC §3, §6, §10 and issue 3."""

import io
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import modelopt_c as mto
from modes import TinyNet

SM = mto.ModeloptStateManager
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def converted(net):
    return mto.apply_mode(net, ["t_replace", ("t_sparse", {"sparsity": 0.5})])


def _temps(folder):
    return [p for p in os.listdir(folder) if ".tmp-" in p]


def test_file_is_the_reference_dictionary(converted, tmp_path):
    path = tmp_path / "ckpt.pt"
    mto.save(converted, path)
    objs = torch.load(path, weights_only=True)
    assert set(objs) == {"modelopt_state", "model_state_dict"}
    assert objs["modelopt_state"] == mto.modelopt_state(converted)
    assert objs["model_state_dict"].keys() == converted.state_dict().keys()
    assert _temps(tmp_path) == []


def test_roundtrip_outputs_identical_and_weights_copied_in_place(converted, tmp_path, x):
    path = tmp_path / "ckpt.pt"
    mto.save(converted, str(path))
    fresh = TinyNet()
    weight = fresh.fc1.weight
    restored = mto.restore(fresh, path)
    assert restored is fresh and restored.fc1.weight is weight  # same Parameter, new values
    assert torch.equal(restored(x), converted(x))
    assert restored._modelopt_state == mto.modelopt_state(converted)["modelopt_state_dict"]
    assert restored.fc1.weight.requires_grad


def test_restore_from_model_like_recipe(converted, tmp_path, x):
    mto.save(converted, tmp_path / "c.pt")
    restored = mto.restore((TinyNet, (8,)), tmp_path / "c.pt")
    assert isinstance(restored, TinyNet) and torch.equal(restored(x), converted(x))


def test_file_objects(converted, x):
    buf = io.BytesIO()
    mto.save(converted, buf)
    buf.seek(0)
    restored = mto.restore(TinyNet(), buf)
    assert torch.equal(restored(x), converted(x))


def test_meta_device_model_is_materialised_from_the_file(converted, tmp_path, x):
    mto.save(converted, tmp_path / "c.pt")
    with torch.device("meta"):
        empty = TinyNet()
    restored = mto.restore(empty, tmp_path / "c.pt")
    assert all(not t.is_meta for t in restored.state_dict().values())
    assert torch.equal(restored(x), converted(x))
    assert isinstance(restored.fc1.weight, nn.Parameter)


def test_save_unwraps_with_a_warning_and_restore_refuses_wrapped(converted, tmp_path):
    with pytest.warns(UserWarning, match="is wrapped; unwrapping it to save"):
        mto.save(nn.DataParallel(converted), tmp_path / "c.pt")
    with pytest.raises(ValueError, match="wrapped; restore into the unwrapped model first"):
        mto.restore(nn.DataParallel(TinyNet()), tmp_path / "c.pt")


def test_kwargs_reach_torch_save_and_load(converted, tmp_path):
    mto.save(converted, tmp_path / "c.pt", pickle_protocol=2, _use_new_zipfile_serialization=True)
    restored = mto.restore(TinyNet(), tmp_path / "c.pt", map_location="cpu", mmap=False)
    assert restored.fc1.weight.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_map_location_cuda(converted, tmp_path, x):
    mto.save(converted, tmp_path / "c.pt")
    model = TinyNet().cuda()
    restored = mto.restore(model, tmp_path / "c.pt", map_location="cuda")
    assert restored.fc1.weight.is_cuda
    assert torch.equal(restored(x.cuda()).cpu(), converted(x))


# ---- crash safety ---------------------------------------------------------------------


def test_failed_save_keeps_the_old_file(converted, tmp_path):
    path = tmp_path / "c.pt"
    mto.save(converted, path)
    before = path.read_bytes()
    converted._modelopt_state[0][1]["metadata"]["oops"] = lambda: None  # not picklable
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        mto.save(converted, path)
    assert path.read_bytes() == before
    assert _temps(tmp_path) == []


def test_killed_save_keeps_the_old_file_and_the_next_save_cleans_up(converted, tmp_path):
    path = tmp_path / "c.pt"
    mto.save(converted, path)
    before = path.read_bytes()
    # A writer SIGKILLed by a watcher thread while its temp file is being written.
    script = textwrap.dedent(f"""
        import os, signal, sys, threading, time, torch, torch.nn as nn
        sys.path.insert(0, {ROOT!r})
        import modelopt_c as mto
        folder, target = {str(tmp_path)!r}, {str(path)!r}
        def watch():
            while True:
                temps = [p for p in os.listdir(folder) if ".tmp-" in p]
                if temps and os.path.getsize(os.path.join(folder, temps[0])) > (1 << 20):
                    print("killing while writing", temps[0], flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(0.001)
        threading.Thread(target=watch, daemon=True).start()
        big = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(64)])  # 256 MiB
        mto.save(big, target)
        print("save finished before the kill", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert "killing while writing" in proc.stdout
    assert path.read_bytes() == before  # the old file survived
    assert len(_temps(tmp_path)) == 1  # the dead writer's temp file...
    mto.save(converted, path)
    assert _temps(tmp_path) == []  # ...is removed by the next save to that target


def test_save_to_a_missing_folder(converted, tmp_path):
    target = tmp_path / "no" / "such" / "c.pt"
    with pytest.raises(FileNotFoundError) as info:
        mto.save(converted, target)
    assert info.value.filename == str(target)


def test_save_below_a_file(converted, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError):
        mto.save(converted, tmp_path / "afile" / "c.pt")


# ---- safe loading ------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused(tmp_path, converted):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"modelopt_state": mto.modelopt_state(converted), "model_state_dict": {}, "x": _Evil(str(marker))}, path)
    with pytest.raises(pickle.UnpicklingError) as info:
        mto.restore(TinyNet(), path)
    msg = str(info.value)
    assert str(path) in msg and "refused to load" in msg and "weights_only=False" in msg
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="refused to load"):
        mto.load_modelopt_state(path)
    assert not marker.exists()


def test_explicit_opt_in_loads_trusted_pickles(tmp_path, converted):
    path = tmp_path / "trusted.pt"
    mto.save(converted, path)
    restored = mto.restore(TinyNet(), path, weights_only=False)
    assert SM.is_converted(restored)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint", b"PK\x03\x04garbage" * 10])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(mto.CheckpointError) as info:
        mto.restore(TinyNet(), path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


def test_truncated_checkpoints(converted, tmp_path):
    path = tmp_path / "c.pt"
    mto.save(converted, path)
    data = path.read_bytes()
    for cut in sorted({1, 10, 100, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1}):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        model = TinyNet()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(mto.CheckpointError, match=str(bad)):
            mto.restore(model, bad)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plain_state_dict_file_is_not_a_modelopt_checkpoint(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(TinyNet().state_dict(), path)
    with pytest.raises(mto.CheckpointError, match="is not a modelopt checkpoint: expected a dict with 'modelopt_state'"):
        mto.restore(TinyNet(), path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        mto.restore(TinyNet(), tmp_path / "nope.pt")


def test_other_architecture_lists_keys_and_copies_nothing(tmp_path):
    plain = TinyNet()
    mto.save(plain, tmp_path / "c.pt")
    wider = TinyNet(width=5)
    before = wider.fc1.weight.clone()
    with pytest.raises(RuntimeError) as info:
        mto.restore(wider, tmp_path / "c.pt")
    msg = str(info.value)
    assert msg.startswith("Error(s) in loading state_dict for TinyNet:")
    assert "size mismatch for fc1.weight: copying a param with shape torch.Size([8, 4]) from checkpoint, the shape in current model is torch.Size([5, 4])." in msg
    assert str(tmp_path / "c.pt") in msg and "nothing was copied" in msg
    assert torch.equal(wider.fc1.weight, before)

    renamed = nn.Sequential(nn.Linear(4, 8))
    with pytest.raises(RuntimeError) as info:
        mto.restore(renamed, tmp_path / "c.pt")
    msg = str(info.value)
    assert 'Missing key(s) in state_dict: "0.weight", "0.bias".' in msg
    assert 'Unexpected key(s) in state_dict: "calls", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias".' in msg


def test_custom_loading_modules_use_torch_loader(tmp_path, x):
    class Custom(nn.Linear):
        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
            if prefix + "weight" in state_dict:
                state_dict[prefix + "weight"] = state_dict[prefix + "weight"] * 1  # custom logic
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    torch.manual_seed(3)
    model = nn.Sequential(Custom(4, 2))
    mto.save(model, tmp_path / "c.pt")
    fresh = nn.Sequential(Custom(4, 2))
    assert torch.equal(mto.restore(fresh, tmp_path / "c.pt")(x), model(x))
    with pytest.raises(RuntimeError, match="Missing key"):
        mto.restore(nn.Sequential(Custom(4, 2), Custom(2, 2)), tmp_path / "c.pt")


def test_legacy_torch_format_restores_without_mmap(converted, tmp_path, x):
    path = tmp_path / "legacy.pt"
    mto.save(converted, path, _use_new_zipfile_serialization=False)
    assert not path.read_bytes().startswith(b"PK")
    assert torch.equal(mto.restore(TinyNet(), path)(x), converted(x))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is absent")
def test_device_errors_are_not_reported_as_corruption(converted, tmp_path):
    mto.save(converted, tmp_path / "c.pt")
    with pytest.raises(RuntimeError, match="CUDA") as info:
        mto.restore(TinyNet(), tmp_path / "c.pt", map_location="cuda")
    assert not isinstance(info.value, mto.CheckpointError)


@pytest.mark.parametrize("verify", [True, False])
def test_verify_is_ours_and_never_reaches_torch_load(converted, tmp_path, verify):
    # `verify` belongs to restore (the safetensors format's checksums); a torch-format
    # file has none, and torch.load must not see the keyword
    path = tmp_path / "ckpt.pt"
    mto.save(converted, path)
    restored = mto.restore(TinyNet(), path, verify=verify)
    for key, value in converted.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_the_reference_keyword_arguments_and_real_signatures(converted, tmp_path, x):
    """save/restore/load_modelopt_state/restore_from_modelopt_state take the reference's
    keywords (modelopt.torch.opt: save(model, f, **kwargs), restore(model, f, **kwargs), ...)."""
    import inspect

    path = tmp_path / "kw.pt"
    mto.save(model=converted, f=path)
    restored = mto.restore(model=TinyNet(), f=path, map_location="cpu")
    assert torch.equal(restored(x), converted(x))
    state_path = tmp_path / "state.pt"
    torch.save(mto.modelopt_state(converted), state_path)
    state = mto.load_modelopt_state(modelopt_state_path=state_path)
    assert state == mto.modelopt_state(converted)
    again = mto.restore_from_modelopt_state(model=TinyNet(), modelopt_state_path=state_path)
    assert SM(again).state_dict() == SM(converted).state_dict()
    assert list(inspect.signature(mto.save).parameters) == ["model", "f", "format", "kwargs"]
    assert list(inspect.signature(mto.restore).parameters) == ["model", "f", "kwargs"]
    assert list(inspect.signature(mto.load_modelopt_state).parameters) == ["modelopt_state_path", "kwargs"]
    assert list(inspect.signature(mto.restore_from_modelopt_state).parameters) == [
        "model", "modelopt_state", "modelopt_state_path"]
    with pytest.raises(AssertionError, match="^Either modelopt_state or modelopt_state_path must be provided"):
        mto.restore_from_modelopt_state(TinyNet())
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'f'"):
        mto.save(converted)


def test_load_modelopt_state_takes_map_location_as_torch_load(converted, tmp_path):
    state = mto.modelopt_state(converted)
    state["modelopt_state_dict"][0][1]["metadata"]["scale"] = torch.arange(3.0)  # a mode's tensor
    path = tmp_path / "state.pth"
    torch.save(state, path)
    for location in ("meta", torch.device("meta"), {"cpu": "meta"}, {"cpu": torch.device("meta")},
                     lambda s, loc: torch.UntypedStorage(s.nbytes(), device="meta")):
        loaded = mto.load_modelopt_state(path, map_location=location)
        assert loaded["modelopt_state_dict"][0][1]["metadata"]["scale"].device.type == "meta"
    assert torch.equal(mto.load_modelopt_state(path)["modelopt_state_dict"][0][1]["metadata"]["scale"], torch.arange(3.0))
    with pytest.raises(TypeError, match=r"state\.pth': map_location must be a device \(str, int or torch\.device\), a "
                       r"dict \{saved location: location\} or a function\(storage, location\) as for torch\.load, not list\."):
        mto.load_modelopt_state(path, map_location=["cpu"])
