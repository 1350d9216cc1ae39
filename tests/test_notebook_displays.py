"""Displays: the manager's repr (C tp_repr), configs, descriptors and registries;
IPython / Jupyter displays; describe() against the CLI's inspect; a clean dir()."""

from __future__ import annotations

import io
import warnings
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn as nn

import modelopt_c as mto
from modelopt_c import cli
from modelopt_c.config import ModeloptBaseConfig, ModeloptField

SM = mto.ModeloptStateManager


def _converted(net):
    return mto.apply_mode(net, [("t_replace", {"act": "tanh"}), ("t_sparse", {"sparsity": 0.25})])


def test_manager_repr_lists_modes_export_and_version(net):
    model = _converted(net)
    version = SM(model).state_version
    assert repr(SM(model)) == (
        "<modelopt_c.ModeloptStateManager: 2 modes t_replace -> t_sparse; "
        f"export pending: t_sparse needs t_sparse_export; version {version!r}>"
    )
    model = mto.apply_mode(model, "t_sparse_export")
    assert repr(SM(model)) == (
        "<modelopt_c.ModeloptStateManager: 3 modes t_replace -> t_sparse -> t_sparse_export; "
        f"version {version!r}>"
    )


def test_manager_repr_empty_one_mode_and_subclass(net):
    sm = SM(net, init_state=True)
    assert repr(sm) == f"<modelopt_c.ModeloptStateManager: no modes; version {sm.state_version!r}>"
    model = mto.apply_mode(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), "t_replace")

    class Sub(SM):
        pass

    assert repr(Sub(model)).startswith("<Sub: 1 mode t_replace; version ")


def test_manager_repr_never_raises_on_a_state_it_cannot_resolve(net):
    model = _converted(net)
    state = SM(model)._state
    state.append(("t_unknown_mode", {"config": {}, "metadata": {}}))
    state.append(42)
    text = repr(SM(model))
    assert text.startswith("<modelopt_c.ModeloptStateManager: 4 modes t_replace -> t_sparse -> t_unknown_mode -> "
                           "<invalid entry 3>; export status unknown (a mode is not registered); version ")
    del state[-2:]


def test_descriptor_and_registry_reprs(lib):
    d = mto._ModeRegistryCls.get_from_any("t_sparse")
    assert repr(d) == "<Mode_t_sparse: 't_sparse'; config SparseConfig; export mode 't_sparse_export'>"
    e = mto._ModeRegistryCls.get_from_any("t_sparse_export")
    assert repr(e) == "<Mode_t_sparse_export: 't_sparse_export'; config EmptyConfig; an export mode>"
    text = repr(lib.registry)
    assert text.startswith("<_ModeRegistryCls 't_modes': ")
    assert text.split(": ", 1)[1].startswith(f"{len(lib.registry._name2descriptor)} modes: t_replace, t_sparse, ")
    assert repr(mto._ModeRegistryCls("t_empty_reg")) == "<_ModeRegistryCls 't_empty_reg': no modes>"


def test_descriptor_repr_survives_a_raising_property():
    class Half(mto.ModeDescriptor):
        name = "t_half"

        @property
        def config_class(self):
            raise RuntimeError("not written yet")

        convert = restore = property(lambda self: None)

    assert repr(Half()) == "<Half: 't_half'>"


def test_config_repr_cuts_long_values():
    class LongConfig(ModeloptBaseConfig):
        bits: int = ModeloptField(8)
        table: list = ModeloptField(list(range(1000)), alias="lut")

    text = repr(LongConfig())
    assert text.startswith("LongConfig(bits=8, table=[0, 1, 2, ")
    assert text.endswith("... (1000 items))") and len(text) < 120
    assert repr(LongConfig(lut=[1, 2])) == "LongConfig(bits=8, table=[1, 2])"


def test_describe_equals_the_cli_inspect_for_both_formats(net, tmp_path):
    model = _converted(net)
    for name in ("m.pt", "m.safetensors"):
        path = tmp_path / name
        mto.save(model, path)
        out = io.StringIO()
        with redirect_stdout(out):
            assert cli.main(["inspect", str(path)]) == 0
        summary = mto.describe(path)
        assert isinstance(summary, mto.Summary)
        assert str(summary) == repr(summary) == out.getvalue()
        assert summary == mto.describe(str(path)) and summary.info["file"] == str(path)
        assert [m["name"] for m in summary.info["modes"]] == ["t_replace", "t_sparse"]


def test_describe_model_matches_the_saved_file(net, tmp_path):
    model = _converted(net)
    mem, path = mto.describe(model), tmp_path / "m.pt"
    mto.save(model, path)
    disk = mto.describe(path)
    assert mem.info["modes"] == disk.info["modes"] and mem.info["tensors"] == disk.info["tensors"]
    assert mem.info["export_pending"] == [["t_sparse", "t_sparse_export"]]
    lines = str(mem).splitlines()
    assert lines[0] == "model:       TinyNet"
    assert "export pending: t_sparse needs t_sparse_export" in lines
    assert str(mto.describe(nn.Linear(2, 3))).splitlines() == [
        "model:       Linear", "modes:       0", "tensors:     2 (36 B, 36 bytes)", "dtypes:      float32: 2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a wrapper is looked through without a warning
        assert mto.describe(nn.DataParallel(model)).info["modes"] == mem.info["modes"]


def test_describe_does_not_run_update_for_save(lib, net):
    model = mto.apply_mode(net, "t_update")
    before = repr(SM(model).state_dict())
    mto.describe(model)
    assert repr(SM(model).state_dict()) == before


def test_describe_bad_file_names_it(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    with pytest.raises(mto.CheckpointError, match=r"bad\.pt: neither a torch \(zip\) checkpoint nor a safetensors"):
        mto.describe(bad)


def test_html_displays_are_tables_and_summarise_large_states(net):
    model = _converted(net)
    html = mto.describe(model)._repr_html_()
    assert html.startswith("<div class='modelopt-c-summary'><table>") and "<th>mode</th>" in html
    assert "<b>t_replace</b>" in html and "export pending" in html and "t_sparse needs t_sparse_export" in html
    sm_html = SM(model)._repr_html_()
    assert "<th style='text-align:left'>manager</th>" in sm_html and "&lt;modelopt_c.ModeloptStateManager" in sm_html
    # a large state: rows beyond the first 20 are counted, a long config folds
    info = {"model": "Big", "modelopt_version": "x", "modes": [
        {"name": f"m{i}", "config": {"table": list(range(200))}, "metadata": {"k": "dict of 3"}} for i in range(50)]}
    big = mto.Summary(info)._repr_html_()
    assert big.count("<details>") == 20 and "… 30 more modes" in big and "<b>m19</b>" in big and "<b>m20</b>" not in big
    assert "<script" not in mto.Summary({"model": "<script>", "modes": []})._repr_html_()


def test_pretty_displays(net):
    pretty = pytest.importorskip("IPython.lib.pretty")
    model = _converted(net)
    text = pretty.pretty(SM(model))
    lines = text.splitlines()
    assert lines[0] == repr(SM(model))
    assert "  modes:       2" in lines and "    [1] t_sparse" in lines
    assert pretty.pretty(mto.describe(model)) == str(mto.describe(model)).rstrip("\n")


def test_state_objects_keep_their_types(net):
    model = _converted(net)
    state = mto.modelopt_state(model)
    assert type(state) is dict and type(state["modelopt_state_dict"]) is list
    assert all(type(entry) is tuple for entry in state["modelopt_state_dict"])


def test_dir_is_the_public_api():
    names = dir(mto)
    assert names == sorted(mto.__all__)
    assert not {"annotations", "codec", "interop", "checkpoint", "summary"} & set(names)
    from modelopt_c import codec  # submodules stay importable
    import modelopt_c.interop

    assert codec.dumps_state is mto.dumps_state and modelopt_c.interop.has_mode("t_nothing") is False
    assert "describe" in mto.__all__ and "Summary" in mto.__all__
    assert isinstance(torch.nn.Linear(1, 1), torch.nn.Module)
