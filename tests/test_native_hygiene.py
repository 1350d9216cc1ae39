"""Native-specific checks: reference leaks over the type and every function, run in
isolated subprocesses, and re-importing the extension (multi-phase init)."""

import os
import subprocess
import sys
import textwrap


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

PRELUDE = """
import gc, io, os, sys, tempfile, tracemalloc, warnings
sys.path[:0] = [ROOT_DIR, TESTS_DIR]
import torch, torch.nn as nn
import modelopt_c as mto
from modes import TinyNet, facade, register
MODES = register(facade("modelopt_c"))  # keep the registry alive
SM = mto.ModeloptStateManager
warnings.simplefilter("ignore")

def _growth(fn, rounds):
    gc.collect()
    tracemalloc.start()
    objects = len(gc.get_objects())
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(rounds):
        fn()
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return len(gc.get_objects()) - objects, grown

def _per_call(fn, rounds):
    for _ in range(rounds):
        fn()
    objs_short, bytes_short = _growth(fn, rounds)
    objs_long, bytes_long = _growth(fn, 4 * rounds)
    return (objs_long - objs_short) / (3 * rounds), (bytes_long - bytes_short) / (3 * rounds)

def leak_check(name, fn, rounds=300, baseline=None):
    # Bounded caches (torch, pydantic) grow once; a leak grows with every call.  So
    # compare the growth over 4N calls with that over N: a leak of one small object
    # per call shows as ~1 object or >= 32 bytes per extra call (what tracemalloc
    # counts for the smallest object); the bound, 24, leaves room for cache noise.  torch.save/load
    # themselves grow a little per call here; `baseline` (the same torch calls
    # without modelopt_c) is measured alike and subtracted.
    objs, size = _per_call(fn, rounds)
    if baseline is not None:
        base_objs, base_size = _per_call(baseline, rounds)
        objs, size = objs - base_objs, size - base_size
    assert objs < 0.3, f"{name}: {objs:.2f} more objects per call"
    assert size < 24, f"{name}: {size:.1f} more bytes per call"
    print("ok", name, round(objs, 2), round(size, 1))
"""


def _run(body: str) -> str:
    prelude = PRELUDE.replace("ROOT_DIR", repr(ROOT)).replace("TESTS_DIR", repr(TESTS))
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(body)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_no_reference_leaks_on_success_paths(tmp_path):
    out = _run(f"""
        path = {str(tmp_path / 'c.pt')!r}
        base = mto.apply_mode(TinyNet(), ["t_replace", ("t_sparse", {{"sparsity": 0.5}})])
        state = mto.modelopt_state(base)
        mto.save(base, path)
        def manager():
            m = TinyNet(); sm = SM(m, init_state=True)
            sm.add_mode("t_update", SM.get_config_class("t_update", {{}}), {{}})
            sm.check_mode("t_replace"); sm.update_last_state_before_save(m)
            sm.update_last_state_before_new_mode(m); list(sm.modes_with_states())
            sm.last_mode; sm._export_stack; sm.has_state; sm.state_version; sm.state_dict()
            SM.is_converted(m, is_root=True); SM.has_state_for_mode_type("t_modes", model=m)
            other = TinyNet(); SM.transfer_state_dict(m, other); SM.remove_state(other)
        leak_check("manager", manager)
        leak_check("apply_mode", lambda: mto.apply_mode(TinyNet(), ["t_update", "t_replace"], mode_kwargs={{"a": 1}}))
        leak_check("modelopt_state", lambda: mto.modelopt_state(base))
        leak_check("get_mode", lambda: mto.get_mode(base))
        leak_check("restore_from_modelopt_state", lambda: mto.restore_from_modelopt_state(TinyNet(), state))
        ckpt = {{"modelopt_state": state, "model_state_dict": base.state_dict()}}
        leak_check("save", lambda: mto.save(base, path), rounds=250, baseline=lambda: torch.save(ckpt, path + ".t"))
        leak_check("restore", lambda: mto.restore(TinyNet(), path), rounds=250,
                   baseline=lambda: torch.load(path, mmap=True, weights_only=True))
        buf = io.BytesIO()
        def save_restore_buffer():
            buf.seek(0); mto.save(base, buf); buf.seek(0); mto.restore(TinyNet(), buf)
        def torch_buffer():
            buf.seek(0); torch.save(ckpt, buf); buf.seek(0); torch.load(buf, weights_only=True)
        leak_check("file objects", save_restore_buffer, rounds=250, baseline=torch_buffer)
    """)
    assert out.count("ok ") == 8


def test_no_reference_leaks_on_error_paths(tmp_path):
    out = _run(f"""
        bad = {str(tmp_path / 'bad.pt')!r}
        open(bad, "wb").write(b"not a checkpoint")
        def expect(exc, fn, *a, **k):
            try:
                fn(*a, **k)
            except exc:
                return
            raise AssertionError("no error")
        converted = mto.apply_mode(TinyNet(), "t_update")
        leak_check("unknown mode", lambda: expect(KeyError, mto.apply_mode, TinyNet(), "nope_mode_q"))
        leak_check("bad config", lambda: expect(Exception, mto.apply_mode, TinyNet(), [("t_sparse", {{"sparsity": 9}})]))
        leak_check("bad convert", lambda: expect(TypeError, mto.apply_mode, TinyNet(), "t_bad_convert"))
        leak_check("order", lambda: expect(AssertionError, mto.apply_mode, TinyNet(), "t_sparse_export"))
        leak_check("init twice", lambda: expect(AssertionError, SM, converted, init_state=True))
        leak_check("malformed", lambda: expect(ValueError, SM(init_state=True).load_state_dict, ["x"]))
        leak_check("not a checkpoint", lambda: expect(ValueError, mto.restore, TinyNet(), bad), rounds=250)
        good = {str(tmp_path / 'good.pt')!r}
        mto.save(TinyNet(), good)
        leak_check("wrong arch", lambda: expect(RuntimeError, mto.restore, nn.Linear(1, 1), good), rounds=250,
                   baseline=lambda: torch.load(good, mmap=True, weights_only=True))
        leak_check("missing dir", lambda: expect(FileNotFoundError, mto.save, TinyNet(), {str(tmp_path / 'no' / 'x.pt')!r}))
    """)
    assert out.count("ok ") == 9


def test_reimport_gives_an_independent_module():
    out = _run("""
        import importlib
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
    assert "reimport ok" in out
