"""The drop-in switch: nvidia-modelopt's conversion layer runs on modelopt_c.

``install()`` makes ``modelopt.torch.opt`` and ``modelopt.torch.opt.conversion`` of an
installed nvidia-modelopt use modelopt_c's ``ModeloptStateManager``, ``apply_mode``,
``modelopt_state``, ``save``, ``restore``, ``restore_from_modelopt_state``,
``load_modelopt_state`` and ``get_mode`` — in every nvidia-modelopt module that bound
those names (``from ..conversion import save``), imported before the switch (a scan of
``sys.modules`` under ``modelopt.``) or after it (an import hook patches the conversion
module as soon as its body has run).  nvidia-modelopt's modes, registries, configs and
``ModelLikeModule`` stay its own: modelopt_c reads its registries (``interop``).
Without nvidia-modelopt, ``install()`` makes ``import modelopt.torch.opt`` resolve to
``modelopt_c.torch.opt`` (never shadowing a real ``modelopt``).

``python -m modelopt_c run script.py args...`` (or ``run -m module ...``) switches an
unchanged script, and the Python processes it starts (through ``MODELOPT_C=1`` and a
start-up hook on ``PYTHONPATH``).  ``uninstall()`` puts nvidia-modelopt's objects back.
"""

from __future__ import annotations

import os
import runpy
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from . import _hook, interop

__all__ = ["KNOWN_NVIDIA_VERSIONS", "SWITCHED_NAMES", "install", "is_installed", "run", "uninstall"]

# nvidia-modelopt versions whose conversion layer this switch was checked against
KNOWN_NVIDIA_VERSIONS = ("0.47.0",)
# what the switch replaces in modelopt.torch.opt.conversion (and wherever it was bound)
SWITCHED_NAMES = (
    "ModeloptStateManager",
    "apply_mode",
    "modelopt_state",
    "save",
    "restore",
    "restore_from_modelopt_state",
    "load_modelopt_state",
    "get_mode",
)
CONVERSION = _hook.CONVERSION
STARTUP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_startup")

# id -> (nvidia's original object, its name); every version seen (a reload makes new ones)
_originals: dict[int, tuple[Any, str]] = {}
# name -> nvidia's latest original, what uninstall() puts back
_latest: dict[str, Any] = {}


def _ours() -> dict[str, Any]:
    import modelopt_c

    return {name: getattr(modelopt_c, name) for name in SWITCHED_NAMES}


def _check_version(force: bool) -> str:
    version = interop.installed_version()
    assert version is not None
    if version in KNOWN_NVIDIA_VERSIONS:
        return version
    message = (
        f"modelopt_c's switch knows nvidia-modelopt {', '.join(KNOWN_NVIDIA_VERSIONS)}, but "
        f"{version} is installed: its conversion layer may differ from what modelopt_c replaces. "
        f"Install nvidia-modelopt=={KNOWN_NVIDIA_VERSIONS[-1]}, or switch anyway with "
        "modelopt_c.install(force=True) (python -m modelopt_c run --force ...)."
    )
    if not force:
        raise RuntimeError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return version


def _modelopt_modules() -> list[Any]:
    return [m for n, m in list(sys.modules.items()) if (n == "modelopt" or n.startswith("modelopt.")) and m is not None]


def _rebind(mapping: dict[int, tuple[Any, Any]]) -> int:
    """In every loaded ``modelopt.*`` module, replace each global that *is* a key's object
    (``mapping``: id -> (object, replacement)); how many bindings changed."""
    changed = 0
    for module in _modelopt_modules():
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for key, value in list(namespace.items()):
            hit = mapping.get(id(value))
            if hit is not None and hit[0] is value:
                namespace[key] = hit[1]
                changed += 1
    return changed


def patch_conversion(module: Any) -> None:
    """Switch nvidia-modelopt's conversion ``module`` (and every loaded ``modelopt.*``
    module that bound its names) to modelopt_c.  Called by the import hook right after
    the module's body ran, and by ``install()`` when it is loaded already."""
    missing = [name for name in SWITCHED_NAMES if name not in vars(module)]
    if missing:
        raise RuntimeError(
            f"{module.__name__} has no {', '.join(missing)}: this nvidia-modelopt's conversion layer is "
            "not the one modelopt_c's switch knows; uninstall the switch (modelopt_c.uninstall())."
        )
    ours = _ours()
    for name in SWITCHED_NAMES:
        current = vars(module)[name]
        if current is not ours[name]:
            _originals[id(current)] = (current, name)
            _latest[name] = current
    _rebind({key: (obj, ours[name]) for key, (obj, name) in _originals.items()})


def is_installed() -> bool:
    """Whether the switch is on (the conversion hook or the ``modelopt`` fallback)."""
    return _hook.installed("conversion") is not None or _hook.installed("fallback") is not None


def install(*, force: bool = False) -> None:
    """Run nvidia-modelopt's conversion layer on modelopt_c (see the module's docstring).

    With nvidia-modelopt installed: its ``modelopt.torch.opt`` / ``.conversion`` API
    (``SWITCHED_NAMES``) becomes modelopt_c's in every ``modelopt.*`` module, loaded now
    or later; nothing is imported here (a later import is patched as it happens).  Its
    version must be one of ``KNOWN_NVIDIA_VERSIONS``: another raises RuntimeError, or only
    warns with ``force=True``.  Without nvidia-modelopt: ``import modelopt.torch.opt``
    resolves to ``modelopt_c.torch.opt``.  Calling it again changes nothing.

    Names bound before the switch *outside* ``modelopt.*`` (``from modelopt.torch.opt
    import save`` in your own module) keep nvidia's objects: switch first, or use
    ``python -m modelopt_c run``.
    """
    nvidia = interop.installed_version() is not None
    if nvidia:
        _check_version(force)  # before anything is registered: a refusal leaves the switch off
    _hook.add("fallback")  # acts only while no real `modelopt` can be found
    if not nvidia:
        return
    _hook.add("conversion")
    conversion = sys.modules.get(CONVERSION)
    if conversion is not None:
        patch_conversion(conversion)


def uninstall() -> None:
    """Turn the switch off: nvidia-modelopt's own objects everywhere again; the
    ``modelopt`` stand-in (when nvidia-modelopt is absent) is dropped from sys.modules.
    Objects made while it was on (managers, models) keep working with modelopt_c.
    Calling it again changes nothing."""
    _hook.remove("conversion")
    _hook.remove("fallback")
    ours = _ours()
    if _latest:
        _rebind({id(ours[name]): (ours[name], original) for name, original in _latest.items()})
    top = sys.modules.get("modelopt")
    if top is not None and getattr(top, "__modelopt_c__", False):
        for name in [n for n in sys.modules if n == "modelopt" or n.startswith("modelopt.")]:
            del sys.modules[name]


# ---- python -m modelopt_c run --------------------------------------------------------------

RUN_USAGE = (
    "usage: python -m modelopt_c run [--force] (script.py | -m module | -c code) [args ...]\n"
    "Runs an unchanged script with nvidia-modelopt's conversion layer on modelopt_c (or, without\n"
    "nvidia-modelopt, `import modelopt.torch.opt` as modelopt_c); Python processes it starts stay\n"
    "switched (MODELOPT_C=1 and a start-up hook on PYTHONPATH).  --force: switch even an\n"
    "nvidia-modelopt version the switch does not know (with a warning)."
)


def _switch_children(force: bool) -> None:
    """Environment that switches Python child processes (read by _startup/sitecustomize.py)."""
    os.environ["MODELOPT_C"] = "1"
    if force:
        os.environ["MODELOPT_C_FORCE"] = "1"
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != STARTUP_DIR]
    os.environ["PYTHONPATH"] = os.pathsep.join([STARTUP_DIR, *parts])


def run(argv: Sequence[str]) -> int:
    """``python -m modelopt_c run ...``: the exit status (a script's SystemExit passes through)."""
    args = list(argv)
    force = False
    while args and args[0] in ("--force", "-h", "--help"):
        if args[0] != "--force":
            print(RUN_USAGE)
            return 0
        force = True
        args.pop(0)
    if not args or (args[0] in ("-m", "-c") and len(args) < 2):
        print(RUN_USAGE, file=sys.stderr)
        return 2
    try:
        install(force=force)
    except RuntimeError as exc:
        print(f"modelopt_c run: {exc}", file=sys.stderr)
        return 2
    _switch_children(force)
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    elif args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        exec(compile(args[1], "<string>", "exec"), namespace)  # noqa: S102 - the user's own code
    else:
        script = args[0]
        if not os.path.exists(script):
            print(f"modelopt_c run: {script}: no such file", file=sys.stderr)
            return 2
        sys.argv = [script, *args[1:]]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")
    return 0
