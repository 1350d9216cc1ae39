"""Checkpoints and live models move both ways between nvidia-modelopt and modelopt_c
(issue 3): INT8 quantisation with a CPU calibration loop, and magnitude sparsity."""

import pytest
import torch
import torch.nn as nn

import modelopt_c as mc
from _optional import optional_import

mo = optional_import("modelopt.torch.opt", "nvidia-modelopt")
mtq = optional_import("modelopt.torch.quantization", "nvidia-modelopt")
mts = optional_import("modelopt.torch.sparsity", "nvidia-modelopt")


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def calibrate(model):
    torch.manual_seed(2)
    for _ in range(4):
        model(torch.randn(8, 16))


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(4, 16)


@pytest.fixture(scope="module")
def quantized():
    return mtq.quantize(make_net(), mtq.INT8_DEFAULT_CFG, calibrate)


@pytest.fixture(scope="module")
def sparse():
    return mts.sparsify(make_net(), "sparse_magnitude")


@pytest.mark.parametrize("which", ["quantized", "sparse"])
def test_reference_checkpoint_restores_in_modelopt_c(which, request, tmp_path, x):
    model = request.getfixturevalue(which)
    mo.save(model, tmp_path / "ref.pt")
    restored = mc.restore(make_net(), tmp_path / "ref.pt")
    assert torch.equal(restored(x), model(x))
    assert restored._modelopt_state == mo.modelopt_state(model)["modelopt_state_dict"]


@pytest.mark.parametrize("which", ["quantized", "sparse"])
def test_modelopt_c_checkpoint_restores_in_reference(which, request, tmp_path, x):
    model = request.getfixturevalue(which)
    mc.save(model, tmp_path / "ours.pt")
    restored = mo.restore(make_net(), tmp_path / "ours.pt")
    assert torch.equal(restored(x), model(x))


def test_live_model_state_is_read_by_both(quantized, sparse):
    for model in (quantized, sparse):
        ours, theirs = mc.modelopt_state(model), mo.modelopt_state(model)
        assert ours == theirs
        assert mc.ModeloptStateManager.is_converted(model) and str(mc.get_mode(model)) == model._modelopt_state[-1][0]
        assert mc.ModeloptStateManager.has_state_for_mode_type("quantization", model=quantized)


def test_reference_modes_apply_through_modelopt_c(x):
    model = mc.apply_mode(make_net(), [("sparse_magnitude", {})])
    assert model._modelopt_state[0][0] == "sparse_magnitude"
    state = mc.modelopt_state(model)
    fresh = mo.restore_from_modelopt_state(make_net(), state)
    assert type(fresh[0]).__name__ == type(model[0]).__name__
