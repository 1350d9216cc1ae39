"""``modelopt.torch.opt.config`` of modelopt_c: the reference's names, modelopt_c's objects.

    from modelopt_c.torch.opt.config import ModeloptBaseConfig, ModeloptField
"""

from modelopt_c.config import ConfigDict, ModeloptBaseConfig, ModeloptField  # noqa: F401

__all__ = ["ModeloptBaseConfig", "ModeloptField"]
