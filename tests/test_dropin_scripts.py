"""The drop-in switch on real user scripts, each in a fresh interpreter (marker `slow`).

tests/dropin_scripts/flows.py is written against nvidia-modelopt's ``modelopt.torch.opt``
(a custom mode, INT8 quantization with calibration, magnitude sparsity + export).  It runs
three times side by side: with nvidia-modelopt alone, switched to modelopt_c by
``python -m modelopt_c run``, and without nvidia-modelopt (hidden; custom mode only).  Each
run restores the checkpoints another run wrote; here the states must be equal and the
outputs bit-identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed")

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "dropin_scripts")
FLOWS = os.path.join(SCRIPTS, "flows.py")
ROOT = os.path.dirname(HERE)
sys.path.insert(0, SCRIPTS)
from nested_equal import same  # noqa: E402  (flows.py's own check)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MODELOPT_C", None)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dropin")
    a, b, c = (str(base / n) for n in ("nvidia", "switched", "no_nvidia"))
    commands = {
        "nvidia": [sys.executable, FLOWS, a, b],
        "switched": [sys.executable, "-m", "modelopt_c", "run", FLOWS, b, a, "--child-check"],
        "no_nvidia": [sys.executable, os.path.join(SCRIPTS, "hide_nvidia.py"), "run", FLOWS, c, a],
    }
    procs = {
        k: subprocess.Popen(cmd, env=_env(), cwd=str(base), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for k, cmd in commands.items()
    }
    logs = {}
    for k, proc in procs.items():
        try:
            logs[k] = proc.communicate(timeout=600)[0]
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
        assert proc.returncode == 0, f"{k} run failed:\n{logs[k][-4000:]}"
    out = {}
    for k, folder in (("nvidia", a), ("switched", b), ("no_nvidia", c)):
        with open(os.path.join(folder, "record.json")) as f:
            record = json.load(f)
        with open(os.path.join(folder, "loaded_other.json")) as f:
            record["loaded_other"] = json.load(f)
        record["results"] = torch.load(os.path.join(folder, "results.pt"), weights_only=False)
        record["folder"] = folder
        out[k] = record
    return out


def test_switch_is_on_only_where_asked(runs):
    assert runs["nvidia"]["switched"] is False
    assert runs["nvidia"]["apply_mode"] == "modelopt.torch.opt.conversion"
    assert runs["switched"]["switched"] is True
    assert runs["switched"]["apply_mode"] == "modelopt_c._conversion"
    assert runs["switched"]["conversion_manager"] == "modelopt_c"
    assert runs["no_nvidia"]["switched"] is True
    # the reference's class attributes, on both managers
    for k in runs:
        assert (runs[k]["state_key"], runs[k]["version_key"]) == ("_modelopt_state", "_modelopt_state_version")


def test_child_processes_stay_switched(runs):
    assert runs["switched"]["child_save_module"] == "modelopt_c.checkpoint"


def test_same_states_and_bit_identical_outputs(runs):
    nv, sw, bare = (runs[k]["results"] for k in ("nvidia", "switched", "no_nvidia"))
    assert runs["nvidia"]["flows"] == runs["switched"]["flows"] == ["custom", "int8", "sparse"]
    assert runs["no_nvidia"]["flows"] == ["custom"]
    for name in runs["nvidia"]["flows"]:
        assert same(nv["states"][name], sw["states"][name]), name
        assert torch.equal(nv["outputs"][name], sw["outputs"][name]), name
    assert same(nv["states"]["custom"], bare["states"]["custom"])
    assert torch.equal(nv["outputs"]["custom"], bare["outputs"]["custom"])
    modes = [m for m, _ in nv["states"]["int8"]["modelopt_state_dict"]]
    assert modes == ["quantize", "max_calibrate"]
    assert [m for m, _ in nv["states"]["sparse"]["modelopt_state_dict"]] == ["sparse_magnitude", "export_sparse"]


def test_files_load_in_the_other_library(runs):
    # nvidia-modelopt restored the switched run's files and vice versa; without nvidia, the custom one
    assert runs["nvidia"]["loaded_other"] == ["custom", "int8", "sparse"]
    assert runs["switched"]["loaded_other"] == ["custom", "int8", "sparse"]
    assert runs["no_nvidia"]["loaded_other"] == ["custom"]


def test_files_hold_the_same_checkpoint(runs):
    for name in runs["nvidia"]["flows"]:
        a = torch.load(os.path.join(runs["nvidia"]["folder"], name + ".pt"), weights_only=False)
        b = torch.load(os.path.join(runs["switched"]["folder"], name + ".pt"), weights_only=False)
        assert same(a, b), name
