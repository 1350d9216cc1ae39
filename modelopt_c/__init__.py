"""modelopt_c: a native drop-in for ``modelopt.torch.opt``.

Use it where you used nvidia-modelopt's conversion API::

    import modelopt_c as mto          # or: import modelopt_c.torch.opt as mto

    model = mto.apply_mode(model, [("my_mode", {"ratio": 0.5})])
    mto.save(model, "ckpt.pt")                   # crash-safe; loadable by nvidia-modelopt
    model = mto.restore(MyModel(), "ckpt.pt")    # no pickle code, weights copied in place

The state layout, the files and the error types are those of nvidia-modelopt
(see the README); the bookkeeping and the bytes are C, the file handling is
``modelopt_c.checkpoint`` (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import torch as _torch  # noqa: F401  (the native module links against libtorch)

from ._conversion import ApplyModeError, ModeloptStateManager, StateDecodeError, apply_mode, get_mode, modelopt_state
from ._runtime import MODELOPT_STATE_VERSION
from .background import SaveHandle, async_save, wait_for_saves
from .checkpoint import CheckpointError, load_modelopt_state, restore, restore_from_modelopt_state, save
from .codec import dumps_state, loads_state
from .config import ModeloptBaseConfig, ModeloptField
from .dropin import install, is_installed, uninstall
from .hf import enable_huggingface_checkpointing
from .mode import ModeDescriptor, _ModeDescriptor, _ModeRegistryCls, get_mode_config
from .model_like import ModelLikeModule
from .periodic import load_extra
from .summary import Summary, describe

__version__ = "0.1.0"
del annotations  # the __future__ import's flag, not an API


def __dir__() -> list[str]:
    """The public API only (submodules such as ``codec`` stay importable by name)."""
    return sorted(__all__)


__all__ = [
    "MODELOPT_STATE_VERSION",
    "ApplyModeError",
    "CheckpointError",
    "ModeDescriptor",
    "ModelLikeModule",
    "ModeloptBaseConfig",
    "ModeloptField",
    "ModeloptStateManager",
    "SaveHandle",
    "StateDecodeError",
    "Summary",
    "_ModeDescriptor",
    "_ModeRegistryCls",
    "__version__",
    "apply_mode",
    "async_save",
    "describe",
    "dumps_state",
    "enable_huggingface_checkpointing",
    "get_mode",
    "get_mode_config",
    "install",
    "is_installed",
    "load_extra",
    "load_modelopt_state",
    "loads_state",
    "modelopt_state",
    "restore",
    "restore_from_modelopt_state",
    "save",
    "uninstall",
    "wait_for_saves",
]
