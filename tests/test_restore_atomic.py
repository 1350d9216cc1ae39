"""Issue 9: a restore loads what torch would load, or changes nothing.

- the fast in-place path only for plain modules (state-dict hooks can return clones);
- every key, shape, dtype and kind checked before the first byte is copied;
- a failed restore (weights that don't fit, a mode that raises) leaves the model as it was;
- tensors with the negative or conjugate bit keep their values.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import modelopt_c as mto
from modes import TinyNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- modes for the transaction tests -------------------------------------------------

_R = mto._ModeRegistryCls("t_atomic")


class _Empty(mto.ModeloptBaseConfig):
    pass


class DynLinear(nn.Linear):
    """What a mode's restore turns a Linear into in place (like nvidia's dynamic modules)."""


def _identity_convert(model, config, **kwargs):
    return model, {}


def _dyn_restore(model, config, metadata):
    # in place: class swap, new attribute, new buffer, a hook, a new Parameter object
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = DynLinear
            m.dyn_marker = "dyn"
            m.register_buffer("dyn_amax", torch.ones(1))
            m.register_forward_hook(lambda *a: None)
            m.weight = nn.Parameter(torch.zeros_like(m.weight))
    model.extra = nn.Linear(2, 2)
    return model


def _failing_restore(model, config, metadata):
    model.fc2 = nn.Identity()  # halfway through its work
    raise ValueError("t_atomic_fail: cannot restore this")


def _dyn_convert(model, config, **kwargs):
    return _dyn_restore(model, config, {}), {}


def _mode(name, convert, restore):
    attrs = {
        "name": property(lambda self: name),
        "config_class": property(lambda self: _Empty),
        "convert": property(lambda self: convert),
        "restore": property(lambda self: restore),
    }
    _R.register_mode(type(f"Mode_{name}", (mto.ModeDescriptor,), attrs))


_mode("t_atomic_dyn", _dyn_convert, _dyn_restore)
_mode("t_atomic_fail", _identity_convert, _failing_restore)


def _picture(model):
    """Everything a failed restore must leave as it was (identities and values)."""
    mods = {}
    for name, m in model.named_modules():
        mods[name] = (
            m,
            type(m),
            sorted(m.__dict__),
            {k: (p, p.detach().clone()) for k, p in m._parameters.items()},
            {k: (b, None if b is None else b.clone()) for k, b in m._buffers.items()},
            dict(m._forward_hooks),
            dict(m._modules),
        )
    return mods, model.__dict__.get("_modelopt_state", "absent")


def _assert_same(before, after):
    mods_b, state_b = before
    mods_a, state_a = after
    assert mods_a.keys() == mods_b.keys()
    for name, b in mods_b.items():
        a = mods_a[name]
        assert a[0] is b[0] and a[1] is b[1], name
        assert a[2] == b[2], name
        assert a[3].keys() == b[3].keys()
        for k, (p, v) in b[3].items():
            assert a[3][k][0] is p and torch.equal(a[3][k][1], v), (name, k)
        assert a[4].keys() == b[4].keys()
        for k, (t, v) in b[4].items():
            assert a[4][k][0] is t and (v is None or torch.equal(a[4][k][1], v)), (name, k)
        assert a[5] == b[5] and a[6] == b[6], name
    assert state_a == state_b


# ---- 1. the fast path is only for plain modules -----------------------------------------


class Amax(nn.Module):
    """A quantizer-like module whose state-dict hook returns clones (as nvidia's NVFP4 ones do)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("amax", torch.zeros(4))
        self.register_state_dict_post_hook(self._clone_amax)

    @staticmethod
    def _clone_amax(module, state_dict, prefix, local_metadata):
        state_dict[prefix + "amax"] = state_dict[prefix + "amax"].clone()


class WithAmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.q = Amax()


def test_state_dict_hook_returning_clones_loads_into_the_live_buffers(tmp_path):
    torch.manual_seed(0)
    src = WithAmax()
    src.q.amax.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    mto.save(src, tmp_path / "c.pt")
    fresh = WithAmax()
    live, weight = fresh.q.amax, fresh.fc.weight
    assert fresh.state_dict(keep_vars=True)["q.amax"] is not live  # the hook hands out a clone
    restored = mto.restore(fresh, tmp_path / "c.pt")
    assert restored.q.amax is live and restored.fc.weight is weight
    assert torch.equal(live, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(weight, src.fc.weight)


class CloningStateDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def state_dict(self, *args, **kwargs):
        return {k: v.clone() for k, v in super().state_dict(*args, **kwargs).items()}


def test_overridden_state_dict_loads_into_the_live_tensors(tmp_path):
    torch.manual_seed(0)
    src = CloningStateDict()
    mto.save(src, tmp_path / "c.pt")
    torch.manual_seed(1)
    fresh = CloningStateDict()
    weight = fresh.fc.weight
    mto.restore(fresh, tmp_path / "c.pt")
    assert fresh.fc.weight is weight and torch.equal(weight, src.fc.weight)
    assert torch.equal(fresh.fc.bias, src.fc.bias)


def test_state_dict_set_on_the_instance_or_patched_later_is_not_the_fast_path(tmp_path):
    torch.manual_seed(0)
    src = WithAmax()
    src.q.amax.copy_(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    mto.save(src, tmp_path / "c.pt")

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("amax", torch.zeros(4))

    def make():
        model = WithAmax()
        model.q = Plain()
        return model

    from modelopt_c._runtime import _live_targets, plain_load_targets

    model = make()
    assert _live_targets(model)[1:] == (True, True) and plain_load_targets(model) is not None
    plain = mto.restore(model, tmp_path / "c.pt")  # the fast path, once, for this class
    assert torch.equal(plain.q.amax, src.q.amax)
    model = make()
    model.q.state_dict = lambda *a, **k: {"amax": torch.zeros(4)}  # an instance override
    assert _live_targets(model)[1:] == (False, True) and plain_load_targets(model) is None
    live = model.q.amax
    mto.restore(model, tmp_path / "c.pt")
    assert model.q.amax is live and torch.equal(live, src.q.amax)
    Plain.state_dict = lambda self, *a, **k: {"amax": torch.zeros(4)}  # patched after a restore
    model = make()
    assert _live_targets(model)[1:] == (False, True)
    model.q.__class__._load_from_state_dict = lambda self, *a, **k: None  # the loading side too
    assert _live_targets(model)[1:] == (False, False)
    live = model.q.amax
    mto.restore(model, tmp_path / "c.pt")  # the module's own loader decides: as under torch, it loads nothing
    assert torch.equal(live, torch.zeros(4)) and torch.equal(model.fc.weight, src.fc.weight)


_HOOKS = {  # how a module gets each kind of instance hook, and whether it touches the loading side
    "state_dict post-hook": (lambda m: m._register_state_dict_hook(lambda *a: None), False),
    "state_dict pre-hook": (lambda m: m.register_state_dict_pre_hook(lambda *a: None), False),
    "load pre-hook": (lambda m: m._register_load_state_dict_pre_hook(lambda *a: None), True),
    "load post-hook": (lambda m: m.register_load_state_dict_post_hook(lambda *a: None), True),
}


@pytest.mark.parametrize("hook", sorted(_HOOKS))
def test_an_instance_hook_takes_its_module_off_the_fast_path_until_removed(hook):
    from modelopt_c._runtime import _live_targets, _own_loading

    register, loading_side = _HOOKS[hook]
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    inner = model[1][0]
    assert _own_loading(inner) == (False, False) and _live_targets(model)[1:] == (True, True)
    handle = register(inner)
    assert _own_loading(inner) == ((not loading_side), loading_side)
    assert _own_loading(inner, {}) == _own_loading(inner)  # a per-walk class cache gives the same answer
    assert _live_targets(model)[1:] == (False, not loading_side)
    assert _own_loading(model[0]) == (False, False)  # its sibling stays plain
    handle.remove()  # the hook table stays, empty: plain again
    assert _own_loading(inner) == (False, False) and _live_targets(model)[1:] == (True, True)


@pytest.mark.parametrize("name", ["state_dict", "_save_to_state_dict", "load_state_dict", "_load_from_state_dict",
                                  "get_extra_state", "set_extra_state"])
def test_a_method_set_on_the_instance_takes_its_module_off_the_fast_path(name):
    from modelopt_c._runtime import _live_targets, _own_loading

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    setattr(model[1], name, lambda *a, **k: None)
    loading_side = name not in ("state_dict", "_save_to_state_dict")
    assert _own_loading(model[1]) == ((not loading_side), loading_side)
    assert _live_targets(model)[1:] == (False, not loading_side)
    assert _own_loading(model[0]) == (False, False)
    delattr(model[1], name)
    assert _own_loading(model[1]) == (False, False) and _live_targets(model)[1:] == (True, True)


def test_hooked_model_is_still_checked_before_anything_is_copied(tmp_path):
    src = WithAmax()
    sd = src.state_dict()
    sd["fc.bias"] = torch.zeros(5)
    torch.save({"modelopt_state": mto.modelopt_state(src), "model_state_dict": sd}, tmp_path / "c.pt")
    fresh = WithAmax()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(RuntimeError) as info:
        mto.restore(fresh, tmp_path / "c.pt")
    msg = str(info.value)
    assert msg.startswith("Error(s) in loading state_dict for WithAmax:")
    assert "size mismatch for fc.bias: copying a param with shape torch.Size([5]) from checkpoint" in msg
    assert "nothing was copied" in msg
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


# ---- 2. everything checked before the first byte moves -----------------------------------


def _write(path, model, sd):
    torch.save({"modelopt_state": mto.modelopt_state(model), "model_state_dict": sd}, path)


def _restore_refused(model, path, exc=RuntimeError):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc) as info:
        mto.restore(model, path)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "_modelopt_state" not in model.__dict__
    return str(info.value)


@pytest.mark.parametrize(
    "key, bad, expected",
    [
        (
            "fc2.bias",
            lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8),
            "dtype mismatch for fc2.bias: the checkpoint's tensor is torch.qint8, the model's is torch.float32 "
            "(quantized tensors load only into quantized tensors of the same dtype).",
        ),
        (
            "fc2.weight",
            lambda t: t.to_sparse(),
            "layout mismatch for fc2.weight: the checkpoint's tensor is torch.sparse_coo, the model's is "
            "torch.strided.",
        ),
        (
            "fc2.bias",
            lambda t: t.to(torch.complex64),
            "dtype mismatch for fc2.bias: the checkpoint's tensor is torch.complex64, the model's is "
            "torch.float32 (casting complex to real would discard the imaginary part).",
        ),
        ("fc2.bias", lambda t: [1.0, 2.0, 3.0], "fc2.bias in the checkpoint is a list, not a tensor."),
    ],
    ids=["quantized", "sparse", "complex", "not-a-tensor"],
)
def test_last_tensor_of_a_bad_kind_copies_nothing(tmp_path, key, bad, expected):
    src = TinyNet()
    sd = src.state_dict()
    sd[key] = bad(sd[key])
    assert list(sd)[-1] == "fc2.bias" and list(sd)[0] == "calls"  # the bad one comes after good ones
    _write(tmp_path / "c.pt", src, sd)
    msg = _restore_refused(TinyNet(), tmp_path / "c.pt")
    assert msg.startswith("Error(s) in loading state_dict for TinyNet:")
    assert expected in msg and str(tmp_path / "c.pt") in msg


def test_meta_tensor_in_the_file_is_refused(tmp_path):
    src = TinyNet()
    sd = src.state_dict()
    sd["fc2.bias"] = torch.empty(3, device="meta")
    # torch.save cannot write meta tensors' data; hand restore the dict through load_checkpoint's result
    from modelopt_c import _runtime

    model = TinyNet()
    with pytest.raises(RuntimeError, match="fc2.bias is on the meta device in the checkpoint"):
        _runtime.check_weights(model, _runtime._live_targets(model)[0], sd, "x.pt")


def test_every_offending_key_is_named_and_real_dtypes_cast_like_torch(tmp_path):
    src = TinyNet()
    sd = src.state_dict()
    sd["fc1.weight"] = sd["fc1.weight"].double()  # accepted: torch's copy_ casts between real dtypes
    sd["fc1.bias"] = torch.zeros(9)
    sd["fc2.bias"] = sd["fc2.bias"].to(torch.complex64)
    del sd["calls"]
    sd["extra"] = torch.zeros(1)
    _write(tmp_path / "c.pt", src, sd)
    msg = _restore_refused(TinyNet(), tmp_path / "c.pt")
    lines = msg.split("\n\t")
    assert lines[1] == 'Missing key(s) in state_dict: "calls". '
    assert lines[2] == 'Unexpected key(s) in state_dict: "extra". '
    assert lines[3].startswith("size mismatch for fc1.bias:")
    assert lines[4].startswith("dtype mismatch for fc2.bias:")

    del sd["extra"], sd["fc1.bias"], sd["fc2.bias"]
    sd["calls"] = torch.ones(1, dtype=torch.int64)
    sd["fc1.bias"], sd["fc2.bias"] = src.fc1.bias.detach(), src.fc2.bias.detach()
    _write(tmp_path / "ok.pt", src, sd)
    model = mto.restore(TinyNet(), tmp_path / "ok.pt")
    assert model.fc1.weight.dtype == torch.float32 and torch.equal(model.fc1.weight, src.fc1.weight)
    assert torch.equal(model.calls, torch.ones(1))


@pytest.mark.parametrize("key", [b"fc1.weight", 3, 2.5, None], ids=["bytes", "int", "float", "None"])
def test_non_str_keys_are_unexpected_keys_not_a_crash(tmp_path, key):
    src = TinyNet()
    sd = src.state_dict()
    sd[key] = torch.zeros(1)
    _write(tmp_path / "c.pt", src, sd)
    msg = _restore_refused(TinyNet(), tmp_path / "c.pt")
    assert f"Unexpected key(s) in state_dict: {key!r}. " in msg


class MarkedTensor(torch.Tensor):
    """A plain torch.Tensor subclass (stands in for DTensor and friends)."""


def test_tensor_subclass_in_the_file_is_a_clean_type_error(tmp_path):
    src = TinyNet()
    sd = src.state_dict()
    sd["fc1.weight"] = sd["fc1.weight"].as_subclass(MarkedTensor)
    _write(tmp_path / "c.pt", src, sd)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError) as info:
        mto.restore(model, tmp_path / "c.pt", weights_only=False)
    msg = str(info.value)
    assert '"fc1.weight" is a test_restore_atomic.MarkedTensor in the checkpoint' in msg
    assert "Tensor subclasses (DTensor, FSDP2 shards, ...) are not supported yet" in msg
    assert "Nothing was loaded." in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tensor_subclass_in_the_model_is_a_clean_type_error(tmp_path):
    src = TinyNet()
    mto.save(src, tmp_path / "c.pt")
    model = TinyNet()
    model.fc2.bias = nn.Parameter(model.fc2.bias.detach().as_subclass(MarkedTensor))
    assert type(model.fc2.bias) is not nn.Parameter
    with pytest.raises(TypeError, match=r'"fc2.bias" is a test_restore_atomic.MarkedTensor in the model'):
        mto.restore(model, tmp_path / "c.pt")


def test_dtensor_in_the_model_is_a_clean_type_error(tmp_path):
    code = textwrap.dedent(
        f"""
        import os, torch, torch.nn as nn, torch.distributed as dist
        from torch.distributed.tensor import distribute_tensor, Replicate
        from torch.distributed.device_mesh import init_device_mesh
        import modelopt_c as mto
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
        mesh = init_device_mesh("cpu", (1,))
        model = nn.Linear(4, 2)
        mto.save(model, {str(tmp_path / "c.pt")!r})
        model.weight = nn.Parameter(distribute_tensor(model.weight.detach(), mesh, [Replicate()]))
        try:
            mto.restore(model, {str(tmp_path / "c.pt")!r})
        except TypeError as exc:
            print("TypeError:", exc)
        dist.destroy_process_group()
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert 'TypeError: checkpoint' in out.stdout
    assert '"weight" is a torch.distributed.tensor.DTensor in the model' in out.stdout


# ---- 3. a failed restore changes nothing -------------------------------------------------


def test_weights_that_do_not_fit_leave_the_replayed_modes_off_the_model(tmp_path):
    converted = mto.apply_mode(TinyNet(), ["t_replace", ("t_sparse", {"sparsity": 0.5}), "t_atomic_dyn"])
    mto.save(converted, tmp_path / "c.pt")
    model = TinyNet(width=5)
    before = _picture(model)
    with pytest.raises(RuntimeError, match="size mismatch for fc1.weight"):
        mto.restore(model, tmp_path / "c.pt")
    _assert_same(before, _picture(model))
    assert type(model.fc1) is nn.Linear and not hasattr(model.fc1, "weight_mask")
    assert isinstance(model.act, nn.ReLU) and not hasattr(model, "extra")
    # and the same model restores fine from a checkpoint that fits
    mto.save(mto.apply_mode(TinyNet(width=5), ["t_replace", "t_atomic_dyn"]), tmp_path / "ok.pt")
    restored = mto.restore(model, tmp_path / "ok.pt")
    assert type(restored.fc1) is DynLinear and isinstance(restored.act, nn.Tanh)


def test_a_mode_raising_halfway_through_several_modes_changes_nothing(tmp_path):
    converted = mto.apply_mode(TinyNet(), ["t_replace", "t_atomic_dyn", "t_atomic_fail"])
    mto.save(converted, tmp_path / "c.pt")
    model = TinyNet()
    before = _picture(model)
    with pytest.raises(ValueError, match="t_atomic_fail: cannot restore this"):
        mto.restore(model, tmp_path / "c.pt")
    _assert_same(before, _picture(model))

    state = mto.modelopt_state(converted)
    with pytest.raises(ValueError, match="t_atomic_fail: cannot restore this"):
        mto.restore_from_modelopt_state(model, state)
    _assert_same(before, _picture(model))


def test_refused_restore_into_a_converted_model_keeps_its_modes():
    model = mto.apply_mode(TinyNet(), ["t_replace"])
    state_obj = model._modelopt_state
    before = _picture(model)
    bad = mto.apply_mode(TinyNet(), ["t_replace", "t_atomic_dyn", "t_atomic_fail"])
    with pytest.raises(AssertionError, match="Model already has modelopt state!"):
        mto.restore_from_modelopt_state(model, mto.modelopt_state(bad))
    _assert_same(before, _picture(model))
    assert model._modelopt_state is state_obj


# ---- 4. negative and conjugate bits ------------------------------------------------------


class Signs(nn.Module):
    def __init__(self, real, cplx):
        super().__init__()
        self.real = nn.Parameter(real, requires_grad=False)
        self.register_buffer("cplx", cplx)


def test_negative_and_conjugate_tensors_in_the_file_keep_their_sign(tmp_path):
    torch.manual_seed(0)
    z, y = torch.randn(6, dtype=torch.complex64), torch.randn(6, dtype=torch.complex64)
    src = Signs(z.conj().imag, y.conj())  # torch.save keeps both bits
    assert src.real.is_neg() and src.cplx.is_conj()
    mto.save(src, tmp_path / "c.pt")
    model = Signs(torch.zeros(6), torch.zeros(6, dtype=torch.complex64))
    mto.restore(model, tmp_path / "c.pt")
    assert torch.equal(model.real, -z.imag) and torch.equal(model.cplx, y.conj().resolve_conj())


def test_negative_and_conjugate_tensors_in_the_model_get_the_file_values(tmp_path):
    torch.manual_seed(0)
    z, y = torch.randn(6, dtype=torch.complex64), torch.randn(6, dtype=torch.complex64)
    w = torch.randn(6, dtype=torch.complex64)
    mto.save(Signs(w.real.clone(), w.clone()), tmp_path / "c.pt")
    model = Signs(z.conj().imag, y.conj())
    assert model.real.is_neg() and model.cplx.is_conj()
    mto.restore(model, tmp_path / "c.pt")
    assert torch.equal(model.real, w.real) and torch.equal(model.cplx, w)
