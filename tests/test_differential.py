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


def _run(lib, tmp_path):
    out = tmp_path / f"{lib}.json"
    proc = subprocess.run([sys.executable, SCRIPT, lib, str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("differential")
    return _run("modelopt", tmp), _run("modelopt_c", tmp)


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
