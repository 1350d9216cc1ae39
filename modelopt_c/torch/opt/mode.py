"""``modelopt.torch.opt.mode`` of modelopt_c: the reference's names, modelopt_c's objects.

Custom-mode code ports by replacing ``modelopt.`` with ``modelopt_c.``::

    from modelopt_c.torch.opt.mode import ModeDescriptor, _ModeRegistryCls
"""

from modelopt_c.mode import (  # noqa: F401
    ConfigDict,
    ConvertEntrypoint,
    ConvertReturnType,
    MetadataDict,
    ModeConfigList,
    ModeDescriptor,
    ModeKwargsType,
    ModeLike,
    ModeState,
    ModeType,
    RestoreEntrypoint,
    UpdateEntrypoint,
    _ModeDescriptor,
    _ModeRegistryCls,
    get_mode_config,
)

__all__ = ["ModeDescriptor"]  # as the reference's
