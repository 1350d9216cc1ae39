"""Progress of save / restore / convert: the hook's calls, the tqdm bar's choice, errors."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
import torch.nn as nn

import modelopt_c as mto
from modelopt_c import _conversion, cli, progress


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))


def _nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.mark.parametrize("name", ["m.pt", "m.safetensors"])
def test_save_hook_sees_bytes_up_to_the_file(tmp_path, name):
    calls: list[tuple[int, int]] = []
    path = tmp_path / name
    mto.save(_model(), path, progress=lambda done, total: calls.append((done, total)))
    dones = [d for d, _ in calls]
    assert calls and dones == sorted(dones)
    size = os.path.getsize(path)
    if name.endswith(".pt"):  # the file watched as it grows: starts at 0, ends at the file's size
        assert calls[0] == (0, _nbytes(_model())) and calls[-1] == (size, size)
    else:  # the writer's own count of tensor bytes
        assert calls[-1] == (_nbytes(_model()), _nbytes(_model()))


def test_restore_hook_counts_every_tensor(tmp_path):
    path = tmp_path / "m.pt"
    mto.save(_model(), path, progress=False)
    calls: list[tuple[int, int]] = []
    target = _model()
    mto.restore(target, path, progress=lambda done, total: calls.append((done, total)))
    total = _nbytes(target)
    assert len(calls) == len(target.state_dict()) and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and {t for _, t in calls} == {total}


def test_restore_hook_error_rolls_back(tmp_path):
    source = _model()
    path = tmp_path / "m.pt"
    mto.save(source, path, progress=False)
    target = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    before = {k: v.clone() for k, v in target.state_dict().items()}

    def stop(done, total):
        raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt, match="^stop$"):
        mto.restore(target, path, progress=stop)
    # the hook raised after the first copy: the modes and the state are rolled back (copies
    # already made stay, by restore's contract), the exception is the hook's own
    assert not mto.ModeloptStateManager.is_converted(target)
    assert set(before) == set(target.state_dict())


def test_safetensors_hook_error_leaves_no_file(tmp_path):
    path = tmp_path / "m.safetensors"

    def boom(done, total):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="^hook failed$"):
        mto.save(_model(), path, progress=boom)
    assert os.listdir(tmp_path) == []


def test_torch_hook_error_is_raised_after_the_save(tmp_path):
    path = tmp_path / "m.pt"

    def boom(done, total):
        if done > 0:
            raise RuntimeError("hook failed late")

    with pytest.raises(RuntimeError, match="^hook failed late$"):
        mto.save(_model(), path, progress=boom)
    assert os.listdir(tmp_path) == ["m.pt"]  # written: the hook ran beside the writer
    mto.restore(_model(), path)


def test_started_hook_of_the_native_writer(tmp_path):
    seen: list[str] = []
    _conversion._save_torch_file(tmp_path / "a.pt", {"x": 1}, _started=seen.append)
    assert len(seen) == 1 and os.path.basename(seen[0]).startswith(".a.pt.tmp-")
    assert torch.load(tmp_path / "a.pt") == {"x": 1} and not os.path.exists(seen[0])

    def refuse(path):
        raise ValueError("not now")

    with pytest.raises(ValueError, match="^not now$"):
        _conversion._save_torch_file(tmp_path / "b.pt", {"x": 1}, _started=refuse)
    assert sorted(os.listdir(tmp_path)) == ["a.pt"]  # no target, no temp file
    with pytest.raises(TypeError, match="^_save_torch_file: _started must be callable or None, not int$"):
        _conversion._save_torch_file(tmp_path / "b.pt", {"x": 1}, _started=3)
    kwargs = {"_started": None, "pickle_protocol": 2}
    _conversion._save_torch_file(tmp_path / "c.pt", {"x": 2}, **kwargs)
    assert torch.load(tmp_path / "c.pt") == {"x": 2} and kwargs == {"_started": None, "pickle_protocol": 2}


def test_restore_from_state_progress_must_be_callable(net):
    with pytest.raises(TypeError, match="^_restore_from_state: progress must be callable or None, not str$"):
        _conversion._restore_from_state(net, None, {}, progress="yes")


def test_bad_progress_value(tmp_path):
    with pytest.raises(TypeError, match=r"^progress must be True, False, None or a callable\(done_bytes, "
                       r"total_bytes\), not str\.$"):
        mto.save(_model(), tmp_path / "m.pt", progress="bar")
    assert os.listdir(tmp_path) == []


class _FakeBar:
    made: list[dict] = []

    def __init__(self, **kwargs):
        self.kwargs, self.n, self.total, self.closed = kwargs, 0, kwargs.get("total"), False
        _FakeBar.made.append(self.__dict__)

    def update(self, k):
        self.n += k

    def close(self):
        self.closed = True


@pytest.fixture
def fake_tqdm(monkeypatch):
    _FakeBar.made = []
    monkeypatch.setattr(progress, "_tqdm_class", lambda: _FakeBar)
    return _FakeBar.made


def test_auto_bar_only_when_interactive_and_after_a_second(tmp_path, monkeypatch, fake_tqdm):
    monkeypatch.setattr(progress, "interactive_output", lambda: False)
    mto.save(_model(), tmp_path / "a.pt")
    assert fake_tqdm == []
    monkeypatch.setattr(progress, "interactive_output", lambda: True)
    mto.save(_model(), tmp_path / "b.safetensors")
    (bar,) = fake_tqdm
    assert bar["kwargs"]["delay"] == progress.AUTO_DELAY == 1.0 and bar["kwargs"]["unit"] == "B"
    assert bar["kwargs"]["desc"] == "saving b.safetensors" and bar["closed"]
    assert bar["n"] == bar["total"] == _nbytes(_model())
    mto.save(_model(), tmp_path / "c.pt", progress=False)
    assert len(fake_tqdm) == 1
    mto.restore(_model(), tmp_path / "b.safetensors")
    assert fake_tqdm[1]["kwargs"]["desc"] == "restoring b.safetensors" and fake_tqdm[1]["n"] == _nbytes(_model())


def test_progress_true_shows_a_bar_at_once_even_when_not_interactive(tmp_path, monkeypatch, fake_tqdm):
    monkeypatch.setattr(progress, "interactive_output", lambda: False)
    mto.save(_model(), tmp_path / "a.pt", progress=True)
    (bar,) = fake_tqdm
    assert bar["kwargs"]["delay"] == 0 and bar["n"] == bar["total"] == os.path.getsize(tmp_path / "a.pt")


def test_real_tqdm_bar_text(tmp_path):
    pytest.importorskip("tqdm")
    err = io.StringIO()
    with redirect_stderr(err):
        mto.save(_model(), tmp_path / "m.safetensors", progress=True)
    text = err.getvalue()
    assert "saving m.safetensors: 100%" in text and "B/s]" in text and "321k/321k" in text


def test_progress_true_without_tqdm_warns(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "_tqdm_class", lambda: None)
    with pytest.warns(UserWarning, match=r"^progress=True needs tqdm \(pip install tqdm\); no progress is shown\.$"):
        mto.save(_model(), tmp_path / "m.pt", progress=True)
    assert os.path.exists(tmp_path / "m.pt")


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_cli_convert_progress_modes(tmp_path, monkeypatch, fake_tqdm):
    mto.save(nn.Linear(1024, 1024, bias=False), tmp_path / "m.pt", progress=False)  # 4 MiB
    code, _, err = _cli("convert", tmp_path / "m.pt", tmp_path / "a.safetensors", "--progress-mb", "1")
    assert code == 0 and err.endswith("convert: 4 / 4 MiB written\n")
    assert all(line.startswith("convert: ") for line in err.splitlines())
    code, _, err = _cli("convert", tmp_path / "m.pt", tmp_path / "b.safetensors", "--no-progress")
    assert code == 0 and err == ""
    monkeypatch.setattr(progress, "interactive_output", lambda: True)
    code, _, err = _cli("convert", tmp_path / "a.safetensors", tmp_path / "c.pt")
    assert code == 0 and err == ""
    (bar,) = fake_tqdm
    assert bar["kwargs"]["desc"] == "convert c.pt" and bar["n"] == os.path.getsize(tmp_path / "c.pt")
