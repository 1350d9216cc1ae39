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


def pytest_configure(config):
    config.addinivalue_line("markers", "isolated: a leak loop in a fresh interpreter (skipped unless "
                            "selected with -m isolated or --run-isolated)")
    config.addinivalue_line("markers", "slow: a check of 20 s or more (mypy, the executed notebook), skipped "
                            "unless selected with -m slow (or --run-isolated, which runs everything)")


def pytest_collection_modifyitems(config, items):
    _skip_unless_selected(config, items, "slow", "slow check (mypy, the executed notebook, the SIGKILL resume): run with -m slow (CI does)")
    if config.getoption("--run-isolated") or "isolated" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="leak loop: run with -m isolated or --run-isolated (CI does)")
    for item in items:
        if "isolated" in item.keywords:
            item.add_marker(skip)


def _skip_unless_selected(config, items, marker, reason):
    if config.getoption("--run-isolated") or marker in (config.getoption("markexpr") or ""):
        return
    for item in items:
        if marker in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


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
