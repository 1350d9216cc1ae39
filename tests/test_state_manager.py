"""ModeloptStateManager: SPEC §2 and §5."""

import importlib.metadata
import warnings
from collections import deque

import pytest
import torch.nn as nn
from pydantic import ValidationError

import modelopt_c as mto
from modes import TinyNet

SM = mto.ModeloptStateManager


def test_fresh_manager_on_no_model():
    sm = SM()
    assert sm.has_state is False
    assert sm.state_dict() == []
    try:  # the installed nvidia-modelopt's version wins, else the layout we write
        want = importlib.metadata.version("nvidia-modelopt")
    except importlib.metadata.PackageNotFoundError:
        want = mto.MODELOPT_STATE_VERSION
    assert sm.state_version == want
    assert sm.last_mode is None


def test_init_state_writes_the_two_attributes_on_the_root(net):
    sm = SM(net, init_state=True)
    assert net._modelopt_state == [] and net._modelopt_state_version == [sm.state_version]
    assert sm.state_dict() is net._modelopt_state  # a reference, not a copy
    assert sm._state is net._modelopt_state and sm._state_version is net._modelopt_state_version


def test_init_state_twice_raises(net):
    SM(net, init_state=True)
    with pytest.raises(AssertionError, match="^Model already has modelopt state!$"):
        SM(net, init_state=True)


def test_unconverted_model_without_init_raises(net):
    with pytest.raises(AssertionError, match="^Model must have modelopt state!$"):
        SM(net)


def test_falsy_model_gets_a_fresh_module():
    empty = nn.Sequential()  # len() == 0, so falsy, as in the reference
    sm = SM(empty)
    assert not hasattr(empty, "_modelopt_state")
    assert sm.state_dict() == []


def test_is_converted_root_and_submodule(net):
    assert SM.is_converted(net) is False
    SM(net.fc1, init_state=True)
    assert SM.is_converted(net) is True
    with pytest.raises(AssertionError, match="^Model has modelopt state but not the root!$"):
        SM.is_converted(net, is_root=True)
    with pytest.raises(AssertionError, match="^Model has modelopt state but not the root!$"):
        SM(net)


def test_is_converted_multiple_states(net):
    SM(net, init_state=True)
    SM(net.fc2, init_state=True)
    with pytest.raises(AssertionError, match="^Model has multiple modelopt states!$"):
        SM.is_converted(net)


def test_is_converted_counts_a_shared_module_once():
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, shared, None)
    SM(shared, init_state=True)
    assert SM.is_converted(model) is True


def test_is_converted_sees_class_attributes():
    class Converted(nn.Module):
        _modelopt_state = []

    assert SM.is_converted(nn.Sequential(Converted())) is True


def test_is_converted_rejects_non_modules():
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got int"):
        SM.is_converted(3)


def test_add_mode_and_properties(net, lib):
    sm = SM(net, init_state=True)
    cfg = SM.get_config_class("t_sparse", {"sparsity": 0.25})
    assert isinstance(cfg, lib.SparseConfig) and cfg.ratio == 0.25
    sm.add_mode("t_sparse", cfg, {"m": 1})
    assert sm.has_state
    assert net._modelopt_state == [("t_sparse", {"config": {"sparsity": 0.25}, "metadata": {"m": 1}})]
    assert str(sm.last_mode) == "t_sparse"
    assert sm._last_metadata == {"m": 1}
    assert sm._last_config.ratio == 0.25
    sm._last_config = lib.SparseConfig(sparsity=0.75)
    assert net._modelopt_state[0][1]["config"] == {"sparsity": 0.75}
    [(desc, conf, meta)] = list(sm.modes_with_states())
    assert str(desc) == "t_sparse" and conf.ratio == 0.75 and meta == {"m": 1}


def test_get_config_class_validation_names_the_mode():
    with pytest.raises(ValidationError) as info:
        SM.get_config_class("t_sparse", {"sparsity": 2.0})
    assert any("t_sparse" in note for note in info.value.__notes__)


def test_check_mode_export_stack(net):
    sm = SM(net, init_state=True)
    with pytest.raises(AssertionError, match=r"^Cannot add t_sparse_export according to the current export stack: deque\(\[\]\)\.$"):
        sm.check_mode("t_sparse_export")
    sm.add_mode("t_sparse", SM.get_config_class("t_sparse", {}), {})
    assert sm._export_stack == deque([("t_sparse", "t_sparse_export")])
    sm.check_mode("t_sparse_export")
    sm.add_mode("t_sparse_export", SM.get_config_class("t_sparse_export", {}), {})
    assert sm._export_stack == deque()


def test_check_mode_next_prohibited_also_against_the_export_stack(net):
    sm = SM(net, init_state=True)
    sm.add_mode("t_sparse", SM.get_config_class("t_sparse", {}), {})
    msg = "Cannot add t_replace after t_sparse! t_sparse does not allow t_replace to be its next mode."
    with pytest.raises(AssertionError, match="^" + msg.replace("!", "!") + "$"):
        sm.check_mode("t_replace")
    # t_unsaved comes next, but t_sparse still waits for its export: t_replace stays prohibited
    sm.add_mode("t_unsaved", SM.get_config_class("t_unsaved", {}), {})
    with pytest.raises(AssertionError, match="does not allow t_replace to be its next mode"):
        sm.check_mode("t_replace")


def test_check_mode_next_modes(net):
    sm = SM(net, init_state=True)
    sm.add_mode("t_only_replace_next", SM.get_config_class("t_only_replace_next", {}), {})
    with pytest.raises(
        AssertionError,
        match=r"^Cannot add t_unsaved after t_only_replace_next! Next modes of t_only_replace_next are \{'t_replace'\}\.$",
    ):
        sm.check_mode("t_unsaved")
    sm.check_mode("t_replace")


def test_inconsistent_export_stack(net):
    net._modelopt_state = [("t_sparse_export", {"config": {}, "metadata": {}})]
    net._modelopt_state_version = ["0.47.0"]
    with pytest.raises(AssertionError, match="^Inconsistent export stack!$"):
        SM(net).check_mode("t_replace")


def test_load_state_dict_replays_and_copies(net):
    state = [("t_replace", {"config": {"act": "tanh"}, "metadata": {"replaced": ["act"]}})]
    sm = SM(net, init_state=True)
    sm.load_state_dict(state, "0.47.0")
    assert net._modelopt_state == state and net._modelopt_state is not state
    assert net._modelopt_state[0][1] is not state[0][1]  # deep copy
    with pytest.raises(AssertionError, match="^Cannot load state_dict if there is already one.$"):
        sm.load_state_dict(state, "0.47.0")


def test_load_state_dict_version_warning(net):
    sm = SM(net, init_state=True)
    with pytest.warns(UserWarning, match=r"The checkpoint is stored with version 0\.1\.0, but current version is"):
        sm.load_state_dict([], "0.1.0")
    assert sm.state_version == "0.1.0"
    sm2 = SM(init_state=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sm2.load_state_dict([], sm2.state_version.rsplit(".", 1)[0] + ".99")


@pytest.mark.parametrize(
    "state, exc, msg",
    [
        (["t_replace"], ValueError, r"modelopt state entry 0: expected a \(mode_name"),
        ([("t_replace", 5)], TypeError, r"modelopt state entry 0 \(mode 't_replace'\): expected a dict"),
        ([(5, {})], TypeError, "modelopt state entry 0: the mode name must be a str"),
        ([("t_replace", {"config": {}})], KeyError, r"modelopt state entry 0 \(mode 't_replace'\) has no 'metadata'"),
        ([("nope", {"config": {}, "metadata": {}})], KeyError, "Mode nope not found in any registry"),
        ({"a": 1}, TypeError, "the modelopt state must be a list"),
    ],
)
def test_load_state_dict_malformed(net, state, exc, msg):
    sm = SM(net, init_state=True)
    with pytest.raises(exc, match=msg):
        sm.load_state_dict(state, "0.47.0")
    assert net._modelopt_state == []


def test_load_state_dict_failure_midway_loads_nothing(net):
    good = ("t_replace", {"config": {}, "metadata": {"replaced": []}})
    bad = ("t_sparse", {"config": {"sparsity": 3}, "metadata": {}})
    sm = SM(net, init_state=True)
    with pytest.raises(ValidationError) as info:
        sm.load_state_dict([good, bad], "0.47.0")
    assert "in modelopt state entry 1" in info.value.__notes__
    assert net._modelopt_state == []


def test_transfer_state_dict_moves_the_same_list(net):
    src = nn.Linear(1, 1)
    sm = SM(src, init_state=True)
    sm.add_mode("t_replace", SM.get_config_class("t_replace", {}), {"replaced": []})
    the_list = src._modelopt_state
    SM.transfer_state_dict(src, net)
    assert net._modelopt_state is the_list
    assert not hasattr(src, "_modelopt_state")
    with pytest.raises(AssertionError, match="^Model already has modelopt state!$"):
        SM.transfer_state_dict(net, net)


def test_has_state_for_mode_type(net):
    with pytest.raises(ValueError, match="^Must provide either model or state!$"):
        SM.has_state_for_mode_type("t_modes")
    with pytest.raises(ValueError, match="^Must provide either model or state!$"):
        SM.has_state_for_mode_type("t_modes", model=net, state={"x": 1})
    model = mto.apply_mode(net, "t_replace")
    assert SM.has_state_for_mode_type("t_modes", model=model) is True
    assert SM.has_state_for_mode_type("t_modes", state={"modelopt_state_dict": []}) is False
    with pytest.raises(KeyError, match="Registry nope not found."):
        SM.has_state_for_mode_type("nope", model=model)


def test_remove_state(net):
    SM(net, init_state=True)
    SM.remove_state(net)
    assert not SM.is_converted(net)
    with pytest.raises(AttributeError):
        SM.remove_state(net)


def test_update_entry_points_store_the_config_back(net):
    sm = SM(net, init_state=True)
    sm.add_mode("t_update", SM.get_config_class("t_update", {}), {})
    sm.update_last_state_before_save(net)
    sm.update_last_state_before_save(net)
    assert net._modelopt_state[-1][1] == {"config": {"saves": 2}, "metadata": {"saved": 2}}
    sm.update_last_state_before_new_mode(net)
    assert net._modelopt_state[-1][1]["metadata"]["followed"] is True


def test_manager_is_a_gc_tracked_heap_type():
    import gc

    sm = SM()
    assert gc.is_tracked(sm)
    assert type(sm).__module__ == "modelopt_c"
    # the signature line became the type's __text_signature__ (inspect.signature, help())
    assert SM.__text_signature__ == "(model=None, init_state=False)"
    assert SM.__doc__.startswith("The record of the modes applied to a model")


def test_tinynet_is_not_converted_by_default():
    assert not SM.is_converted(TinyNet())
