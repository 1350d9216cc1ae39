"""Progress of long saves, restores and conversions: a tqdm bar or the caller's hook.

``progress=`` of ``save`` / ``restore`` (and the CLI's ``convert``):

* ``None`` (the default): a bar (bytes, rate, ETA) when the output is interactive -- a
  terminal on stderr, or a Jupyter kernel -- and tqdm is installed (``pip install
  modelopt_c[progress]``), shown only once the work has taken more than a second;
  nothing otherwise;
* ``True``: a bar at once (a warning when tqdm is missing); ``False``: nothing;
* a callable ``hook(done_bytes, total_bytes)``: called as the work advances, for a
  training framework's own logger.  A torch-format save calls it from a helper thread
  that watches the file grow (torch.save writes with the GIL released), and raises
  the hook's exception once the save has ended (the file is then written); the other
  writers and readers call it from the calling thread, and an exception from it aborts
  the work (the file is left as it was, a restore is rolled back).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Union

__all__ = ["Progress", "reporting", "watch_file"]

Hook = Callable[[int, int], object]
Progress = Union[bool, None, Hook]

# a bar appears only for work that takes longer than this (seconds)
AUTO_DELAY = 1.0
# how often a torch-format save's file size is looked at (seconds)
POLL_INTERVAL = 0.1


def _in_jupyter() -> bool:
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def interactive_output() -> bool:
    """Whether a person is watching: stderr is a terminal, or we run in a Jupyter kernel."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # replaced or closed stderr
        pass
    return _in_jupyter()


def _tqdm_class() -> Any:
    """tqdm's class: the notebook widget when ipywidgets is there, else the text bar."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    if _in_jupyter():
        try:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm as notebook_tqdm

            return notebook_tqdm
        except ImportError:
            pass  # the text bar, on the cell's stderr
    return tqdm


def _check(progress: Any) -> None:
    if progress is not None and not isinstance(progress, bool) and not callable(progress):
        raise TypeError(
            f"progress must be True, False, None or a callable(done_bytes, total_bytes), not {type(progress).__name__}."
        )


@contextlib.contextmanager
def reporting(progress: Progress, label: str, total: int = 0) -> Iterator[Hook | None]:
    """The hook ``(done_bytes, total_bytes)`` for ``progress`` (see the module), or None.

    A bar is closed when the block ends; its total follows what the hook is told.
    """
    _check(progress)
    if progress is False or (progress is None and not interactive_output()):
        yield None
        return
    if callable(progress) and not isinstance(progress, bool):
        yield progress
        return
    tqdm = _tqdm_class()
    if tqdm is None:
        if progress is True:
            warnings.warn("progress=True needs tqdm (pip install tqdm); no progress is shown.", stacklevel=3)
        yield None
        return
    bar = tqdm(total=total or None, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
               delay=0 if progress is True else AUTO_DELAY, leave=True, dynamic_ncols=True)

    def hook(done: int, total: int) -> None:
        if total and bar.total != total:
            bar.total = total
        if done > bar.n:
            bar.update(done - bar.n)

    try:
        yield hook
    finally:
        bar.close()


class watch_file:  # noqa: N801 - used like a function: watch_file(hook, total)
    """Report a file's growth to ``hook`` while it is written by someone else.

    ``started(path)`` (the torch-format writer's ``_started``) begins watching ``path``
    from a helper thread, every POLL_INTERVAL seconds; ``finish()`` stops it and reports
    the final size.  ``total`` is an estimate (the tensors' bytes): the hook is told
    ``max(total, size)``.
    """

    def __init__(self, hook: Hook, total: int) -> None:
        self.hook, self.total = hook, total
        self.path: str | None = None
        self.size = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def started(self, path: str) -> None:
        self.path = path
        self.hook(0, self.total)
        self._thread = threading.Thread(target=self._run, name="modelopt_c progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_INTERVAL):
            try:
                self.size = os.stat(self.path).st_size  # type: ignore[arg-type]
            except OSError:  # renamed into place (or removed): the writer is done
                return
            try:
                self.hook(self.size, max(self.total, self.size))
            except BaseException as exc:  # noqa: BLE001 - re-raised by finish()
                self.error = exc
                return

    def finish(self, path: Any, ok: bool) -> None:
        """Stop watching; on success report the written file's final size; re-raise the hook's error."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error
        if ok and self.path is not None:
            size = os.stat(path).st_size
            self.hook(size, size)
