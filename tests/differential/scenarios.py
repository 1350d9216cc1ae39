"""Scenarios run once with nvidia-modelopt and once with modelopt_c, each in its own
process: `python scenarios.py modelopt|modelopt_c OUT.json`.  Every scenario records
what a user observes (states, outputs, exception types and messages)."""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from modes import TinyNet, facade, register  # noqa: E402

LIB = facade(sys.argv[1])
MODES = register(LIB)
mto = LIB.mto
SM = mto.ModeloptStateManager
SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def net(width=8):
    torch.manual_seed(0)
    return TinyNet(width)


def x():
    torch.manual_seed(1)
    return torch.randn(5, 4)


def catch(fn, *args, **kwargs):
    try:
        return {"value": repr(fn(*args, **kwargs))}
    except Exception as exc:  # noqa: BLE001 - observing is the point
        text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        return {"exc": type(exc).__name__, "msg": text.split("\n")[0]}


@scenario
def apply_and_state():
    model = mto.apply_mode(net(), ["t_replace", ("t_update", {"saves": 2})], mode_kwargs={"k": 1})
    return {
        "live": repr(model._modelopt_state),
        "saved": repr(mto.modelopt_state(model)["modelopt_state_dict"]),
        "again": repr(mto.modelopt_state(model)["modelopt_state_dict"]),
        "converted": SM.is_converted(model, is_root=True),
        "act": type(model.act).__name__,
    }


@scenario
def export_flow():
    model = mto.apply_mode(net(), [("t_sparse", {"sparsity": 0.25})])
    sm = SM(model)
    stack = repr(sm._export_stack)
    model = mto.apply_mode(model, ["t_sparse_export"])
    return {"stack": stack, "after": repr(SM(model)._export_stack), "state": repr(model._modelopt_state),
            "has_mask": hasattr(model.fc1, "weight_mask")}


@scenario
def mode_order_errors():
    return {
        "prohibited": catch(mto.apply_mode, mto.apply_mode(net(), ["t_sparse"]), ["t_replace"]),
        "next_modes": catch(mto.apply_mode, mto.apply_mode(net(), ["t_only_replace_next"]), ["t_update"]),
        "export_without_stack": catch(mto.apply_mode, net(), ["t_sparse_export"]),
        "through_stack": catch(mto.apply_mode, mto.apply_mode(net(), ["t_sparse", "t_unsaved"]), ["t_replace"]),
        "init_twice": catch(mto.apply_mode, mto.apply_mode(net(), ["t_update"]), ["t_replace"], init_state=True),
        "kwargs_mismatch": catch(mto.apply_mode, net(), ["t_update"], mode_kwargs=[{}, {}]),
    }


@scenario
def manager_rules():
    a, b = net(), net()
    SM(a.fc1, init_state=True)
    SM(b, init_state=True)
    SM(b.fc2, init_state=True)
    c = net()
    SM(c, init_state=True)
    return {
        "not_root": catch(SM.is_converted, a, is_root=True),
        "not_root_ctor": catch(SM, a),
        "multiple": catch(SM.is_converted, b),
        "twice": catch(SM, c, init_state=True),
        "missing": catch(SM, net()),
        "falsy": catch(lambda: SM(nn.Sequential()).state_dict()),
        "has_state_both": catch(SM.has_state_for_mode_type, "t_modes", model=c, state={"a": 1}),
        "has_state_none": catch(SM.has_state_for_mode_type, "t_modes"),
        "has_state_model": catch(SM.has_state_for_mode_type, "t_modes", model=mto.apply_mode(net(), "t_replace")),
        "registry_missing": catch(SM.has_state_for_mode_type, "nope_registry", state={"modelopt_state_dict": []}),
    }


@scenario
def load_state_and_versions():
    state = [("t_replace", {"config": {"act": "tanh"}, "metadata": {"replaced": ["act"], "kwargs_seen": []}})]
    sm = SM(net(), init_state=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sm.load_state_dict(state, "0.1.0")
    again = catch(sm.load_state_dict, state, "0.1.0")
    return {"warnings": [str(w.message) for w in seen if w.category is UserWarning],
            "state": repr(sm.state_dict()), "version": sm.state_version, "again": again}


@scenario
def transfer():
    src = net()
    mto.apply_mode(src, "t_replace")
    the_list = src._modelopt_state
    dst = net()
    SM.transfer_state_dict(src, dst)
    return {"same": dst._modelopt_state is the_list, "src_has": hasattr(src, "_modelopt_state"),
            "again": catch(SM.transfer_state_dict, net(), dst)}


@scenario
def save_restore_roundtrip():
    model = mto.apply_mode(net(), ["t_replace", ("t_sparse", {"sparsity": 0.5})])
    with tempfile.TemporaryDirectory() as d:
        mto.save(model, os.path.join(d, "c.pt"))
        restored = mto.restore(net(), os.path.join(d, "c.pt"))
        buf = io.BytesIO()
        mto.save(model, buf)
        buf.seek(0)
        from_buf = mto.restore(net(), buf)
    return {"equal": torch.equal(restored(x()), model(x())), "buf_equal": torch.equal(from_buf(x()), model(x())),
            "state": repr(restored._modelopt_state), "out": restored(x()).sum().item()}


@scenario
def restore_from_state_rules():
    model = mto.apply_mode(net(), ["t_replace"])
    state = mto.modelopt_state(model)
    fresh = mto.restore_from_modelopt_state((TinyNet, (8,)), state)
    return {
        "fresh": repr(fresh._modelopt_state), "act": type(fresh.act).__name__,
        "neither": catch(mto.restore_from_modelopt_state, net()),
        "both": catch(mto.restore_from_modelopt_state, net(), state, "x.pt"),
        "empty": catch(mto.restore_from_modelopt_state, net(), {}),
    }


@scenario
def load_modelopt_state_checks():
    out = {}
    cases = {
        "list": [1, 2],
        "full": {"modelopt_state": {}, "model_state_dict": {}},
        "missing": {"modelopt_state_dict": []},
        "types1": {"modelopt_state_dict": {}, "modelopt_version": "1"},
        "types2": {"modelopt_state_dict": [], "modelopt_version": 1},
    }
    with tempfile.TemporaryDirectory() as d:
        for key, obj in cases.items():
            path = os.path.join(d, key + ".pt")
            torch.save(obj, path)
            out[key] = catch(mto.load_modelopt_state, path)
    return out


@scenario
def configs_as_mappings():
    cfg = MODES.SparseConfig(sparsity=0.3)
    return {
        "dump": cfg.model_dump(), "keys": list(cfg.keys()), "items": repr(list(cfg.items())),
        "get": cfg["sparsity"], "by_name": cfg["ratio"], "contains": ["sparsity" in cfg, "x" in cfg],
        "delete": catch(cfg.__delitem__, "ratio"), "bad": catch(MODES.SparseConfig, sparsity=3).get("exc"),
        "extra": catch(MODES.SparseConfig, nope=1).get("exc"),
    }


@scenario
def unknown_mode():
    return {"unknown": catch(mto.apply_mode, net(), ["no_such_mode_xyz"])}


if __name__ == "__main__":
    results = {}
    for name, fn in SCENARIOS.items():
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001
            results[name] = {"crashed": traceback.format_exc()}
    with open(sys.argv[2], "w") as fh:
        json.dump(results, fh, indent=1, sort_keys=True, default=repr)
