"""The drop-in switch in this process: install()/uninstall(), the runner's arguments, the
reference's signatures and keyword arguments, the modelopt_c.torch.opt submodules, and the
``modelopt`` fallback (in a child where nvidia-modelopt is hidden).  The real scripts run in
fresh interpreters in tests/test_dropin_scripts.py (marker `slow`)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import modelopt_c as mc
from _optional import optional_import
from modelopt_c import _hook, dropin, interop

mo = optional_import("modelopt.torch.opt", "nvidia-modelopt")
mtq = optional_import("modelopt.torch.quantization", "nvidia-modelopt")
import modelopt.torch.opt.conversion as nv_conversion  # noqa: E402
import modelopt.torch.opt.plugins.huggingface as nv_hf  # noqa: E402
import modelopt.torch.quantization.conversion as nv_qconversion  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NVIDIA = {name: getattr(nv_conversion, name) for name in dropin.SWITCHED_NAMES}


@pytest.fixture
def switch(monkeypatch):
    """install() for one test; nvidia-modelopt's own objects back afterwards, whatever happened."""
    assert not dropin.is_installed()
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # restored by monkeypatch
    monkeypatch.delenv("MODELOPT_C", raising=False)
    yield dropin
    dropin.uninstall()
    assert all(getattr(nv_conversion, n) is NVIDIA[n] for n in dropin.SWITCHED_NAMES)


# ---- install / uninstall ---------------------------------------------------------------


def test_install_switches_modules_imported_before(switch):
    assert nv_conversion.save is NVIDIA["save"]
    mc.install()
    assert mc.is_installed()
    for name in dropin.SWITCHED_NAMES:
        assert getattr(nv_conversion, name) is getattr(mc, name), name
    assert mo.save is mc.save and mo.restore is mc.restore and mo.ModeloptStateManager is mc.ModeloptStateManager
    # modules that bound the names with `from ..conversion import X` before the switch
    assert nv_hf.ModeloptStateManager is mc.ModeloptStateManager
    assert nv_hf.modelopt_state is mc.modelopt_state
    assert nv_hf.restore_from_modelopt_state is mc.restore_from_modelopt_state
    assert nv_qconversion.ModeloptStateManager is mc.ModeloptStateManager
    # nvidia's own classes stay: modes, registries, ModelLikeModule, ApplyModeError
    assert nv_conversion.ModelLikeModule.__module__ == "modelopt.torch.opt.conversion"
    assert nv_conversion.ApplyModeError.__module__ == "modelopt.torch.opt.conversion"


def test_install_twice_then_uninstall_twice(switch):
    mc.install()
    meta_path = list(sys.meta_path)
    mc.install()
    assert sys.meta_path == meta_path  # one hook of each kind
    assert [getattr(f, "_modelopt_c_hook", None) for f in sys.meta_path[:2]] == ["conversion", "fallback"]
    assert nv_conversion.apply_mode is mc.apply_mode
    mc.uninstall()
    assert not mc.is_installed()
    assert nv_conversion.apply_mode is NVIDIA["apply_mode"] and mo.apply_mode is NVIDIA["apply_mode"]
    assert nv_hf.modelopt_state is NVIDIA["modelopt_state"]
    assert nv_qconversion.ModeloptStateManager is NVIDIA["ModeloptStateManager"]
    mc.uninstall()
    assert not mc.is_installed()
    assert not any(getattr(f, "_modelopt_c_hook", None) for f in sys.meta_path)


def test_switched_nvidia_quantize_records_and_restores(switch, tmp_path):
    """nvidia's mtq.quantize with calibration runs on modelopt_c's apply_mode; its state
    equals the one nvidia-modelopt alone records."""
    torch.manual_seed(0)
    data = [torch.randn(2, 8) for _ in range(2)]

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    def loop(m):
        for batch in data:
            m(batch)

    reference = mtq.quantize(net(), mtq.INT8_DEFAULT_CFG, forward_loop=loop)
    ref_state = NVIDIA["modelopt_state"](reference)
    mc.install()
    model = mtq.quantize(net(), mtq.INT8_DEFAULT_CFG, forward_loop=loop)
    assert isinstance(mo.ModeloptStateManager(model), mc.ModeloptStateManager)
    state = mo.modelopt_state(model)
    assert [m for m, _ in state["modelopt_state_dict"]] == ["quantize", "max_calibrate"]
    assert repr(state) == repr(ref_state)
    assert torch.equal(model(data[0]), reference(data[0]))
    mo.save(model=model, f=tmp_path / "q.pt")
    restored = mo.restore(net(), tmp_path / "q.pt")
    assert torch.equal(restored(data[0]), reference(data[0]))


def test_unknown_nvidia_version_raises_or_warns_with_force(switch, monkeypatch):
    monkeypatch.setattr(interop, "installed_version", lambda: "0.99.1")
    with pytest.raises(RuntimeError) as info:
        mc.install()
    assert str(info.value) == (
        "modelopt_c's switch knows nvidia-modelopt 0.47.0, but 0.99.1 is installed: its conversion "
        "layer may differ from what modelopt_c replaces. Install nvidia-modelopt==0.47.0, or switch "
        "anyway with modelopt_c.install(force=True) (python -m modelopt_c run --force ...)."
    )
    assert nv_conversion.save is NVIDIA["save"]
    assert not mc.is_installed() and _hook.installed("conversion") is None
    with pytest.warns(RuntimeWarning, match=r"0\.99\.1 is installed"):
        mc.install(force=True)
    assert nv_conversion.save is mc.save


def test_a_conversion_module_without_the_names_is_refused(switch):
    import types

    fake = types.ModuleType("fake_conversion")
    fake.save = object()
    with pytest.raises(RuntimeError, match=r"^fake_conversion has no ModeloptStateManager, apply_mode, "):
        dropin.patch_conversion(fake)


def test_runner_arguments(capsys):
    assert dropin.run(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m modelopt_c run [--force] (script.py")
    assert dropin.run([]) == 2
    assert "usage: python -m modelopt_c run" in capsys.readouterr().err
    assert dropin.run(["-m"]) == 2
    assert not dropin.is_installed()


def test_runner_missing_script(switch, capsys, tmp_path):
    missing = str(tmp_path / "nope.py")
    assert dropin.run([missing]) == 2
    assert capsys.readouterr().err == f"modelopt_c run: {missing}: no such file\n"


def test_runner_refuses_an_unknown_version(switch, monkeypatch, capsys):
    monkeypatch.setattr(interop, "installed_version", lambda: "0.12.0")
    assert dropin.run(["-c", "pass"]) == 2
    assert capsys.readouterr().err.startswith("modelopt_c run: modelopt_c's switch knows nvidia-modelopt 0.47.0, but 0.12.0")
    assert "MODELOPT_C" not in os.environ


def test_runner_runs_code_switched_and_sets_the_children_environment(switch, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    seen = {}
    monkeypatch.setattr(dropin, "_seen", seen, raising=False)
    code = (
        "import sys, modelopt.torch.opt as mto, modelopt_c.dropin as d\n"
        "d._seen['save'] = mto.save; d._seen['argv'] = list(sys.argv)"
    )
    assert dropin.run(["-c", code, "a", "--b"]) == 0
    assert seen == {"save": mc.save, "argv": ["-c", "a", "--b"]}
    assert os.environ["MODELOPT_C"] == "1"
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == dropin.STARTUP_DIR


# ---- the reference's class attributes, signatures and keywords -------------------------------


def test_state_keys_as_the_reference():
    assert mc.ModeloptStateManager._state_key == NVIDIA["ModeloptStateManager"]._state_key == "_modelopt_state"
    assert (
        mc.ModeloptStateManager._state_version_key
        == NVIDIA["ModeloptStateManager"]._state_version_key
        == "_modelopt_state_version"
    )


def _comparable(sig: inspect.Signature) -> list[tuple[str, str]]:
    return [(p.name, p.kind.name) for p in sig.parameters.values()]


def _assert_matches(ours, theirs, what: str) -> None:
    """Same parameter names and kinds, in order; the reference's defaults kept; ours may only add
    defaults or keyword-only parameters (e.g. save's format=)."""
    o, t = inspect.signature(ours), inspect.signature(theirs)
    o_params = [p for p in o.parameters.values() if not (p.kind is p.KEYWORD_ONLY and p.name not in t.parameters)]
    t_params = list(t.parameters.values())
    assert [(p.name, p.kind.name) for p in o_params] == _comparable(t), f"{what}: {o} vs the reference's {t}"
    for po, pt in zip(o_params, t_params):
        if pt.default is not inspect.Parameter.empty:
            assert po.default == pt.default, f"{what}: {po.name}={po.default!r}, the reference's {pt.default!r}"


MANAGER_METHODS = (
    "is_converted",
    "state_dict",
    "load_state_dict",
    "transfer_state_dict",
    "has_state_for_mode_type",
    "remove_state",
    "modes_with_states",
    "get_config_class",
    "check_mode",
    "add_mode",
    "update_last_state_before_new_mode",
    "update_last_state_before_save",
)


@pytest.mark.parametrize("name", [n for n in dropin.SWITCHED_NAMES if n != "ModeloptStateManager"])
def test_function_signatures_match_the_reference(name):
    _assert_matches(getattr(mc, name), NVIDIA[name], name)


@pytest.mark.parametrize("name", ("__init__", *MANAGER_METHODS))
def test_manager_signatures_match_the_reference(name):
    ref = NVIDIA["ModeloptStateManager"]
    if name == "__init__":
        _assert_matches(mc.ModeloptStateManager, ref, "ModeloptStateManager")
        return
    # bound through the class: self/cls dropped on both sides
    ours = getattr(mc.ModeloptStateManager, name)
    theirs = getattr(ref, name)
    if inspect.isfunction(theirs) and not isinstance(inspect.getattr_static(ref, name), staticmethod):
        ours_sig = inspect.signature(ours)
        assert list(ours_sig.parameters)[0] == "self", name
        theirs_sig = inspect.signature(theirs)
        # self is positional-only in C (no one passes self=...): the rest must match
        assert _comparable(ours_sig)[1:] == _comparable(theirs_sig)[1:], f"{name}: {ours_sig} vs {theirs_sig}"
        for po, pt in zip(list(ours_sig.parameters.values())[1:], list(theirs_sig.parameters.values())[1:]):
            if pt.default is not inspect.Parameter.empty:
                assert po.default == pt.default, name
        return
    _assert_matches(ours, theirs, name)


def test_every_native_function_and_method_has_a_signature():
    from modelopt_c import _conversion

    missing = []
    for name, obj in vars(_conversion).items():
        if callable(obj) and not isinstance(obj, type):
            try:
                inspect.signature(obj)
            except ValueError:
                missing.append(name)
    for name, obj in vars(mc.ModeloptStateManager).items():
        if inspect.ismethoddescriptor(obj) or inspect.isbuiltin(obj) or isinstance(obj, classmethod):
            if name.startswith("__"):
                continue
            try:
                inspect.signature(getattr(mc.ModeloptStateManager, name))
            except ValueError:
                missing.append(f"ModeloptStateManager.{name}")
    assert missing == []
    assert str(inspect.signature(mc.ModeloptStateManager)) == "(model=None, init_state=False)"
    assert mc.ModeloptStateManager.__doc__.startswith("The record of the modes")


def test_keyword_arguments_as_the_reference(tmp_path):
    torch.manual_seed(0)
    model = mc.apply_mode(model=nn.Linear(2, 2), mode=[], registry=None, init_state=None, mode_kwargs=None)
    assert mc.modelopt_state(model=model)["modelopt_state_dict"] == []
    assert mc.get_mode(model=model) is None
    mc.save(model=model, f=tmp_path / "m.pt")
    assert isinstance(mc.restore(model=nn.Linear(2, 2), f=tmp_path / "m.pt"), nn.Linear)
    torch.save(mc.modelopt_state(model), tmp_path / "s.pt")
    state = mc.load_modelopt_state(modelopt_state_path=tmp_path / "s.pt")
    m2 = mc.restore_from_modelopt_state(model=nn.Linear(2, 2), modelopt_state=state)
    assert isinstance(m2, nn.Linear)
    holder = nn.Linear(2, 2)
    manager = mc.ModeloptStateManager(model=holder, init_state=True)
    assert mc.ModeloptStateManager.is_converted(model=holder, is_root=True) is True
    manager.update_last_state_before_new_mode(model=holder)
    manager.update_last_state_before_save(model=holder)
    assert mc.ModeloptStateManager.has_state_for_mode_type("quantization", model=None, state=mc.modelopt_state(holder)) is False
    mc.ModeloptStateManager.remove_state(model=holder)
    assert not hasattr(holder, "_modelopt_state")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: mc.modelopt_state(), "modelopt_state() missing required argument 'model'"),
        (lambda: mc.modelopt_state(1, 2), "modelopt_state() takes at most 1 positional arguments (2 given)"),
        (lambda: mc.get_mode(modle=1), "get_mode() got an unexpected keyword argument 'modle'"),
        (lambda: mc.get_mode(1, model=1), "get_mode() got multiple values for argument 'model'"),
        (lambda: mc.ModeloptStateManager.remove_state(), "remove_state() missing required argument 'model'"),
        (lambda: mc.ModeloptStateManager().check_mode(mode="x", extra=1),
         "check_mode() got an unexpected keyword argument 'extra'"),
    ],
)
def test_bad_arguments_say_which(call, message):
    with pytest.raises(TypeError) as info:
        call()
    assert str(info.value) == message


# ---- modelopt_c.torch.opt submodules, and `modelopt` without nvidia-modelopt ---------------------


def test_submodules_under_the_reference_names():
    from modelopt_c.torch.opt import config, conversion, mode
    from modelopt_c.torch.opt.config import ModeloptBaseConfig, ModeloptField
    from modelopt_c.torch.opt.mode import ModeDescriptor, _ModeRegistryCls

    assert (ModeDescriptor, _ModeRegistryCls) == (mc.ModeDescriptor, mc._ModeRegistryCls)
    assert (ModeloptBaseConfig, ModeloptField) == (mc.ModeloptBaseConfig, mc.ModeloptField)
    assert conversion.__all__ == nv_conversion.__all__
    for name in nv_conversion.__all__:
        assert getattr(conversion, name) is getattr(mc, name)
    assert conversion.get_mode is mc.get_mode and conversion.ApplyModeError is mc.ApplyModeError
    assert mode.__all__ == ["ModeDescriptor"] and config.__all__ == ["ModeloptBaseConfig", "ModeloptField"]
    import modelopt.torch.opt.mode as nv_mode

    for alias in ("MetadataDict", "ModeConfigList", "ModeState", "ModeType", "ModeLike", "ModeKwargsType"):
        assert hasattr(mode, alias) and hasattr(nv_mode, alias), alias


def test_fallback_never_shadows_a_real_modelopt():
    assert _hook.FallbackFinder().find_spec("modelopt") is None
    assert _hook.FallbackFinder().find_spec("modelopt.torch.opt") is None  # only while the stand-in is loaded


def _hidden(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("MODELOPT_C", None)
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "dropin_scripts", "hide_nvidia.py"), "run", "-c", code],
        env=env, capture_output=True, text=True, timeout=300,
    )


def test_modelopt_without_nvidia_resolves_to_modelopt_c():
    code = """
import importlib, sys
import modelopt.torch.opt as mto
from modelopt.torch.opt.mode import ModeDescriptor, _ModeRegistryCls
from modelopt.torch.opt.config import ModeloptBaseConfig, ModeloptField
from modelopt.torch.opt.conversion import ModeloptStateManager, apply_mode, restore
import modelopt_c, modelopt_c.torch.opt as ours
assert mto is ours, mto
assert ModeDescriptor is modelopt_c.ModeDescriptor and _ModeRegistryCls is modelopt_c._ModeRegistryCls
assert ModeloptBaseConfig is modelopt_c.ModeloptBaseConfig and restore is modelopt_c.restore
assert sys.modules["modelopt.torch.opt.conversion"] is sys.modules["modelopt_c.torch.opt.conversion"]
assert sys.modules["modelopt"].__modelopt_c__ is True
for name in ("modelopt.torch.quantization", "modelopt.torch.opt.plugins", "modelopt.onnx"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        print(exc.name, "|", exc)
try:
    modelopt_c.restore_from_modelopt_state(
        __import__("torch").nn.Linear(2, 2),
        {"modelopt_state_dict": [("quantize", {"config": {}, "metadata": {}})], "modelopt_version": "0.47.0"},
    )
except KeyError as exc:
    print(exc.args[0])
modelopt_c.uninstall()
assert "modelopt" not in sys.modules and "modelopt.torch.opt" not in sys.modules
try:
    import modelopt
except ModuleNotFoundError as exc:
    print("after uninstall:", exc)
"""
    proc = _hidden(code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == (
        "modelopt.torch.quantization | No module named 'modelopt.torch.quantization': without nvidia-modelopt "
        "installed, modelopt_c provides modelopt.torch.opt (and its mode, config, conversion modules) only; "
        "modelopt.torch.quantization comes from nvidia-modelopt: pip install nvidia-modelopt"
    )
    assert lines[1].startswith("modelopt.torch.opt.plugins | No module named 'modelopt.torch.opt.plugins': ")
    assert lines[2].startswith("modelopt.onnx | No module named 'modelopt.onnx': ")
    assert lines[3].startswith(
        "Mode quantize not found in any registry. mode 'quantize' comes from nvidia-modelopt: pip install "
        "nvidia-modelopt. Registered modes: ["
    )
    assert lines[4] == "after uninstall: No module named 'modelopt'"


def test_the_start_up_hook_chains_to_the_next_sitecustomize(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['CHAINED'] = 'yes'\n")
    env = dict(os.environ, MODELOPT_C="1")
    env["PYTHONPATH"] = os.pathsep.join([dropin.STARTUP_DIR, str(tmp_path), ROOT])
    code = (
        "import os, sys; "
        "print(os.environ.get('CHAINED'), [getattr(f, '_modelopt_c_hook', None) for f in sys.meta_path[:2]], "
        "'torch' in sys.modules, 'modelopt_c' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # both hooks registered, nothing heavy imported at start-up, the user's sitecustomize still ran
    assert proc.stdout.strip() == "yes ['conversion', 'fallback'] False False"
    env["MODELOPT_C"] = "0"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "yes [None, None] False False"



# ---- unknown modes ------------------------------------------------------------------------


def test_a_mistyped_mode_gets_did_you_mean_and_imports_nothing():
    before = {n for n in sys.modules if n.startswith("modelopt")}
    with pytest.raises(KeyError) as info:
        mc._ModeRegistryCls.get_from_any("quantise")
    message = info.value.args[0]
    assert message.startswith("Mode quantise not found in any registry. Did you mean 'quantize'? Registered modes: [")
    assert message.endswith("Import the package that defines the mode before applying or restoring it.")
    assert {n for n in sys.modules if n.startswith("modelopt")} == before
    with pytest.raises(KeyError) as info:
        mc._ModeRegistryCls.get_from_any("zzz_nothing_like_it")
    assert info.value.args[0].startswith("Mode zzz_nothing_like_it not found in any registry. Registered modes: [")


def test_an_nvidia_mode_imports_its_own_package_only():
    descriptor = mc._ModeRegistryCls.get_from_any("kd_loss")
    assert type(descriptor).__module__ == "modelopt.torch.distill.mode"
    assert interop.NVIDIA_MODES["kd_loss"] == "modelopt.torch.distill"
    assert interop._import_mode_packages("not_a_mode") is False


def test_nvidia_modes_table_is_the_installed_versions():
    """NVIDIA_MODES lists every mode nvidia-modelopt 0.47.0 registers (its mode packages imported)."""
    import importlib

    for package in interop._MODE_PACKAGES:
        importlib.import_module(package)
    registered = set(interop.mode_names())
    assert registered <= set(interop.NVIDIA_MODES), registered - set(interop.NVIDIA_MODES)
    # the two that need optional packages (megatron, puzzletron's dependencies)
    assert set(interop.NVIDIA_MODES) - registered <= {"mcore_minitron", "puzzletron"}


# ---- the one-walk bookkeeping (is_converted, modelopt_state, get_mode) ---------------------


def _tree(n_blocks: int) -> nn.Module:
    shared = nn.Linear(2, 2)  # one module reachable from every block: visited once
    return nn.Sequential(*[nn.Sequential(nn.Linear(2, 2), shared, nn.ReLU()) for _ in range(n_blocks)])


def test_walk_over_thousands_of_modules_with_shared_ones():
    model = _tree(700)  # 2,802 distinct modules, 700 paths to the shared one
    assert mc.ModeloptStateManager.is_converted(model) is False
    deep = model[699][2]
    deep._modelopt_state = []
    assert mc.ModeloptStateManager.is_converted(model) is True
    assert NVIDIA["ModeloptStateManager"].is_converted(model) is True
    for call in (lambda: mc.modelopt_state(model), lambda: mc.get_mode(model),
                 lambda: mc.ModeloptStateManager.is_converted(model, is_root=True)):
        with pytest.raises(AssertionError, match=r"^Model has modelopt state but not the root!$"):
            call()
    with pytest.raises(AssertionError, match=r"^Model has modelopt state but not the root!$"):
        NVIDIA["modelopt_state"](model)
    model[0][1]._modelopt_state = []  # the shared module: one more state
    with pytest.raises(AssertionError, match=r"^Model has multiple modelopt states!$"):
        mc.modelopt_state(model)
    with pytest.raises(AssertionError, match=r"^Model has multiple modelopt states!$"):
        NVIDIA["modelopt_state"](model)


def test_state_declared_on_a_class_counts_once_per_module():
    class Stateful(nn.Linear):
        _modelopt_state = []

    model = nn.Sequential(nn.Linear(2, 2), Stateful(2, 2), nn.Linear(2, 2))
    assert mc.ModeloptStateManager.is_converted(model) is True
    model.append(Stateful(2, 2))
    with pytest.raises(AssertionError, match=r"^Model has multiple modelopt states!$"):
        mc.ModeloptStateManager.is_converted(model)


def test_modelopt_state_of_a_converted_model_after_one_walk():
    model = mc.apply_mode(_tree(3), [])
    mc.ModeloptStateManager(model, init_state=True)
    state = mc.modelopt_state(model)
    assert state == {"modelopt_state_dict": [], "modelopt_version": mc._runtime.state_version()}
    assert mc.get_mode(model) is None
    empty = nn.Sequential()  # falsy: the manager works on a fresh module, as the reference's does
    empty._modelopt_state, empty._modelopt_state_version = [("x", {})], ["0.47.0"]
    assert mc.modelopt_state(empty)["modelopt_state_dict"] == NVIDIA["modelopt_state"](empty)["modelopt_state_dict"] == []
