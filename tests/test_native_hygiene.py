"""Native-specific checks: re-importing the extension gives an independent module
(multi-phase init).  The reference-leak loops live in tests/isolated/ (tests/test_isolated.py)."""

import os
import subprocess
import sys
import textwrap


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def test_reimport_gives_an_independent_module():
    script = textwrap.dedent(f"""
        import gc, importlib, sys, warnings
        sys.path[:0] = [{ROOT!r}, {TESTS!r}]
        warnings.simplefilter("ignore")
        import modelopt_c
        from modes import TinyNet, facade, register
        MODES = register(facade("modelopt_c"))  # keep the registry alive
        first = sys.modules.pop("modelopt_c._conversion")
        second = importlib.import_module("modelopt_c._conversion")
        assert second is not first
        assert second.ModeloptStateManager is not first.ModeloptStateManager
        assert second.ApplyModeError is not first.ApplyModeError
        for mod in (first, second):
            m = mod.apply_mode(TinyNet(), "t_replace")
            assert mod.ModeloptStateManager.is_converted(m)
            assert isinstance(mod.ModeloptStateManager(m), mod.ModeloptStateManager)
        del first
        gc.collect()
        print("reimport ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.splitlines()[-1] == "reimport ok"
