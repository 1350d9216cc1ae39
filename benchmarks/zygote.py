"""A template process per library family that forks one fresh process per measurement.

Started as ``python benchmarks/zygote.py FAMILY``, it imports the family once
(torch and the library: seconds), then reads tasks as JSON lines on stdin and
answers each with one JSON line on stdout.  For every task it forks a child
that runs the task and exits; the zygote itself never runs a measurement, so
each child starts from the same clean, imported state without paying the
import.  While the child holds its memory window open (``measure.MemoryWindow``)
the zygote samples the child's RssAnon every ``SAMPLE_SECONDS``.

``Zygote`` is the parent side: it starts the process and sends it tasks.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

SAMPLE_SECONDS = 0.002
TASK_TIMEOUT = 1800.0


def _child(task: dict[str, Any], library: Any, channel: int) -> None:
    """Run one task in the forked child; report on ``channel``; never return."""
    import measure
    import tasks

    try:
        log = os.open(task["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        window = measure.MemoryWindow(channel)
        result = {"ok": True, **tasks.run(task, library, window)}
        if window.baseline:
            result["rss_anon"] = {"baseline": window.baseline, "end": window.end}
    except BaseException as exc:  # everything must reach the parent as a result
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(channel, b"result " + json.dumps(result).encode() + b"\n")
    finally:
        os._exit(0)


def _log_tail(path: str, limit: int = 1500) -> str:
    try:
        return Path(path).read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def _supervise(pid: int, channel: int, log: str) -> dict[str, Any]:
    """Follow a child until it exits: collect its result, sample RssAnon in its window."""
    import measure

    buf = b""
    result = None
    window_open = False
    peak = samples = 0
    deadline = time.monotonic() + TASK_TIMEOUT
    while True:
        ready, _, _ = select.select([channel], [], [], SAMPLE_SECONDS if window_open else 1.0)
        if window_open:
            peak = max(peak, measure.rss_anon_bytes(pid))
            samples += 1
        if ready:
            data = os.read(channel, 1 << 16)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line in (b"start", b"stop"):
                    window_open = line == b"start"
                    peak = max(peak, measure.rss_anon_bytes(pid))
                    samples += 1
                elif line.startswith(b"result "):
                    result = json.loads(line[len(b"result ") :])
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            result = {"ok": False, "error": f"timed out after {TASK_TIMEOUT:.0f} s"}
            break
    os.close(channel)
    _, status = os.waitpid(pid, 0)
    if result is None:
        result = {"ok": False, "error": f"the measuring process died (wait status {status})"}
    if not result["ok"]:
        result["log_tail"] = _log_tail(log)
    if "rss_anon" in result:
        rss = result["rss_anon"]
        rss["peak"] = max(peak, rss["end"])
        rss["extra_peak"] = rss["peak"] - rss["baseline"]
        rss["samples"] = samples
    return result


def _run_forked(task: dict[str, Any], library: Any) -> dict[str, Any]:
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(task, library, write_end)
    os.close(write_end)
    return _supervise(pid, read_end, task["log"])


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(family: str) -> None:
    """The zygote's main loop."""
    import libraries

    try:
        library = libraries.load_family(family)
        hello = {"ready": True, "version": library.version, "notes": library.notes}
    except Exception as exc:
        library = None
        hello = {"ready": False, "error": f"{type(exc).__name__}: {exc}"}
    hello["threads_at_fork"] = len(os.listdir("/proc/self/task"))
    _emit(hello)
    for line in sys.stdin:
        _emit(_run_forked(json.loads(line), library))


class Zygote:
    """Parent side: one zygote process for one family."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), family],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._hello: dict[str, Any] | None = None

    @property
    def hello(self) -> dict[str, Any]:
        """The zygote's first line: ``ready``, ``version``, ``notes`` or ``error`` (waits for it)."""
        if self._hello is None:
            line = self.proc.stdout.readline()
            self._hello = json.loads(line) if line else {"ready": False, "error": "the zygote died at start"}
        return self._hello

    @property
    def ready(self) -> bool:
        return bool(self.hello.get("ready"))

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        """Run one task in a fresh child; a family that failed to import gives a skip."""
        if not self.ready:
            return {"ok": False, "error": f"{self.family} unavailable: {self.hello.get('error')}"}
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"ok": False, "error": f"the {self.family} zygote died"}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


if __name__ == "__main__":
    serve(sys.argv[1])
