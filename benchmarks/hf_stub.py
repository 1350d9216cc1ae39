"""Let nvidia-modelopt import on a machine without ``huggingface_hub``.

nvidia-modelopt 0.47.0 imports ``huggingface_hub`` unconditionally from
``modelopt.torch.opt.plugins.huggingface`` but does not declare it as a
dependency.  When it is missing, we put a two-name stand-in into ``sys.modules``
so ``import modelopt.torch.opt`` works; nothing on the measured paths calls it.
The run records whether the stand-in was used (see ``results.json`` notes).
"""

from __future__ import annotations

import importlib.util
import sys
import types


def install_if_missing() -> bool:
    """Install the stand-in when ``huggingface_hub`` is not importable; whether it was."""
    if "huggingface_hub" in sys.modules or importlib.util.find_spec("huggingface_hub") is not None:
        return False
    hub = types.ModuleType("huggingface_hub")
    errors = types.ModuleType("huggingface_hub.errors")
    errors.HFValidationError = type("HFValidationError", (ValueError,), {})
    hub.errors = errors

    def try_to_load_from_cache(*args: object, **kwargs: object) -> None:
        return None

    hub.try_to_load_from_cache = try_to_load_from_cache
    sys.modules["huggingface_hub"] = hub
    sys.modules["huggingface_hub.errors"] = errors
    return True
