"""Models spread over several devices in one process (CPU and GPUs): each tensor is
staged from its own device on save and copied onto its own device on restore, in
both file formats and as a DCP folder.  Skipped without CUDA (two tests need two GPUs);
the CPU-only part checks the exporter the core uses for every tensor."""

from __future__ import annotations

import pytest
import torch

import modelopt_c as mto
from modelopt_c import _conversion
from modes import TinyNet

MODES = ["t_replace", ("t_sparse", {"sparsity": 0.5})]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _placed(devices: tuple[str, str], seed: int = 0):
    torch.manual_seed(seed)
    model = mto.apply_mode(TinyNet(), MODES) if seed == 0 else TinyNet()
    model.fc1.to(devices[0])
    model.fc2.to(devices[1])
    return model


def _round_trips(tmp_path, devices):
    src = _placed(devices)
    want = {k: v.detach().cpu().clone() for k, v in src.state_dict().items()}
    placed = {k: v.device for k, v in src.state_dict().items()}
    for name, kw in (("c.pt", {}), ("c.safetensors", {}), ("dcp", {"format": "dcp"})):
        mto.save(src, tmp_path / name, **kw)
        model = TinyNet()
        model.fc1.to(devices[0])
        model.fc2.to(devices[1])
        model = mto.restore(model, tmp_path / name)
        got = model.state_dict()
        # mode buffers replayed on a module follow its weight's device (zeros_like)
        assert {k: v.device for k, v in got.items()} == placed, name
        assert all(torch.equal(got[k].cpu(), want[k]) for k in want), name


@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA device")
def test_a_model_on_the_cpu_and_a_gpu_saves_and_restores(tmp_path, lib):
    _round_trips(tmp_path, ("cuda:0", "cpu"))


@pytest.mark.skipif(GPUS < 2, reason="needs two CUDA devices")
def test_a_model_on_two_gpus_saves_and_restores_off_the_current_device(tmp_path, lib):
    torch.cuda.set_device(0)
    _round_trips(tmp_path, ("cuda:1", "cuda:0"))  # cuda:1 is not the current device
    assert torch.cuda.current_device() == 0


@pytest.mark.skipif(GPUS < 2, reason="needs two CUDA devices")
def test_safetensors_writer_stages_a_tensor_off_the_current_device(tmp_path):
    torch.cuda.set_device(0)
    t = torch.arange(1 << 20, dtype=torch.float32, device="cuda:1")
    path = tmp_path / "t.safetensors"
    _conversion.st_write(path, {"t": t, "c": torch.ones(3)}, {})
    _, got = _conversion.st_read(path, verify=True)
    assert torch.equal(got["t"], t.cpu()) and torch.equal(got["c"], torch.ones(3))


def test_every_tensor_exports_through_to_dlpack_without_changing_bits(tmp_path):
    # the exporter the core now uses (torch._C._to_dlpack) keeps dtype, shape, strides
    # and values of the views it is handed (non-contiguous, offset, 0-d, empty)
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    tensors = {"t": base.t(), "slice": base[1:, 2:5], "scalar": torch.tensor(7, dtype=torch.int16),
               "empty": torch.empty(0, 3), "bf16": base.to(torch.bfloat16)[::2]}
    path = tmp_path / "v.safetensors"
    _conversion.st_write(path, tensors, {})
    _, got = _conversion.st_read(path, verify=True)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
