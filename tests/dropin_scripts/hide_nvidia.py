"""Run ``python -m modelopt_c ...`` as if nvidia-modelopt were not installed.

python hide_nvidia.py run script.py args...: the path finder no longer sees the
``modelopt`` package, nor importlib.metadata its distribution, in this process only
(children see it again: they are started without this wrapper).
"""

import importlib.machinery
import sys


class _Hidden:
    """sys.meta_path's PathFinder, blind to nvidia-modelopt."""

    def find_spec(self, name, path=None, target=None):
        if name == "modelopt" or name.startswith("modelopt."):
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        for dist in importlib.machinery.PathFinder.find_distributions(*args, **kwargs):
            if (dist.metadata["Name"] or "").lower() != "nvidia-modelopt":
                yield dist

    def invalidate_caches(self):
        importlib.machinery.PathFinder.invalidate_caches()


sys.meta_path[:] = [_Hidden() if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
sys.argv[0] = "modelopt_c"
from modelopt_c.cli import main  # noqa: E402

raise SystemExit(main(sys.argv[1:]))
