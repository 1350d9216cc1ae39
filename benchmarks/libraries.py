"""The contestants: the libraries, how each saves and restores, and the trivial mode.

Three *families* each run in their own process (see ``zygote.py``), so no
library is ever imported next to another one it is compared with:

* ``modelopt_c``       -- ``import modelopt_c`` (this repository's build)
* ``nvidia-modelopt``  -- ``import modelopt.torch.opt``
* ``baseline``         -- torch and safetensors alone, and the machine limits

Both modelopt families register the same trivial mode, ``bench_trivial``
(convert and restore return the model unchanged, metadata ``{"tag": ...}``), so a
checkpoint carries a real modelopt state and a restore replays it.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hf_stub

REPO_ROOT = Path(__file__).resolve().parent.parent
TRIVIAL_MODE = "bench_trivial"
FAMILIES = ("modelopt_c", "nvidia-modelopt", "baseline")
REFERENCE = "nvidia-modelopt"  # ratios are taken against this family's methods


@dataclass
class Library:
    """A family loaded in the current process: its API object and what to report."""

    family: str
    api: Any  # the mto-like module for the modelopt families, ``torch`` for the baseline
    version: str
    notes: list[str]


_REGISTRIES: list[Any] = []  # modelopt_c holds registries weakly: keep ours alive


def _register_trivial_mode(mode_module: Any, config_base: type) -> None:
    """Register ``bench_trivial`` in a fresh registry of the given library."""

    class BenchTrivialConfig(config_base):
        tag: str = "bench"

    class BenchTrivialMode(mode_module.ModeDescriptor):
        @property
        def name(self) -> str:
            return TRIVIAL_MODE

        @property
        def config_class(self) -> type:
            return BenchTrivialConfig

        @property
        def convert(self) -> Callable:
            return lambda model, config, **kwargs: (model, {"tag": config.tag})

        @property
        def restore(self) -> Callable:
            return lambda model, config, metadata: model

    registry = mode_module._ModeRegistryCls("benchmarks")
    registry.register_mode(BenchTrivialMode)
    _REGISTRIES.append(registry)


def _load_modelopt_c() -> Library:
    sys.path.insert(0, str(REPO_ROOT))
    import modelopt_c

    _register_trivial_mode(modelopt_c, modelopt_c.ModeloptBaseConfig)
    where = Path(modelopt_c.__file__).resolve().parent.parent
    return Library("modelopt_c", modelopt_c, modelopt_c.__version__, [f"modelopt_c imported from {where}"])


def _load_nvidia() -> Library:
    notes = []
    if hf_stub.install_if_missing():
        notes.append("huggingface_hub is not installed; a stand-in was used so modelopt.torch.opt imports")
    import modelopt.torch.opt as mto
    from modelopt.torch.opt import mode
    from modelopt.torch.opt.config import ModeloptBaseConfig

    _register_trivial_mode(mode, ModeloptBaseConfig)
    return Library("nvidia-modelopt", mto, importlib.metadata.version("nvidia-modelopt"), notes)


def _load_baseline() -> Library:
    import safetensors.torch  # noqa: F401  (imported here so children do not pay for it)
    import torch

    version = f"torch {torch.__version__}, safetensors {importlib.metadata.version('safetensors')}"
    return Library("baseline", torch, version, [])


def load_family(family: str) -> Library:
    """Import one family and register the trivial mode where it applies."""
    return {"modelopt_c": _load_modelopt_c, "nvidia-modelopt": _load_nvidia, "baseline": _load_baseline}[family]()


# -- checkpoint methods ----------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointMethod:
    """One way to save or restore a model.

    ``file`` names the checkpoint file the method writes (a save) or reads (a
    restore); ``converted`` says whether the model carries the trivial mode.
    """

    name: str
    family: str
    file: str
    converted: bool
    save: Callable[[Any, Any, str], None] | None
    restore: Callable[[Any, Any, str], Any]


def _torch_save(torch: Any, model: Any, path: str) -> None:
    torch.save(model.state_dict(), path)


def _torch_restore(torch: Any, model: Any, path: str) -> Any:
    model.load_state_dict(torch.load(path, weights_only=True))
    return model


def _torch_mmap_restore(torch: Any, model: Any, path: str) -> Any:
    model.load_state_dict(torch.load(path, weights_only=True, mmap=True))
    return model


def _safetensors_save(torch: Any, model: Any, path: str) -> None:
    import safetensors.torch

    safetensors.torch.save_file(model.state_dict(), path)


def _safetensors_restore(torch: Any, model: Any, path: str) -> Any:
    import safetensors.torch

    model.load_state_dict(safetensors.torch.load_file(path))
    return model


METHODS = (
    CheckpointMethod(
        "modelopt_c torch format", "modelopt_c", "modelopt_c.pt", True,
        lambda mto, model, path: mto.save(model, path),
        lambda mto, model, path: mto.restore(model, path),
    ),
    CheckpointMethod(
        "modelopt_c safetensors format", "modelopt_c", "modelopt_c.safetensors", True,
        lambda mto, model, path: mto.save(model, path, format="safetensors"),
        lambda mto, model, path: mto.restore(model, path),
    ),
    # what checking the per-tensor checksums (on by default) costs a restore
    CheckpointMethod(
        "modelopt_c safetensors format, verify=False", "modelopt_c", "modelopt_c.safetensors", True, None,
        lambda mto, model, path: mto.restore(model, path, verify=False),
    ),
    CheckpointMethod(
        "nvidia-modelopt mto.save/restore", "nvidia-modelopt", "nvidia.pt", True,
        lambda mto, model, path: mto.save(model, path),
        lambda mto, model, path: mto.restore(model, path),
    ),
    CheckpointMethod("torch.save / torch.load", "baseline", "torch.pt", False, _torch_save, _torch_restore),
    CheckpointMethod("torch.load(mmap=True)", "baseline", "torch.pt", False, None, _torch_mmap_restore),
    CheckpointMethod("safetensors save_file / load_file", "baseline", "st.safetensors", False,
                     _safetensors_save, _safetensors_restore),
)
METHODS_BY_NAME = {m.name: m for m in METHODS}
SAVE_METHODS = tuple(m for m in METHODS if m.save is not None)
REFERENCE_METHOD = "nvidia-modelopt mto.save/restore"
