"""``import modelopt_c.torch.opt as mto``: the same API as ``import modelopt_c as mto``."""

from modelopt_c import *  # noqa: F401,F403
from modelopt_c import __all__, __version__  # noqa: F401
