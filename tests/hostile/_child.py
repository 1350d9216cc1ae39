"""Run hostile cases in this process and judge them against make_hostile.CASES.

    python tests/hostile/_child.py IN_DIR RESULTS_FILE CASE [CASE ...]
    python tests/hostile/_child.py --vmpeak          # print VmPeak (kB) after the imports

Started by test_hostile.py under an address-space limit and a timeout.  For each
case, one JSON line is appended (and flushed) to RESULTS_FILE as soon as the case is
judged: {"case": name, "ok": bool, "got": what happened}.  A case that kills the
process (a signal, a hang, an abort) has no line: the runner sees which.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import sys
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import modelopt_c as mto  # noqa: E402
import modelopt_c.st_format as st_format  # noqa: E402
from modelopt_c import cli  # noqa: E402

import make_hostile as H  # noqa: E402


def _snapshot(model: torch.nn.Module) -> tuple:
    """Everything a failed restore must leave as it was."""
    tensors = {k: (v.dtype, tuple(v.shape), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}
    modules = [(name, type(m).__name__) for name, m in model.named_modules()]
    return tensors, modules, hasattr(model, "_modelopt_state")


def _same_snapshot(a: tuple, b: tuple) -> str | None:
    (ta, ma, sa), (tb, mb, sb) = a, b
    if ma != mb:
        return f"modules changed: {ma} -> {mb}"
    if sa != sb:
        return f"_modelopt_state {'appeared' if sb else 'vanished'}"
    if ta.keys() != tb.keys():
        return f"state_dict keys changed: {sorted(ta)} -> {sorted(tb)}"
    for k in ta:
        if ta[k][:2] != tb[k][:2] or not torch.equal(ta[k][2], tb[k][2]):
            return f"tensor {k!r} changed"
    return None


def call(case: H.Case, path: Path) -> tuple[Any, Any, tuple | None]:
    """(result, model, snapshot) for the case's API; raises what the API raises."""
    api = case.api
    if api == "restore":
        model = H.MODELS[case.model]()
        snap = _snapshot(model)
        try:
            return mto.restore(model, str(path)), model, snap
        except BaseException as exc:
            exc.__hostile_model_change__ = _same_snapshot(snap, _snapshot(model))  # type: ignore[attr-defined]
            raise
    if api in ("save_restore_pt", "save_restore_st"):
        fmt = "torch" if api.endswith("pt") else "safetensors"
        target = path.with_suffix(".pt" if fmt == "torch" else ".safetensors")
        mto.save(H.MODELS[case.model](fill=True), str(target), format=fmt)
        model = H.MODELS[case.model]()
        return mto.restore(model, str(target)), model, None
    if api == "st_load":
        return st_format.load_file(str(path)), None, None
    if api == "st_load_unverified":  # a file made by another tool: no checksums to verify
        return st_format.load_file(str(path), verify=False), None, None
    if api == "loads_state":
        return mto.loads_state(path.read_bytes(), source=str(path)), None, None
    if api == "roundtrip_state":
        value = H.VALUES[case.value]()
        return (value, mto.loads_state(mto.dumps_state(value))), None, None
    if api == "load_modelopt_state":
        return mto.load_modelopt_state(str(path)), None, None
    if api in ("cli_inspect", "cli_verify"):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main([api[4:], str(path)])
        return (status, out.getvalue(), err.getvalue()), None, None
    raise AssertionError(f"unknown api {api!r}")


def _fill(fragment: str, path: Path) -> str:
    return fragment.replace("{path}", str(path)).replace("{name}", path.name)


def judge(case: H.Case, path: Path) -> tuple[bool, str]:
    try:
        result, model, _ = call(case, path)
    except BaseException as exc:  # noqa: BLE001 - judged below; MemoryError included
        got = f"{type(exc).__name__}: {exc}"[:2000]
        for want in case.expect:
            if isinstance(want, H.Raises) and isinstance(exc, tuple(H.EXC[t] for t in want.types)):
                if _fill(want.fragment, path) not in str(exc):
                    continue
                change = getattr(exc, "__hostile_model_change__", None)
                if change:
                    return False, f"{got} -- but the model was changed: {change}"
                return True, got
        return False, got + "\n" + "".join(traceback.format_exception(exc))[-3000:]
    if case.api.startswith("cli_"):
        # a failure: one line on stderr; stdout holds at most verify's one-line verdict
        status, out, err = result
        got = f"exit {status}, stdout {out[-1500:]!r}, stderr {err[-1500:]!r}"
        for want in case.expect:
            if isinstance(want, H.Exits) and status == want.status:
                if "Traceback" in out + err or (
                    status != 0 and (len(err.splitlines()) != 1 or len(out.splitlines()) > 1)
                ):
                    return False, got + " (a traceback, or not exactly one line of error)"
                if _fill(want.fragment, path) in err or (status == 0 and _fill(want.fragment, path) in out):
                    return True, got
        return False, got
    failures = []
    for want in case.expect:
        if isinstance(want, H.Loads):
            try:
                H.CHECKS[want.check](result, model)
                return True, f"loaded: {want.what}"
            except AssertionError as exc:
                failures.append(f"loaded, but {want.check} failed: {exc!r}"[:2000])
    return False, "; ".join(failures) or f"returned {type(result).__name__}, expected an exception"


def _churn() -> None:
    """Collect and allocate after each case, so that heap damage a case did without
    crashing (a double free, an overflow into malloc's metadata) is more likely to
    abort this child in the normal build too (ASan reports it at once)."""
    gc.collect()
    junk = [bytes(i % 700) for i in range(20000)]
    junk += [torch.empty(i % 64) for i in range(2000)]
    del junk
    gc.collect()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--vmpeak"]:
        status = Path("/proc/self/status").read_text()
        print(next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmPeak")))
        return 0
    in_dir, results = Path(argv[0]), Path(argv[1])
    with open(results, "a", encoding="utf-8") as out:
        for name in argv[2:]:
            case = H.CASES[name]
            print(f"hostile: {name}", file=sys.stderr, flush=True)
            ok, got = judge(case, H.input_path(in_dir, case))
            _churn()
            out.write(json.dumps({"case": name, "ok": ok, "got": got}) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
