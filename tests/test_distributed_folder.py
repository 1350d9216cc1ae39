"""DCP folders in one process (no process group): save(format="dcp"), restore, the CLI,
hostile folders, and the rank keyword without a group.  The spawned multi-rank tests are
tests/test_distributed.py (marker `distributed`)."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch

import modelopt_c as mto
from modelopt_c import StateDecodeError, cli, distributed
from modes import TinyNet

MODES = ["t_replace", ("t_sparse", {"sparsity": 0.5})]


def _converted():
    torch.manual_seed(0)
    return mto.apply_mode(TinyNet(), MODES)


def _same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def folder(tmp_path, lib):
    model = _converted()
    mto.save(model, tmp_path / "ck", format="dcp")
    return tmp_path / "ck", {k: v.clone() for k, v in model.state_dict().items()}


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    old = cli.sys.stdout, cli.sys.stderr
    cli.sys.stdout, cli.sys.stderr = out, err
    try:
        rc = cli.main([str(a) for a in argv])
    finally:
        cli.sys.stdout, cli.sys.stderr = old
    return rc, out.getvalue(), err.getvalue()


def test_round_trip_replays_the_modes_then_loads_every_weight(folder):
    path, weights = folder
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", distributed.STATE_FILE]
    assert distributed.is_dcp_folder(path) and not distributed.is_dcp_folder(path / ".metadata")
    model = mto.restore(TinyNet(), path)
    assert type(model.act).__name__ == "Tanh" and hasattr(model.fc2, "weight_mask")
    assert _same(model.state_dict(), weights)
    assert [m for m, _ in mto.modelopt_state(model)["modelopt_state_dict"]] == ["t_replace", "t_sparse"]
    # the modelopt state is our msgpack, not pickle
    blob = (path / distributed.STATE_FILE).read_bytes()
    assert mto.loads_state(blob) == mto.modelopt_state(_converted())


def test_saving_again_replaces_the_folder_and_leaves_no_temp_folder(folder):
    path, _ = folder
    stale = path.parent / (".ck" + distributed._TMP_TAG + "00000000deadbeef")  # a killed writer's
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"partial")
    model = _converted()
    with torch.no_grad():
        model.fc1.weight.add_(1)
    mto.save(model, path, format="dcp")
    assert sorted(os.listdir(path.parent)) == ["ck"]
    assert torch.equal(mto.restore(TinyNet(), path).fc1.weight, model.fc1.weight)


def test_save_refuses_targets_it_would_destroy(tmp_path, lib):
    model = _converted()
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(mto.CheckpointError, match="exists and is not a folder: a sharded model saves to a folder"):
        mto.save(model, tmp_path / "file", format="dcp")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(mto.CheckpointError, match="holds something other than a DCP checkpoint: save will not "
                                                  "replace it"):
        mto.save(model, tmp_path / "other", format="dcp")
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine" and (tmp_path / "file").read_bytes() == b"x"
    with pytest.raises(TypeError, match="saved to a folder path through torch.distributed.checkpoint, not to a "
                                        "BytesIO"):
        mto.save(model, io.BytesIO(), format="dcp")
    with pytest.raises(TypeError, match=r"save of a DCP folder takes no torch.save options; got \['pickle_protocol'\]"):
        mto.save(model, tmp_path / "new", format="dcp", pickle_protocol=2)
    assert sorted(os.listdir(tmp_path)) == ["file", "other"]
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    mto.save(model, tmp_path / "empty", format="dcp")
    assert distributed.is_dcp_folder(tmp_path / "empty")


def test_rank_keyword_without_a_process_group_is_a_plain_save(tmp_path, lib):
    model = _converted()
    mto.save(model, tmp_path / "a.pt", rank=0)
    mto.save(model, tmp_path / "b.pt", rank="all")
    for name in ("a.pt", "b.pt"):
        assert _same(mto.restore(TinyNet(), tmp_path / name).state_dict(), model.state_dict())


def test_a_dcp_folder_without_our_state_is_named(folder):
    path, _ = folder
    os.remove(path / distributed.STATE_FILE)
    with pytest.raises(mto.CheckpointError, match=f"{str(path)!r} is a DCP checkpoint folder without "
                                                  "modelopt_state.msgpack: it was not written by modelopt_c's save"):
        mto.restore(TinyNet(), path)


def test_a_damaged_state_file_is_a_decode_error_naming_it(folder):
    path, _ = folder
    (path / distributed.STATE_FILE).write_bytes(b"\xc1")
    with pytest.raises(StateDecodeError, match="modelopt_state.msgpack"):
        mto.restore(TinyNet(), path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_hostile_metadata_runs_no_code(folder, monkeypatch):
    path, _ = folder
    monkeypatch.chdir(path.parent)
    (path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    model = TinyNet()
    with pytest.raises(mto.CheckpointError, match=r"\.metadata' is not a readable DCP metadata file \(UnpicklingError: "
                                                  r"posix.system is not one of DCP's metadata classes\)"):
        mto.restore(model, path)
    assert not (path.parent / "pwned").exists()
    assert type(model.act).__name__ == "ReLU"  # nothing replayed: the metadata is read first
    rc, out, err = _cli("verify", path)
    assert rc == 1 and out.startswith(f"CORRUPT {path}: ") and "not one of DCP's metadata classes" in out
    (path / ".metadata").write_bytes(b"\x80\x04")
    with pytest.raises(mto.CheckpointError, match=r"not a readable DCP metadata file \(EOFError"):
        mto.restore(TinyNet(), path)


def test_metadata_naming_a_file_outside_the_folder_is_refused(folder, tmp_path):
    path, _ = folder
    meta = distributed.read_metadata(path)
    for info in meta.storage_data.values():
        info.relative_path = "../secret"
    (path / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(mto.CheckpointError, match=r"names the data file '\.\./secret', which is not a file of this "
                                                  "folder; nothing was loaded"):
        mto.restore(TinyNet(), path)
    for info in meta.storage_data.values():
        info.relative_path, info.offset = "__0_0.distcp", -4
    (path / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(mto.CheckpointError, match="has offset -4; nothing was loaded"):
        mto.restore(TinyNet(), path)


def test_weights_that_do_not_fit_name_the_key(folder):
    path, _ = folder
    with pytest.raises(mto.CheckpointError, match=r"the modes were replayed but the weights could not be loaded "
                                                  r"\(rank 0: ValueError: Size mismatch between saved "
                                                  r"torch.Size\(\[8\]\) and current: torch.Size\(\[5\]\) for fc1.bias"):
        mto.restore(TinyNet(width=5), path)


def test_cli_inspect_verify_and_convert_both_ways(folder, tmp_path):
    path, weights = folder
    rc, out, _ = _cli("inspect", path)
    assert rc == 0
    assert "format:      dcp folder" in out and "data files:  1 (__0_0.distcp)" in out
    assert "  [0] t_replace" in out and "  [1] t_sparse" in out and "tensors:     7 (496 B, 496 bytes)" in out
    rc, out, _ = _cli("verify", path)
    assert rc == 0 and out == (f"OK {path} (dcp folder): DCP metadata read (restricted unpickler), 7 items in 1 "
                               "data files present, every item loads (weights_only=True), modelopt_state decodes\n")
    for name in ("one.pt", "one.safetensors"):
        rc, out, _ = _cli("convert", path, tmp_path / name)
        assert rc == 0 and out.startswith(f"converted {path} (dcp folder) -> {tmp_path / name}")
        assert _same(mto.restore(TinyNet(), tmp_path / name).state_dict(), weights)
    rc, out, _ = _cli("convert", tmp_path / "one.pt", tmp_path / "back", "--to", "dcp")
    assert rc == 0 and out == f"converted {tmp_path / 'one.pt'} (torch) -> {tmp_path / 'back'} (dcp)\n"
    assert _same(mto.restore(TinyNet(), tmp_path / "back").state_dict(), weights)
    rc, out, _ = _cli("convert", tmp_path / "one.safetensors", str(tmp_path / "back2") + os.sep)
    assert rc == 0 and distributed.is_dcp_folder(tmp_path / "back2")
    # a truncated data file: verify says which item, and exits 1
    data = path / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:100])
    rc, out, err = _cli("verify", path)
    assert rc == 1
    assert out == (f"CORRUPT {path}: item 'calls' ends at byte 1577 of '__0_0.distcp', which has 100 bytes "
                   "(truncated?)\n")
    assert err == f"modelopt_c: {path}: item 'calls' ends at byte 1577 of '__0_0.distcp', which has 100 bytes (truncated?)\n"
