"""The same scenarios, run by nvidia-modelopt and by modelopt_c in separate processes,
must be observed the same: states, outputs, exception types, and messages (ours may
say more after the reference's text, never less)."""

import json
import os
import subprocess
import sys

import pytest

from _optional import optional_import

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "differential", "scenarios.py")

optional_import("modelopt.torch.opt", "nvidia-modelopt")


def _run_both(libs, tmp_path):
    """Run the scenarios under each library, the processes side by side (independent:
    each writes its own file)."""
    procs = {lib: subprocess.Popen([sys.executable, SCRIPT, lib, str(tmp_path / f"{lib}.json")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for lib in libs}
    results = []
    for lib, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
        assert proc.returncode == 0, f"{lib}: {err[-3000:]}"
        results.append(json.loads((tmp_path / f"{lib}.json").read_text()))
    return tuple(results)


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("differential")
    return _run_both(["modelopt", "modelopt_c"], tmp)


def _compare(ref, ours, where):
    if isinstance(ref, dict) and "exc" in ref:
        assert isinstance(ours, dict) and ours.get("exc") == ref["exc"], f"{where}: {ours} vs {ref}"
        assert ours["msg"].startswith(ref["msg"]), f"{where}: {ours['msg']!r} vs {ref['msg']!r}"
    elif isinstance(ref, dict):
        assert isinstance(ours, dict) and ours.keys() == ref.keys(), f"{where}: {ours} vs {ref}"
        for key in ref:
            _compare(ref[key], ours[key], f"{where}.{key}")
    else:
        assert ours == ref, f"{where}: {ours!r} vs {ref!r}"


SCENARIOS = [
    "apply_and_state", "export_flow", "mode_order_errors", "manager_rules", "load_state_and_versions",
    "transfer", "save_restore_roundtrip", "restore_from_state_rules", "load_modelopt_state_checks",
    "configs_as_mappings", "unknown_mode",
]


@pytest.mark.parametrize("name", SCENARIOS)
def test_same_observations(observed, name):
    ref, ours = observed
    assert "crashed" not in ours[name], ours[name].get("crashed")
    assert "crashed" not in ref[name], ref[name].get("crashed")
    _compare(ref[name], ours[name], name)
