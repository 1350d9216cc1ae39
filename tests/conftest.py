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


# The `slow` marker: real user scripts in fresh interpreters that import all of
# nvidia-modelopt (tests/test_dropin_scripts.py; about a minute): skipped by default, run by
# CI (`-m slow`, or `--run-slow`).


def pytest_addoption(parser):
    parser.addoption("--run-isolated", action="store_true", default=False,
                     help="also run the leak loops of tests/isolated/ (each in its own interpreter)")
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the slow tests (real scripts in fresh interpreters, marker `slow`)")


def pytest_configure(config):
    config.addinivalue_line("markers", "isolated: a leak loop in a fresh interpreter (skipped unless "
                            "selected with -m isolated or --run-isolated)")
    config.addinivalue_line("markers", "slow: real scripts in fresh interpreters (skipped unless "
                            "selected with -m slow or --run-slow)")


def pytest_collection_modifyitems(config, items):
    markexpr = config.getoption("markexpr") or ""
    for marker, option, how in (("isolated", "--run-isolated", "leak loop"), ("slow", "--run-slow", "slow")):
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
