"""The hostile corpus (make_hostile.CASES), each case judged in a child process.

Every case must end with its documented outcome (make_hostile's table): the expected
exception type and message fragment, or a load whose values are checked; never a
signal, a hang, a MemoryError, or a model changed by a failed restore.

The children run under an address-space limit (RLIMIT_AS: the VmPeak of a bare
`import torch, modelopt_c` child plus LIMIT_HEADROOM) and a timeout.  Under the
sanitizer build (MODELOPT_C_SANITIZE=1, .ci/sanitize.sh) the limit is lifted (ASan
reserves terabytes of address space) and only the timeout applies.

Cases are run several per child, grouped by API; when a child dies, the case it
was running is re-run alone (the culprit; if it passes alone, the cases before it
are re-run alone too, heap damage can surface late) and the group goes on.

Run: PYTHONPATH=$PWD python -m pytest -q tests/hostile   (about a minute)
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_hostile as H  # noqa: E402

# Cases known to fail, each with what happens now (empty: every case passes).  Each
# entry is an xfail(strict=True): a case that starts passing fails the run until it is
# removed.
# An entry starting with "[asan]" fails only under the sanitizer build (in the normal
# build the memory error goes unnoticed or is random): strict there, non-strict here.
# One starting with "[normal]" fails only in the normal build: a memory bound, which
# RLIMIT_AS enforces there and nothing does under ASan (its limit is lifted).
KNOWN_BROKEN: dict[str, str] = {}

SANITIZE = os.environ.get("MODELOPT_C_SANITIZE", "") not in ("", "0")
LIMIT_HEADROOM = 1536 * 1024 * 1024  # bytes of address space above the import baseline
GROUP_TIMEOUT = 900 if SANITIZE else 240  # seconds, for a child running a group
ALONE_TIMEOUT = 60 if SANITIZE else 25  # seconds, for a child running one case that may hang (FIFOs)
CHILD = HERE / "_child.py"


def _limit_as(limit: int | None):
    if limit is None:
        return None

    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return preexec


class Runner:
    """Runs the cases' children on demand and caches every case's record."""

    def __init__(self, in_dir: Path, work: Path) -> None:
        self.in_dir, self.work = in_dir, work
        self.records: dict[str, dict] = {}
        self.limit = None if SANITIZE else self._baseline() + LIMIT_HEADROOM
        self.runs = 0

    def _baseline(self) -> int:
        out = subprocess.run([sys.executable, str(CHILD), "--vmpeak"], capture_output=True, text=True,
                             timeout=300, check=True)
        return int(out.stdout.strip()) * 1024

    def _child(self, names: list[str], timeout: float) -> tuple[dict[str, dict], str]:
        self.runs += 1
        results = self.work / f"results-{self.runs}.jsonl"
        cmd = [sys.executable, "-W", "ignore", str(CHILD), str(self.in_dir), str(results), *names]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  preexec_fn=_limit_as(self.limit))
            rc = proc.returncode
            died = "" if rc == 0 else (f"killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}")
            tail = proc.stderr[-4000:]
        except subprocess.TimeoutExpired as exc:
            died = f"timed out after {timeout}s"
            tail = (exc.stderr or b"")[-4000:].decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr)[-4000:]
        done = {}
        if results.exists():
            for line in results.read_text().splitlines():
                record = json.loads(line)
                done[record["case"]] = record
        return done, (f"{died}; stderr tail:\n{tail}" if died else "")

    def record(self, name: str) -> dict:
        if name not in self.records:
            case = H.CASES[name]
            if case.alone:
                self._run_alone(name)
            else:
                self._run_group([n for n, c in H.CASES.items() if c.api == case.api and not c.alone
                                 and n not in self.records])
        return self.records[name]

    def _run_group(self, names: list[str]) -> None:
        """Run `names` in one child; when it dies, the first unreported case is the
        suspect: it is re-run alone, and if it passes alone the damage came from an
        earlier case (heap damage can surface later), so those are re-run alone too;
        the rest of the group goes on in a new child."""
        while names:
            done, died = self._child(names, GROUP_TIMEOUT)
            if not died:
                self.records.update(done)
                return
            k = next((i for i, n in enumerate(names) if n not in done), len(names) - 1)
            self._run_alone(names[k])
            if self.records[names[k]]["ok"]:
                for n in names[:k]:
                    self._run_alone(n)
                if all(self.records[n]["ok"] for n in names[: k + 1]):  # never a silent pass
                    self.records[names[k]] = {
                        "case": names[k], "ok": False,
                        "got": f"each passes alone, but the child running {names[: k + 1]} in a row died "
                               f"while running the last: one of them damages the process\n{died}"}
            else:
                self.records.update({n: done[n] for n in names[:k]})
            names = names[k + 1 :]

    def _run_alone(self, name: str) -> None:
        done, died = self._child([name], ALONE_TIMEOUT if H.CASES[name].alone else GROUP_TIMEOUT)
        record = done.get(name) or {"case": name, "ok": False, "got": "the child died before reporting"}
        if died:
            record = {**record, "ok": False, "got": f"{record['got']}\n-- and the child died: {died}"}
        self.records[name] = record


@pytest.fixture(scope="session")
def runner(tmp_path_factory) -> Runner:
    in_dir = tmp_path_factory.mktemp("hostile-in")
    H.generate(in_dir)
    return Runner(in_dir, tmp_path_factory.mktemp("hostile-work"))


def _param(name: str):
    why = KNOWN_BROKEN.get(name)
    if why is None:
        return pytest.param(name, id=name)
    if why.startswith("[asan]"):
        strict = SANITIZE
    elif why.startswith("[normal]"):
        strict = not SANITIZE
    else:
        strict = True
    return pytest.param(name, id=name, marks=pytest.mark.xfail(strict=strict, reason=why))


@pytest.mark.parametrize("name", [_param(n) for n in H.CASES])
def test_hostile_case(runner: Runner, name: str) -> None:
    record = runner.record(name)
    case = H.CASES[name]
    assert record["ok"], f"{name} ({case.api}: {case.why}); expected one of {case.expect}; got:\n{record['got']}"


def test_known_broken_names_are_cases() -> None:
    assert set(KNOWN_BROKEN) <= set(H.CASES), sorted(set(KNOWN_BROKEN) - set(H.CASES))


def test_every_issue_class_has_cases() -> None:
    apis = {c.api for c in H.CASES.values()}
    assert {"restore", "st_load", "loads_state", "roundtrip_state", "load_modelopt_state", "cli_inspect",
            "cli_verify", "save_restore_pt", "save_restore_st"} <= apis, apis
    prefixes = {n.split("_")[0] for n in H.CASES}
    assert {"st", "codec", "pt", "fifo"} <= prefixes, prefixes


def _fake_runner(monkeypatch, behaviour) -> Runner:
    """A Runner whose children are simulated: behaviour(names) -> (reported names, died)."""
    r = Runner.__new__(Runner)
    r.records, r.runs = {}, 0

    def child(names, timeout):
        reported, died = behaviour(list(names))
        return {n: {"case": n, "ok": True, "got": "fine"} for n in reported}, died

    monkeypatch.setattr(r, "_child", child)
    return r


def test_runner_names_the_culprit_of_a_dead_group(monkeypatch) -> None:
    a, b, c, d = [n for n, case in H.CASES.items() if case.api == "st_load"][:4]

    def behaviour(names):  # b kills any child that runs it
        if b in names:
            return names[: names.index(b)], "killed by signal SIGSEGV"
        return names, ""

    r = _fake_runner(monkeypatch, behaviour)
    r._run_group([a, b, c, d])
    assert {n: r.records[n]["ok"] for n in (a, b, c, d)} == {a: True, b: False, c: True, d: True}
    assert "SIGSEGV" in r.records[b]["got"]


def test_runner_never_passes_a_group_that_died(monkeypatch) -> None:
    a, b, c = [n for n, case in H.CASES.items() if case.api == "st_load"][:3]

    def behaviour(names):  # a damages the heap, which kills the child at b; alone, both pass
        if names[:2] == [a, b]:
            return [a], "killed by signal SIGABRT"
        return names, ""

    r = _fake_runner(monkeypatch, behaviour)
    r._run_group([a, b, c])
    assert r.records[a]["ok"] and r.records[c]["ok"]
    assert not r.records[b]["ok"] and "each passes alone" in r.records[b]["got"], r.records[b]


def test_generator_is_deterministic(tmp_path) -> None:
    names = [n for n, c in H.CASES.items() if c.build is not None and not c.alone]
    H.generate(tmp_path / "a", names)
    H.generate(tmp_path / "b", names)
    for n in names:
        a = H.input_path(tmp_path / "a", H.CASES[n]).read_bytes()
        assert a == H.input_path(tmp_path / "b", H.CASES[n]).read_bytes(), n
    assert len(H.input_path(tmp_path / "a", H.CASES["codec_nested_array_bomb"]).read_bytes()) == 1_400_000
