"""Load modelopt_c._conversion from a source tree, even while the package's
__init__ cannot import yet (it re-exports names other parts of the tree add)."""

from __future__ import annotations

import glob
import importlib.util
import os
import sys


def load_native(root: str):
    import torch  # noqa: F401  (the extension links against libtorch)

    sys.path.insert(0, root)
    try:
        from modelopt_c import _conversion

        return _conversion
    except ImportError:
        if "modelopt_c._conversion" in sys.modules:
            return sys.modules["modelopt_c._conversion"]
    (path,) = glob.glob(os.path.join(root, "modelopt_c", "_conversion*.so"))
    spec = importlib.util.spec_from_file_location("modelopt_c._conversion", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["modelopt_c._conversion"] = module
    return module
