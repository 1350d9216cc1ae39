import sys

import pytest
import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))

import modelopt_c as mto  # noqa: E402
from modes import TinyNet, facade, register  # noqa: E402

_REGISTERED = register(facade("modelopt_c"))


# ------------------------------------------------------------------ the `isolated` marker
# The leak loops (tests/isolated/, run by tests/test_isolated.py) take most of the suite's
# time: the default run skips them, CI runs them (`-m isolated`, or `--run-isolated` for
# everything in one run).


def pytest_addoption(parser):
    parser.addoption("--run-isolated", action="store_true", default=False,
                     help="also run the leak loops of tests/isolated/ (each in its own interpreter)")
    parser.addoption("--run-distributed", action="store_true", default=False,
                     help="also run the spawned gloo process groups of tests/test_distributed.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "isolated: a leak loop in a fresh interpreter (skipped unless "
                            "selected with -m isolated or --run-isolated)")
    config.addinivalue_line("markers", "distributed: spawns 2-4 gloo ranks on CPU (skipped unless "
                            "selected with -m distributed or --run-distributed)")


def pytest_collection_modifyitems(config, items):
    # the `distributed` marker: spawned process groups (tests/test_distributed.py), slow
    # on small machines; skipped by default like the leak loops, CI runs them
    markexpr = config.getoption("markexpr") or ""
    for marker, option, how in (("isolated", "--run-isolated", "leak loop"),
                                ("distributed", "--run-distributed", "spawned process group")):
        if config.getoption(option) or marker in markexpr:
            continue
        skip = pytest.mark.skip(reason=f"{how}: run with -m {marker} or {option} (CI does)")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def lib():
    return _REGISTERED


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(5, 4)


__all__ = ["mto", "TinyNet"]
