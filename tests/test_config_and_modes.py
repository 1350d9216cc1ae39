"""ModeloptBaseConfig / ModeloptField (SPEC §8) and the mode API (SPEC §7)."""

import pytest
import torch
from pydantic import ValidationError

import modelopt_c as mto


class AConfig(mto.ModeloptBaseConfig):
    alpha: int = mto.ModeloptField(1)
    beta: float = mto.ModeloptField(0.5, alias="b")


def test_config_is_strict_and_validates_assignment():
    cfg = AConfig(alpha=2, b=0.25)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        AConfig(gamma=1)
    with pytest.raises(ValidationError, match="Input should be a valid integer"):
        cfg.alpha = "x"
    assert cfg.alpha == 2


def test_config_dumps_by_alias():
    assert AConfig().model_dump() == {"alpha": 1, "b": 0.5}
    assert AConfig().model_dump(by_alias=False) == {"alpha": 1, "beta": 0.5}
    assert AConfig().model_dump_json() == '{"alpha":1,"b":0.5}'


def test_config_mapping_behaviour():
    cfg = AConfig()
    assert cfg["b"] == cfg["beta"] == 0.5
    assert "b" in cfg and "beta" in cfg and "nope" not in cfg and 3 not in cfg
    assert list(cfg.keys()) == ["alpha", "b"] and list(cfg.values()) == [1, 0.5]
    assert dict(cfg.items()) == {"alpha": 1, "b": 0.5} and len(cfg) == 2
    cfg["b"] = 0.75
    cfg.update({"alpha": 5})
    assert (cfg.alpha, cfg.beta) == (5, 0.75)
    assert cfg.get("nope", 7) == 7
    with pytest.raises(KeyError):
        cfg["nope"]
    with pytest.raises(KeyError):
        cfg["nope"] = 1
    with pytest.raises(TypeError, match=r"AConfig does not support key deletion; schema fields are fixed \(attempted to delete 'alpha'\)\."):
        del cfg["alpha"]


def test_field_insists_on_a_default():
    with pytest.raises(AssertionError, match="A default value must be set for ModeloptField."):
        mto.ModeloptField()
    assert mto.ModeloptField(3).default == 3


def test_config_classes_are_torch_safe_globals(tmp_path):
    path = tmp_path / "cfg.pt"
    torch.save({"c": AConfig(alpha=9)}, path)
    assert torch.load(path, weights_only=True)["c"].alpha == 9


def _descriptor(name_, **extra):
    attrs = {
        "name": property(lambda self: name_),
        "config_class": property(lambda self: AConfig),
        "convert": property(lambda self: lambda m, c: (m, {})),
        "restore": property(lambda self: lambda m, c, d: m),
    }
    attrs.update({k: property(lambda self, v=v: v) for k, v in extra.items()})
    return type(f"D_{name_}", (mto.ModeDescriptor,), attrs)


def test_descriptor_defaults_and_identity():
    d = _descriptor("d_defaults")()
    assert (d.next_modes, d.next_prohibited_modes, d.export_mode) == (None, None, None)
    assert (d.is_export_mode, d.require_model_like, d.save_mode_in_state) == (False, False, True)
    assert d.update_for_save(None, None, None) is None and d.update_for_new_mode(None, None, None) is None
    assert str(d) == "d_defaults" and repr(d) == "<D_d_defaults: 'd_defaults'; config AConfig>" and hash(d) == hash("d_defaults")
    with pytest.raises(RuntimeError, match="^Search is not supported for this mode.$"):
        d.search_algorithm
    assert mto._ModeDescriptor is mto.ModeDescriptor
    with pytest.raises(TypeError):
        mto.ModeDescriptor()


def test_registry_lifecycle():
    r1, r2 = mto._ModeRegistryCls("reg_a"), mto._ModeRegistryCls("reg_b")
    cls = _descriptor("d_shared")
    assert r1.register_mode(cls) is cls
    r2.register_mode(cls)
    assert r1["d_shared"] is r2["d_shared"]  # one instance across registries
    assert "d_shared" in r1 and r1.get("d_shared") is r1["d_shared"] and r1.get("x") is None
    assert mto._ModeRegistryCls.contained_in_any("d_shared")
    assert mto._ModeRegistryCls.get_from_any(r1["d_shared"]) is r1["d_shared"]
    assert mto._ModeRegistryCls.get_registry_by_name("reg_b") is r2
    with pytest.raises(ValueError, match="^Mode d_shared already registered"):
        r1.register_mode(cls)
    r1.remove_mode("d_shared")
    assert "d_shared" not in r1
    with pytest.raises(KeyError):
        r1.remove_mode("d_shared")
    del r1
    with pytest.raises(KeyError, match="Registry reg_a not found."):
        mto._ModeRegistryCls.get_registry_by_name("reg_a")
    r2.remove_mode("d_shared")


def test_ambiguous_mode():
    r1, r2 = mto._ModeRegistryCls("amb_a"), mto._ModeRegistryCls("amb_b")
    r1._name2descriptor["d_amb"] = _descriptor("d_amb")()
    r2._name2descriptor["d_amb"] = _descriptor("d_amb")()
    with pytest.raises(AssertionError, match="^Mode d_amb is ambiguous.$"):
        mto._ModeRegistryCls.get_from_any("d_amb")
    r1.remove_mode("d_amb")
    r2.remove_mode("d_amb")


def test_get_mode_config():
    d = mto._ModeRegistryCls.get_from_any("t_replace")
    assert mto.get_mode_config("a") == [("a", {})]
    assert mto.get_mode_config(("a", None)) == [("a", {})]
    assert mto.get_mode_config(["a", ("b", {"x": 1}), d]) == [("a", {}), ("b", {"x": 1}), (d, {})]
    with pytest.raises(TypeError, match="Cannot read mode 3"):
        mto.get_mode_config([3])


def test_assert_compatibility_messages():
    first = _descriptor("d_first", next_modes={"d_x"})()
    second = _descriptor("d_second")()
    with pytest.raises(AssertionError, match=r"^Cannot add d_second after d_first! Next modes of d_first are \{'d_x'\}.$"):
        second.assert_compatibility_as_next_mode_of(first)


def test_public_names_and_alias_module():
    import modelopt_c.torch.opt as alias

    for name in ["ModeloptStateManager", "apply_mode", "modelopt_state", "save", "restore",
                 "restore_from_modelopt_state", "load_modelopt_state", "get_mode", "ModeDescriptor",
                 "_ModeDescriptor", "_ModeRegistryCls", "get_mode_config", "ModeloptBaseConfig", "ModeloptField",
                 "ApplyModeError", "ModelLikeModule", "__version__"]:
        assert getattr(alias, name) is getattr(mto, name)
    assert issubclass(mto.ApplyModeError, RuntimeError)
    assert mto.__version__ == "0.1.0" and mto.MODELOPT_STATE_VERSION == "0.47.0"
