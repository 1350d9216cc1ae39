"""Start-up hook of processes started by ``python -m modelopt_c run`` (on their PYTHONPATH).

With ``MODELOPT_C=1`` in the environment it registers modelopt_c's import hooks
(``modelopt_c/_hook.py``, loaded by path: no torch, nothing imported until nvidia-modelopt's
conversion module or a missing ``modelopt`` is), then runs the next ``sitecustomize`` on
sys.path, if any, as Python would have.
"""

import importlib
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGE = os.path.dirname(_HERE)


def _switch() -> None:
    if os.environ.get("MODELOPT_C") != "1":
        return
    hook = sys.modules.get("modelopt_c._hook")
    if hook is None:
        spec = importlib.util.spec_from_file_location("modelopt_c._hook", os.path.join(_PACKAGE, "_hook.py"))
        hook = importlib.util.module_from_spec(spec)
        sys.modules["modelopt_c._hook"] = hook
        spec.loader.exec_module(hook)
    if importlib.util.find_spec("modelopt_c") is None:  # e.g. run from a source tree in another folder
        sys.path.append(os.path.dirname(_PACKAGE))
    hook.add("fallback")
    hook.add("conversion")


def _chain() -> None:
    """Import the sitecustomize this one hides (the next one on sys.path)."""
    mine = sys.modules.pop("sitecustomize", None)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    try:
        if importlib.util.find_spec("sitecustomize") is not None:
            importlib.import_module("sitecustomize")
    finally:
        sys.modules.setdefault("sitecustomize", mine)


try:
    _switch()
finally:
    _chain()
