"""The bridge to an installed nvidia-modelopt: its registries, ModelLikeModule and version.

modelopt_c never imports nvidia-modelopt at import time (that takes seconds).  Its
registries are searched once the user has imported them; when a state names a mode
that no loaded registry knows and nvidia-modelopt is installed, the packages that
register modes are imported then, on that miss only.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from functools import lru_cache
from typing import Any

__all__ = ["NVIDIA_MODES", "find_modes", "has_mode", "installed_version", "mode_names", "model_like_class_for", "registry_by_name"]

# nvidia-modelopt 0.47.0's modes, each with the package whose import registers it: a state
# naming one imports that package only; a name not here imports nothing (a typo costs no
# seconds of imports).  For other nvidia-modelopt versions every package below is tried.
NVIDIA_MODES = {
    **dict.fromkeys(
        (
            "quantize", "real_quantize", "quantize_export", "auto_quantize", "_no_calibrate", "max_calibrate",
            "mse_calibrate", "local_hessian_calibrate", "lsq_calibrate", "smoothquant_calibrate",
            "awq_lite_calibrate", "awq_clip_calibrate", "awq_full_calibrate", "gptq_calibrate",
            "svdquant_calibrate", "nvfp4_act_headroom_calibrate",
        ),
        "modelopt.torch.quantization",
    ),
    **dict.fromkeys(("sparse_magnitude", "sparsegpt", "export_sparse", "sparse_attention"), "modelopt.torch.sparsity"),
    **dict.fromkeys(("autonas", "export_nas"), "modelopt.torch.nas"),
    "fastnas": "modelopt.torch.prune",
    "mcore_minitron": "modelopt.torch.prune.plugins.mcore_minitron",
    "puzzletron": "modelopt.torch.puzzletron.puzzletron_nas_plugin",
    **dict.fromkeys(("kd_loss", "layerwise_kd", "export_student"), "modelopt.torch.distill"),
    **dict.fromkeys(("medusa", "eagle", "dflash"), "modelopt.torch.speculative"),
    **dict.fromkeys(("peft", "export_peft"), "modelopt.torch.peft"),
}
_NVIDIA_MODES_VERSION = "0.47.0"

# Packages of nvidia-modelopt whose import registers modes, tried on a miss.
_MODE_PACKAGES = (
    "modelopt.torch.quantization",
    "modelopt.torch.sparsity",
    "modelopt.torch.prune",
    "modelopt.torch.nas",
    "modelopt.torch.distill",
    "modelopt.torch.speculative",
    "modelopt.torch.peft",
)


def _nvidia_module(name: str) -> Any | None:
    """nvidia-modelopt's loaded module ``name``; None when not loaded, or when the name is
    modelopt_c's stand-in (``dropin``: ``modelopt.torch.opt`` without nvidia-modelopt)."""
    mod = sys.modules.get(name)
    return mod if mod is not None and getattr(mod, "__name__", None) == name else None


def _registries() -> list[Any]:
    mod = _nvidia_module("modelopt.torch.opt.mode")
    return list(mod._ModeRegistryCls._all_registries) if mod is not None else []


@lru_cache(maxsize=1)
def installed_version() -> str | None:
    """The installed nvidia-modelopt's version, read from its metadata (no import)."""
    try:
        return importlib.metadata.version("nvidia-modelopt")
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_mode_packages(mode: str) -> bool:
    """Import the nvidia-modelopt package that registers ``mode`` (every mode package for a
    version other than the one NVIDIA_MODES lists); whether any new one loaded."""
    version = installed_version()
    if version is None:
        return False
    if version == _NVIDIA_MODES_VERSION:
        if mode not in NVIDIA_MODES:
            return False
        packages: tuple[str, ...] = (NVIDIA_MODES[mode],)
    else:
        packages = _MODE_PACKAGES
    loaded = False
    for name in packages:
        if name in sys.modules or importlib.util.find_spec(name.rsplit(".", 1)[0]) is None:
            continue
        try:
            importlib.import_module(name)
            loaded = True
        except Exception:  # a broken optional plugin must not hide the real KeyError
            continue
    return loaded


def _lookup(name: str) -> list[Any]:
    return [r._name2descriptor[name] for r in _registries() if name in r._name2descriptor]


def find_modes(name: str) -> list[Any]:
    """Descriptors registered as ``name`` in nvidia-modelopt (importing its modes on a miss)."""
    found = _lookup(name)
    if not found and _import_mode_packages(name):
        found = _lookup(name)
    return found


def has_mode(name: str) -> bool:
    """Whether a loaded nvidia-modelopt registry has ``name`` (never imports)."""
    return bool(_lookup(name))


def mode_names() -> list[str]:
    """Names of the modes in loaded nvidia-modelopt registries."""
    return sorted({n for r in _registries() for n in r._name2descriptor})


def registry_by_name(registry_name: str) -> Any | None:
    """The loaded nvidia-modelopt registry called ``registry_name``, if any."""
    for registry in _registries():
        if registry._registry_name == registry_name:
            return registry
    return None


def model_like_class_for(descriptor: Any) -> type | None:
    """nvidia-modelopt's ModelLikeModule when ``descriptor`` is one of its modes.

    Such a mode checks ``isinstance(model, <its ModelLikeModule>)``, so the holder
    handed to it must be of that class.
    """
    if not type(descriptor).__module__.startswith("modelopt."):
        return None
    conversion = _nvidia_module("modelopt.torch.opt.conversion")
    return getattr(conversion, "ModelLikeModule", None)
