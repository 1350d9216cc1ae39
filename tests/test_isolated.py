"""The leak loops: each script in tests/isolated/ runs in a fresh interpreter (a leak
or a crash there cannot disturb, or be hidden by, the rest of the suite).

Marked `isolated` and skipped by the default run (they are most of the suite's time);
CI runs them: `python -m pytest -q -m isolated` (only these) or `--run-isolated`
(everything).  Each script prints one "ok <check>[<tab>figures]" line per check that passed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "isolated")
ROOT = os.path.dirname(os.path.dirname(HERE))

# script -> the checks it must report (every one of them, in order).  Named leaks_*: a
# script's folder is first on its sys.path, so it must not share a name with a package.
SCRIPTS = {
    "leaks_conversion": ["manager", "apply_mode", "modelopt_state", "get_mode", "restore_from_modelopt_state",
                         "unknown mode", "bad config", "bad convert", "order", "init twice", "malformed"],
    "leaks_checkpoints": ["save", "restore", "file objects", "not a checkpoint", "wrong arch", "missing dir",
                          "save with progress", "restore with progress", "started hook raises",
                          "progress hook raises"],
    "leaks_codec": ["codec"],
    "leaks_safetensors": ["st_write/st_read", "fds and mappings"]
    + ([] if os.environ.get("MODELOPT_C_SANITIZE") else ["rss"]),
}


def test_every_script_is_run():
    on_disk = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith("_")}
    assert on_disk == set(SCRIPTS)


@pytest.mark.isolated
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_no_leaks(script, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, os.path.join(HERE, script + ".py"), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    passed = [line[3:].split("\t")[0] for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert passed == SCRIPTS[script], proc.stdout
