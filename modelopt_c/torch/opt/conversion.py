"""``modelopt.torch.opt.conversion`` of modelopt_c: the reference's names, modelopt_c's objects.

    from modelopt_c.torch.opt.conversion import ModeloptStateManager, apply_mode, restore
"""

from typing import Any

from modelopt_c import (  # noqa: F401
    ApplyModeError,
    ModelLikeModule,
    ModeloptStateManager,
    apply_mode,
    get_mode,
    load_modelopt_state,
    modelopt_state,
    restore,
    restore_from_modelopt_state,
    save,
)

ModeloptStateList = list[tuple[str, dict[str, Any]]]  # the state of several modes

__all__ = [  # as the reference's
    "ModeloptStateManager",
    "apply_mode",
    "load_modelopt_state",
    "modelopt_state",
    "restore",
    "restore_from_modelopt_state",
    "save",
]
