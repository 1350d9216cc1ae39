"""The command-line tool: inspect, convert, verify (and the demo/bench dispatch)."""

from __future__ import annotations

import builtins
import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from _st_support import ROOT, Tiny, _conversion, sample_state

from modelopt_c import cli, st_format


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def states_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and same(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def torch_ckpt(tmp_path) -> Path:
    path = tmp_path / "model.pt"
    torch.save({"modelopt_state": sample_state(), "model_state_dict": Tiny().state_dict()}, path)
    return path


@pytest.fixture
def st_ckpt(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    st_format.save_file(path, Tiny().state_dict(), sample_state())
    return path


class Evil:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_help_reads_well():
    code, out, _ = run("--help")
    assert code == 0
    assert "inspect" in out and "convert" in out and "verify" in out and "examples:" in out
    assert run("nonsense")[0] == 2
    assert run()[0] == 2


def test_inspect_torch(torch_ckpt):
    code, out, _ = run("inspect", torch_ckpt)
    assert code == 0, out
    assert "format:      torch" in out
    assert "modelopt:    0.1.0" in out
    assert "[0] quantize" in out and "[1] sparsity" in out
    assert '"num_bits": 8' in out
    assert "metadata: amax: tensor float32 [2]" in out
    n = len(Tiny().state_dict())
    assert f"tensors:     {n} " in out
    assert "bfloat16: 1" in out and "float32: 2" in out and "int64: 1" in out


def test_inspect_json(torch_ckpt, st_ckpt):
    for path, fmt in ((torch_ckpt, "torch"), (st_ckpt, "modelopt_c safetensors")):
        code, out, _ = run("inspect", "--json", path)
        assert code == 0
        info = json.loads(out)
        assert info["format"] == fmt
        assert info["tensors"]["count"] == len(Tiny().state_dict())
        assert info["tensors"]["total_bytes"] == sum(t.numel() * t.element_size() for t in Tiny().state_dict().values())
        assert [m["name"] for m in info["modes"]] == ["quantize", "sparsity"]
        assert info["modelopt_version"] == "0.1.0"
    info = json.loads(run("inspect", "--json", st_ckpt)[1])
    assert info["state_tensors"]["count"] == 2 and info["checksums"] == "xxh64"
    assert set(info["metadata"]) >= {"format", "format_version", "modelopt_state", "checksums"}


def test_inspect_plain_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.int8)}, str(path))
    code, out, _ = run("inspect", path)
    assert code == 0 and "format:      safetensors" in out and "tensors:     2 (" in out
    assert "F32: 1" in out and "I8: 1" in out
    code, out, _ = run("verify", path)
    assert code == 0 and "no checksums stored" in out


def test_convert_both_ways_bit_exact(tmp_path, torch_ckpt):
    mid = tmp_path / "mid.safetensors"
    back = tmp_path / "back.pt"
    assert run("convert", torch_ckpt, mid)[0] == 0
    assert st_format.is_safetensors_file(mid)
    assert run("convert", mid, back)[0] == 0
    assert run("verify", mid)[0] == 0 and run("verify", back)[0] == 0
    ref = torch.load(torch_ckpt, weights_only=True)
    got = torch.load(back, weights_only=True)
    assert states_equal(ref["model_state_dict"], got["model_state_dict"])
    assert states_equal(ref["modelopt_state"], got["modelopt_state"])
    state, sd = st_format.load_file(mid, verify=True)
    assert states_equal(ref["model_state_dict"], sd) and states_equal(ref["modelopt_state"], state)
    # --to overrides the extension
    odd = tmp_path / "odd.bin"
    assert run("convert", torch_ckpt, odd, "--to", "safetensors")[0] == 0
    assert st_format.is_safetensors_file(odd)
    assert not list(tmp_path.glob(".*tmp-*"))


def test_convert_usage_errors(tmp_path, torch_ckpt):
    code, _, err = run("convert", torch_ckpt, tmp_path / "out.xyz")
    assert code == 2 and "--to" in err
    assert run("convert", tmp_path / "missing.pt", tmp_path / "o.safetensors")[0] == 2
    assert run("convert", torch_ckpt, tmp_path / "o.safetensors", "--to", "zip")[0] == 2


def test_convert_reports_progress(tmp_path):
    path = tmp_path / "big.pt"
    torch.save({"modelopt_state": sample_state(), "model_state_dict": {"w": torch.zeros(3 << 18)}}, path)
    code, _, err = run("convert", path, tmp_path / "big.safetensors", "--progress-mb", "1")
    assert code == 0 and "MiB written" in err


def test_verify_exit_codes(tmp_path, st_ckpt, torch_ckpt):
    assert run("verify", st_ckpt)[0] == 0
    assert run("verify", torch_ckpt)[0] == 0
    _, header, start = _conversion.st_read_header(st_ckpt)
    name = "lin.weight"
    blob = bytearray(st_ckpt.read_bytes())
    blob[start + header[name][2]] ^= 0x40
    st_ckpt.write_bytes(bytes(blob))
    code, out, _ = run("verify", st_ckpt)
    assert code == 1 and "checksum mismatch" in out and "'lin.weight'" in out
    # truncated torch zip
    data = torch_ckpt.read_bytes()
    torch_ckpt.write_bytes(data[: len(data) // 2])
    code, out, _ = run("verify", torch_ckpt)
    assert code == 1 and "CORRUPT" in out
    stripped = tmp_path / "stripped.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.ones(1)}, str(stripped), metadata={"format": "modelopt_c"})
    code, out, _ = run("verify", stripped)
    assert code == 1 and "without checksums" in out
    other = tmp_path / "other.pt"
    torch.save([torch.ones(2)], other)
    code, out, _ = run("verify", other)
    assert code == 0 and "not a modelopt checkpoint" in out
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world, not a checkpoint")
    assert run("verify", junk)[0] == 1
    assert run("verify", tmp_path / "absent")[0] == 2


def test_verify_in_a_real_process(st_ckpt):
    boot = ("import sys; sys.path.insert(0, 'tests'); import _st_support; "
            "from modelopt_c.cli import main; sys.exit(main(sys.argv[1:]))")
    ok = subprocess.run([sys.executable, "-c", boot, "verify", str(st_ckpt)], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    st_ckpt.write_bytes(st_ckpt.read_bytes()[:-3])
    bad = subprocess.run([sys.executable, "-c", boot, "verify", str(st_ckpt)], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "CORRUPT" in bad.stdout
    usage = subprocess.run([sys.executable, "-c", boot, "verify"], cwd=ROOT, capture_output=True, text=True)
    assert usage.returncode == 2


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"modelopt_state": {"x": Evil(marker)}, "model_state_dict": {}}, path)
    assert not marker.exists()
    code, out, err = run("inspect", path)
    assert code == 1 and "refused" in err
    code, out, _ = run("verify", path)
    assert code == 1 and "refused" in out
    code, _, err = run("convert", path, tmp_path / "x.safetensors")
    assert code == 1 and "refused" in err
    code, out, _ = run("inspect", "--json", path)
    assert code == 1 and "refused" in json.loads(out)["error"]
    assert not marker.exists()
    assert not (tmp_path / "x.safetensors").exists()


def test_demo_and_bench_dispatch(monkeypatch):
    import types

    seen = {}
    fake = types.ModuleType("modelopt_c.demo")
    fake.main = lambda argv: seen.setdefault("demo", argv) and 3
    monkeypatch.setitem(sys.modules, "modelopt_c.demo", fake)
    assert run("demo", "--width", "8")[0] == 3 and seen["demo"] == ["--width", "8"]
    monkeypatch.setitem(sys.modules, "modelopt_c.demo", None)  # import fails
    code, _, err = run("demo")
    assert code == 1 and "not available" in err

    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.setattr(cli.Path, "is_file", lambda self: True)
    assert run("bench", "--quick", "-n", "3")[0] == 0
    assert calls[0][0] == sys.executable and calls[0][1].endswith("benchmarks/run.py")
    assert calls[0][2:] == ["--quick", "-n", "3"]
    monkeypatch.setattr(cli.Path, "is_file", lambda self: False)
    code, _, err = run("bench")
    assert code == 1 and "not found" in err
