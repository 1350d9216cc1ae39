"""The safetensors-compatible format through the public save / restore (issue 4)."""

import io
import os

import pytest
import torch
import torch.nn as nn

import modelopt_c as mto
from _optional import optional_import
from modes import TinyNet


@pytest.fixture
def converted(net):
    return mto.apply_mode(net, ["t_replace", ("t_sparse", {"sparsity": 0.5})])


def test_suffix_selects_the_format_and_restore_matches(converted, tmp_path, x):
    path = tmp_path / "c.safetensors"
    mto.save(converted, path)
    assert path.read_bytes()[8:9] == b"{"
    restored = mto.restore(TinyNet(), path)
    assert torch.equal(restored(x), converted(x))
    assert restored._modelopt_state == mto.modelopt_state(converted)["modelopt_state_dict"]


def test_restore_detects_the_format_from_bytes_not_name(converted, tmp_path, x):
    path = tmp_path / "looks_like_torch.pt"
    mto.save(converted, path, format="safetensors")
    assert torch.equal(mto.restore(TinyNet(), path)(x), converted(x))
    other = tmp_path / "looks_like_st.safetensors"
    mto.save(converted, other, format="torch")
    assert other.read_bytes().startswith(b"PK")
    assert torch.equal(mto.restore(TinyNet(), other)(x), converted(x))


def test_any_safetensors_reader_gets_the_weights(converted, tmp_path):
    from safetensors.torch import load_file

    mto.save(converted, tmp_path / "c.safetensors")
    loaded = load_file(str(tmp_path / "c.safetensors"))
    weights = {k: v for k, v in loaded.items() if not k.startswith("__modelopt_state__.")}
    expected = converted.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_meta_model_restores_from_the_mapping(converted, tmp_path, x):
    mto.save(converted, tmp_path / "c.safetensors")
    with torch.device("meta"):
        skeleton = TinyNet()
    restored = mto.restore(skeleton, tmp_path / "c.safetensors")
    assert torch.equal(restored(x), converted(x))


def test_state_tensors_survive(tmp_path, net):
    model = mto.apply_mode(net, "t_sparse")  # its metadata holds a torch.Size
    mto.save(model, tmp_path / "c.safetensors")
    restored = mto.restore(TinyNet(), tmp_path / "c.safetensors")
    assert restored._modelopt_state[0][1]["metadata"]["shape"] == torch.Size([2, 3])


def test_format_arguments(converted, tmp_path):
    with pytest.raises(ValueError, match="Unknown checkpoint format 'onnx': use 'torch' or 'safetensors'."):
        mto.save(converted, tmp_path / "c.bin", format="onnx")
    with pytest.raises(TypeError, match="format='safetensors' needs a file path"):
        mto.save(converted, io.BytesIO(), format="safetensors")
    with pytest.raises(TypeError, match="takes no torch.save options"):
        mto.save(converted, tmp_path / "c.safetensors", pickle_protocol=2)
    assert not list(tmp_path.iterdir())


def test_corrupt_file_names_the_file(converted, tmp_path):
    path = tmp_path / "c.safetensors"
    mto.save(converted, path)
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match=str(path)):
        mto.restore(TinyNet(), path)


def test_wrong_architecture_from_safetensors(converted, tmp_path):
    mto.save(converted, tmp_path / "c.safetensors")
    with pytest.raises(RuntimeError, match="Missing key"):
        mto.restore(nn.Sequential(nn.Linear(4, 8)), tmp_path / "c.safetensors")


def test_reference_checkpoint_converted_by_the_cli_restores(tmp_path, x):
    mo = optional_import("modelopt.torch.opt", "nvidia-modelopt")
    mts = optional_import("modelopt.torch.sparsity", "nvidia-modelopt")
    from modelopt_c.cli import main

    torch.manual_seed(0)
    model = mts.sparsify(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "sparse_magnitude")
    mo.save(model, tmp_path / "ref.pt")
    assert main(["convert", str(tmp_path / "ref.pt"), str(tmp_path / "ref.safetensors")]) == 0
    torch.manual_seed(5)
    restored = mto.restore(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), tmp_path / "ref.safetensors")
    assert torch.equal(restored(x), model(x))


@pytest.mark.parametrize("name", ["c.pt", "c.safetensors"])
def test_temp_files_of_dead_writers_are_removed_live_ones_kept(converted, tmp_path, name):
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    stale = tmp_path / f".{name}.tmp-{dead_pid}-deadbeef"
    live = tmp_path / f".{name}.tmp-{os.getppid()}-cafecafe"  # pytest's parent is alive
    other = tmp_path / f".other.pt.tmp-{dead_pid}-deadbeef"  # another target's, its writer gone too (issue 9)
    for p in (stale, live, other):
        p.write_bytes(b"half-written")
    mto.save(converted, tmp_path / name)
    assert not stale.exists() and live.exists() and not other.exists()
    assert (tmp_path / name).exists()


def test_replacement_keeps_the_old_file_permissions(converted, tmp_path):
    import os
    import stat

    for name in ("p.pt", "p.safetensors"):
        path = tmp_path / name
        mto.save(converted, path)
        os.chmod(path, 0o640)
        mto.save(converted, path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_map_location_for_the_safetensors_format(converted, tmp_path, x):
    path = tmp_path / "c.safetensors"
    mto.save(converted, path)
    restored = mto.restore(TinyNet(), path, map_location="cpu")
    assert torch.equal(restored(x), converted(x))
    # a dict maps saved locations, as torch.load's does: this file's tensors were saved at "cpu"
    restored = mto.restore(TinyNet(), path, map_location={"cuda:0": "meta"})
    assert torch.equal(restored(x), converted(x))
    with pytest.raises(TypeError, match=r"c\.safetensors': map_location must be a device \(str, int or torch\.device\), "
                       r"a dict \{saved location: location\} or a function\(storage, location\) as for torch\.load, "
                       r"not float\."):
        mto.restore(TinyNet(), path, map_location=1.5)
    with pytest.raises(TypeError, match=r"c\.safetensors': a map_location dict maps saved locations to locations, both "
                       r"device strings such as \{'cpu': 'cuda:0'\} \(as for torch\.load\); not 'cpu': 0\."):
        mto.restore(TinyNet(), path, map_location={"cpu": 0})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_map_location_cuda_fills_a_gpu_model_without_a_second_copy(tmp_path, suffix):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 8))  # 4 MiB of weights
    path = tmp_path / f"c.{suffix}"
    mto.save(model, path)
    target = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 8)).cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    restored = mto.restore(target, path, map_location="cuda")
    torch.cuda.synchronize()
    assert restored[0].weight.is_cuda and torch.equal(restored[0].weight.cpu(), model[0].weight)
    # copied from the mapped file straight into the model's tensors: no copy of the
    # weights on the GPU first (that alone would be 4 MiB)
    assert torch.cuda.max_memory_allocated() - before < (1 << 20)


def _with_state_tensor(model):
    """``model`` with tensors in its mode metadata (as a mode's may hold): the state's own tensors."""
    meta = model._modelopt_state[0][1]["metadata"]
    meta["scale"] = torch.arange(6.0).reshape(2, 3)
    meta["scale_t"] = meta["scale"].t()  # a view (the torch format keeps it one; ours stores two tensors)
    return model


def _state_tensors(model):
    meta = model._modelopt_state[0][1]["metadata"]
    return meta["scale"], meta["scale_t"]


@pytest.mark.parametrize("suffix, location", [
    ("safetensors", "meta"), ("safetensors", torch.device("meta")), ("safetensors", {"cpu": "meta"}),
    ("pt", "meta"), ("pt", torch.device("meta")),
])
def test_map_location_places_the_state_tensors_and_copies_weights_from_the_cpu(converted, tmp_path, x, suffix,
                                                                               location):
    # torch.load places every tensor of a file, also those in the mode metadata; a model
    # with data is filled from the CPU mapping straight (no copy of the weights on the
    # device first: were the weights moved to "meta", copying them in would fail).  (A
    # dict for the torch format goes by each storage's saved location: torch.load places those.)
    path = tmp_path / f"c.{suffix}"
    mto.save(_with_state_tensor(converted), path)
    restored = mto.restore(TinyNet(), path, map_location=location)
    assert torch.equal(restored(x), converted(x))
    assert restored.fc1.weight.device.type == "cpu"
    scale, scale_t = _state_tensors(restored)
    assert scale.device.type == "meta" and scale.shape == (2, 3)
    assert scale_t.device.type == "meta" and scale_t.shape == (3, 2)
    assert scale_t.stride() == ((1, 3) if suffix == "pt" else (2, 1))  # the torch format keeps the view
    plain = mto.restore(TinyNet(), path)  # the default: the CPU, values as saved
    assert torch.equal(_state_tensors(plain)[0], torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_map_location_device_goes_to_the_tensors_a_meta_model_adopts(converted, tmp_path, x, suffix):
    path = tmp_path / f"c.{suffix}"
    mto.save(converted, path)
    with torch.device("meta"):
        model = TinyNet()
    restored = mto.restore(model, path, map_location="cpu")
    assert restored.fc1.weight.device.type == "cpu" and torch.equal(restored(x), converted(x))
    with torch.device("meta"):
        model = TinyNet()
    # "meta" stands for an accelerator here: the adopted tensors are placed on map_location's device
    restored = mto.restore(model, path, map_location="meta", on_meta="warn")
    assert {t.device.type for t in restored.state_dict().values()} == {"meta"}
    assert isinstance(restored.fc1.weight, nn.Parameter) and restored.fc1.weight.shape == (8, 4)


def test_map_location_function_follows_torch_loads_contract(converted, tmp_path, x):
    path = tmp_path / "c.safetensors"
    mto.save(_with_state_tensor(converted), path)
    calls = []

    def keep(storage, location):  # None: "as if map_location were not given"
        calls.append((type(storage), storage.device.type, location, storage.nbytes()))
        return None

    restored = mto.restore(TinyNet(), path, map_location=keep)
    assert torch.equal(restored(x), converted(x))
    # once per stored tensor: the weights, and the state's two (this format stores a view as its own tensor)
    assert len(calls) == len(converted.state_dict()) + 2
    assert {c[:3] for c in calls} == {(torch.UntypedStorage, "cpu", "cpu")}
    assert sorted(c[3] for c in calls) == sorted(
        [t.nbytes for t in converted.state_dict().values()] + [24, 24]
    )

    def to_meta(storage, location):  # what torch's own "meta" deserializer returns
        return torch.UntypedStorage(storage.nbytes(), device="meta")

    calls.clear()
    with torch.device("meta"):
        model = TinyNet()
    # a function is called for every tensor up front (what it returns is where the tensor is),
    # so a meta model adopts the weights it placed
    restored = mto.restore(model, path, map_location=lambda s, loc: calls.append(loc) or to_meta(s, loc))
    assert restored.fc1.weight.device.type == "meta" and _state_tensors(restored)[0].device.type == "meta"
    assert calls == ["cpu"] * (len(converted.state_dict()) + 2)

    with pytest.raises(TypeError, match=r"c\.safetensors': the map_location function returned a Tensor; as for "
                       r"torch\.load it must return a storage \(e\.g\. storage\.cuda\(1\), or the storage itself\) "
                       r"or None\."):
        mto.restore(TinyNet(), path, map_location=lambda storage, location: torch.zeros(1))
    with pytest.raises(ValueError, match=r"c\.safetensors': the map_location function returned a storage of 0 bytes "
                       r"for one of \d+; it must return the storage it was given, moved"):
        mto.restore(TinyNet(), path, map_location=lambda storage, location: torch.UntypedStorage(0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no accelerator is there")
@pytest.mark.parametrize("location", ["cuda", 0, {"cpu": "cuda:0"}])
def test_map_location_to_a_missing_device_is_torchs_error_naming_the_file(converted, tmp_path, location):
    path = tmp_path / "c.safetensors"
    mto.save(converted, path)
    with pytest.raises(RuntimeError) as info:
        mto.restore(TinyNet(), path, map_location=location)  # even though the model's tensors would take the copy
    assert not isinstance(info.value, mto.CheckpointError)
    assert "c.safetensors" in " ".join(getattr(info.value, "__notes__", []))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_map_location_cuda_materialises_a_meta_model_on_the_gpu(converted, tmp_path, x):
    path = tmp_path / "c.safetensors"
    mto.save(converted, path)
    with torch.device("meta"):
        model = TinyNet()
    restored = mto.restore(model, path, map_location="cuda")
    assert restored.fc1.weight.is_cuda
    assert torch.equal(restored(x.cuda()).cpu(), converted(x))
    cuda_model = mto.restore(TinyNet().cuda(), path)  # a model on the GPU is filled in place
    assert torch.equal(cuda_model(x.cuda()).cpu(), converted(x))


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_background_writeback_thread_ends_with_every_save(converted, tmp_path):
    """Both writers start a writeback thread per save; it must be gone when save returns,
    whether the save committed or failed."""
    before = _threads()
    for name in ("c.pt", "c.safetensors"):
        for _ in range(5):
            mto.save(converted, tmp_path / name)
        assert _threads() == before, name
    with pytest.raises(OSError):  # fails at the rename: the target is a folder
        (tmp_path / "adir.pt").mkdir()
        mto.save(converted, tmp_path / "adir.pt")
    from modelopt_c import _conversion

    def boom(done, total):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        _conversion.st_write(tmp_path / "x.safetensors", {"a": torch.ones(3)}, {}, progress=boom)
    assert _threads() == before


def _flip_a_weight_bit(path):
    from modelopt_c import st_format

    _, info, start = st_format.read_header(path)
    name = next(k for k in info if not k.startswith("__modelopt_state__.") and info[k][3] > info[k][2])
    data = bytearray(path.read_bytes())
    data[start + info[name][2]] ^= 0x01
    path.write_bytes(bytes(data))
    return name


def test_restore_verifies_checksums_unless_told_not_to(converted, tmp_path, x):
    path = tmp_path / "c.safetensors"
    mto.save(converted, path)
    name = _flip_a_weight_bit(path)
    fresh = TinyNet()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(mto.CheckpointError, match=rf"{path}: tensor '{name}': checksum mismatch .*the file is corrupt"):
        mto.restore(fresh, path)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # nothing copied
    with torch.device("meta"):
        skeleton = TinyNet()
    with pytest.raises(mto.CheckpointError, match=rf"tensor '{name}': checksum mismatch"):
        mto.restore(skeleton, path)  # adopting the mapping verifies too
    restored = mto.restore(TinyNet(), path, verify=False)
    got = restored.state_dict()[name]
    want = converted.state_dict()[name]
    assert got.shape == want.shape and not torch.equal(got, want)  # the damaged bytes, as asked


def test_map_tensors_places_once_per_storage_and_keeps_the_structure():
    import collections

    from modelopt_c import checkpoint

    Pair = collections.namedtuple("Pair", "a b")
    base = torch.arange(12.0)
    view = base.reshape(3, 4).t()
    untouched = {"n": 1, "s": slice(1, 2), "t": (1, "x")}
    obj = {"pair": Pair(base, view), "list": [base, 3], "again": base, "plain": untouched}
    calls = []

    def copy(storage, location):  # a new storage per call: shows what shares what afterwards
        calls.append((location, storage.nbytes()))
        return storage.clone()

    out = checkpoint.map_tensors(obj, checkpoint.restore_location(copy, "'f'"))
    assert calls == [("cpu", 48)]  # one storage, one call
    assert type(out["pair"]) is Pair and out["list"][1] == 3 and out["plain"] is untouched
    assert out["again"] is out["pair"].a is out["list"][0]  # the same tensor stays one tensor
    moved_view = out["pair"].b
    assert moved_view.untyped_storage().data_ptr() == out["again"].untyped_storage().data_ptr()
    assert moved_view.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    assert moved_view.stride() == (1, 4) and torch.equal(moved_view, view)
    assert checkpoint.map_tensors(obj, checkpoint.restore_location("cpu", "'f'")) is obj  # nothing moved
