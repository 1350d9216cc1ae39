"""apply_mode, modelopt_state, restore_from_modelopt_state, load_modelopt_state,
get_mode, and model-likes: SPEC §4 and §6."""

import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError

import modelopt_c as mto
from modes import TinyNet

SM = mto.ModeloptStateManager


def test_apply_mode_records_state_and_converts(net, x):
    model = mto.apply_mode(net, [("t_replace", {"act": "tanh"})], mode_kwargs={"hook": print})
    assert model is net and isinstance(model.act, nn.Tanh)
    assert model._modelopt_state == [
        ("t_replace", {"config": {"act": "tanh"}, "metadata": {"replaced": ["act"], "kwargs_seen": ["hook"]}})
    ]
    assert str(mto.get_mode(model)) == "t_replace"


@pytest.mark.parametrize(
    "mode",
    ["t_replace", ("t_replace", None), ("t_replace", {}), ["t_replace"], [("t_replace", None)]],
)
def test_mode_spellings(net, mode):
    model = mto.apply_mode(net, mode)
    assert [m for m, _ in model._modelopt_state] == ["t_replace"]


def test_mode_as_descriptor(net):
    desc = mto._ModeRegistryCls.get_from_any("t_replace")
    model = mto.apply_mode(net, [desc, ("t_update", {"saves": 3})])
    assert [m for m, _ in model._modelopt_state] == ["t_replace", "t_update"]
    assert model._modelopt_state[1][1]["config"] == {"saves": 3}


def test_per_mode_kwargs_and_mismatch(net):
    model = mto.apply_mode(net, ["t_update", "t_replace"], mode_kwargs=[{}, {"a": 1}])
    assert model._modelopt_state[1][1]["metadata"]["kwargs_seen"] == ["a"]
    with pytest.raises(AssertionError, match="^Number of mode kwargs must match number of modes!$"):
        mto.apply_mode(TinyNet(), ["t_update"], mode_kwargs=[{}, {}])


def test_empty_mode_returns_the_model_untouched(net):
    assert mto.apply_mode(net, []) is net
    assert not SM.is_converted(net)
    built = mto.apply_mode((TinyNet, (), {"width": 5}), None)
    assert isinstance(built, TinyNet) and built.fc1.out_features == 5


def test_update_for_new_mode_runs_before_the_next_mode(net):
    model = mto.apply_mode(net, "t_update")
    model = mto.apply_mode(model, "t_replace")
    assert model._modelopt_state[0][1]["metadata"] == {"followed": True}


def test_init_state_true_on_converted_model_raises(net):
    model = mto.apply_mode(net, "t_update")
    with pytest.raises(AssertionError, match="^Model already has modelopt state!$"):
        mto.apply_mode(model, "t_replace", init_state=True)


def test_registry_argument_limits_the_lookup(net, lib):
    other = mto._ModeRegistryCls("t_other")
    with pytest.raises(KeyError, match="Mode t_replace not found in registry 't_other'"):
        mto.apply_mode(net, "t_replace", registry=other)
    assert not SM.is_converted(net)
    model = mto.apply_mode(net, "t_replace", registry=lib.registry)
    assert SM.is_converted(model)
    del other


def test_model_like_forms(lib):
    for model_like in (TinyNet, (TinyNet,), (TinyNet, (6,)), (TinyNet, (), {"width": 6}), lambda: TinyNet(6)):
        model = mto.apply_mode(model_like, "t_replace")
        assert isinstance(model, TinyNet) and isinstance(model.act, nn.Tanh)
        assert SM.is_converted(model, is_root=True)


def test_mode_requiring_model_like_gets_the_holder():
    model = mto.apply_mode((TinyNet, (7,)), ["t_holder", "t_replace"])
    assert isinstance(model, TinyNet) and not isinstance(model, mto.ModelLikeModule)
    assert model._modelopt_state[0] == ("t_holder", {"config": {}, "metadata": {"holder": "ModelLikeModule"}})
    with pytest.raises(AssertionError, match="^Model must be a ModelLikeModule!$"):
        mto.apply_mode(TinyNet(), "t_holder")


def test_holder_only_modes_never_return_a_holder():
    with pytest.raises(AssertionError, match="^Model must be a regular Module now!$"):
        mto.apply_mode(TinyNet, "t_holder")


def test_wrapped_model_is_unwrapped(net):
    wrapped = nn.DataParallel(net)
    model = mto.apply_mode(wrapped, "t_replace")
    assert model is net
    assert mto.modelopt_state(wrapped)["modelopt_state_dict"][0][0] == "t_replace"


# ---- bad input: a clear error and nothing changed --------------------------------------


def test_non_module_model():
    with pytest.raises(ValueError, match=r"^Expected type or tuple or callable but got 3: a model must be an nn.Module"):
        mto.apply_mode(3, "t_replace")


def test_unknown_mode_names_the_registered_ones(net):
    with pytest.raises(KeyError) as info:
        mto.apply_mode(net, ["t_replace", "no_such_mode"])
    msg = str(info.value)
    assert "Mode no_such_mode not found in any registry." in msg and "'t_replace'" in msg
    assert not SM.is_converted(net) and isinstance(net.act, nn.ReLU)


def test_invalid_config_names_the_mode_and_changes_nothing(net):
    with pytest.raises(ValidationError) as info:
        mto.apply_mode(net, [("t_replace", {}), ("t_sparse", {"sparsity": 1.5})])
    assert any("'t_sparse'" in n for n in info.value.__notes__)
    assert not SM.is_converted(net) and isinstance(net.act, nn.ReLU)


def test_unknown_config_key_is_rejected(net):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        mto.apply_mode(net, [("t_replace", {"nope": 1})])
    assert not SM.is_converted(net)


def test_incompatible_first_mode_leaves_no_state(net):
    with pytest.raises(AssertionError, match="according to the current export stack"):
        mto.apply_mode(net, "t_sparse_export")
    assert not hasattr(net, "_modelopt_state") and not hasattr(net, "_modelopt_state_version")


def test_convert_returning_the_wrong_shape(net):
    with pytest.raises(TypeError, match=r"^convert of mode 't_bad_convert' must return \(model, metadata\), got TinyNet$"):
        mto.apply_mode(net, "t_bad_convert")


# ---- modelopt_state ----------------------------------------------------------------------


def test_modelopt_state_of_unconverted_model(net):
    state = mto.modelopt_state(net)
    assert state == {"modelopt_state_dict": [], "modelopt_version": SM().state_version}
    assert not SM.is_converted(net)


def test_modelopt_state_runs_update_for_save_and_skips_unsaved(net):
    model = mto.apply_mode(net, ["t_replace", "t_unsaved", "t_update"])
    state = mto.modelopt_state(model)
    assert [m for m, _ in state["modelopt_state_dict"]] == ["t_replace", "t_update"]
    assert state["modelopt_state_dict"][1][1] == {"config": {"saves": 1}, "metadata": {"saved": 1}}
    assert mto.modelopt_state(model)["modelopt_state_dict"][1][1]["config"] == {"saves": 2}


# ---- restore_from_modelopt_state -------------------------------------------------------


def test_restore_from_modelopt_state_replays_modes(net, x):
    model = mto.apply_mode(net, [("t_sparse", {"sparsity": 0.5}), "t_sparse_export", "t_replace"])
    state = mto.modelopt_state(model)
    fresh = mto.restore_from_modelopt_state(TinyNet(), state)
    assert isinstance(fresh.act, nn.Tanh) and not hasattr(fresh.fc1, "weight_mask")
    assert fresh._modelopt_state == state["modelopt_state_dict"]
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))


def test_restore_from_model_like():
    state = mto.modelopt_state(mto.apply_mode(TinyNet, ["t_holder", "t_replace"]))
    model = mto.restore_from_modelopt_state((TinyNet,), state)
    assert isinstance(model, TinyNet) and isinstance(model.act, nn.Tanh)


def test_restore_from_modelopt_state_argument_rules(net, tmp_path):
    with pytest.raises(AssertionError, match="Either modelopt_state or modelopt_state_path must be provided, but not both."):
        mto.restore_from_modelopt_state(net)
    with pytest.raises(AssertionError, match="Either modelopt_state or modelopt_state_path"):
        mto.restore_from_modelopt_state(net, {}, modelopt_state_path="x")
    with pytest.raises(AssertionError, match="^modelopt_state is required!$"):
        mto.restore_from_modelopt_state(net, {})


@pytest.mark.parametrize(
    "state, exc, msg",
    [
        ([("t_replace", {})], TypeError, "modelopt_state must be the dict returned by modelopt_state"),
        ({"modelopt_state_dict": []}, KeyError, "modelopt_state has no 'modelopt_version' key"),
        ({"modelopt_state": {}, "model_state_dict": {}}, KeyError, "this is a full checkpoint"),
        ({"modelopt_state_dict": [("t_replace", {"config": {}})], "modelopt_version": "0.47.0"}, KeyError,
         r"modelopt state entry 0 \(mode 't_replace'\) has no 'metadata'"),
    ],
)
def test_restore_from_malformed_state(net, state, exc, msg):
    with pytest.raises(exc, match=msg):
        mto.restore_from_modelopt_state(net, state)
    assert not hasattr(net, "_modelopt_state")


def test_load_modelopt_state(tmp_path, net):
    path = tmp_path / "state.pt"
    torch.save(mto.modelopt_state(mto.apply_mode(net, "t_replace")), path)
    state = mto.load_modelopt_state(path)
    assert state["modelopt_state_dict"][0][0] == "t_replace"
    model = mto.restore_from_modelopt_state(TinyNet(), modelopt_state_path=path)
    assert isinstance(model.act, nn.Tanh)


@pytest.mark.parametrize(
    "obj, exc, msg",
    [
        ([1, 2], TypeError, "^Invalid modelopt state file: expected a dict, got list.$"),
        ({"modelopt_state": {}, "model_state_dict": {}}, ValueError, "full checkpoint"),
        ({"modelopt_state_dict": []}, ValueError, r"missing required key\(s\) \['modelopt_version'\]"),
        ({"modelopt_state_dict": {}, "modelopt_version": "1"}, TypeError, "'modelopt_state_dict' must be a list, got dict"),
        ({"modelopt_state_dict": [], "modelopt_version": 1}, TypeError, "'modelopt_version' must be a str, got int"),
    ],
)
def test_load_modelopt_state_validation(tmp_path, obj, exc, msg):
    path = tmp_path / "bad.pt"
    torch.save(obj, path)
    with pytest.raises(exc, match=msg):
        mto.load_modelopt_state(path)


def test_get_mode(net):
    assert mto.get_mode(net) is None
    assert mto.get_mode(mto.apply_mode(net, ["t_replace", "t_update"])) is mto._ModeRegistryCls.get_from_any("t_update")
