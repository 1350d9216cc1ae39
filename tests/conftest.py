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
    parser.addoption("--run-distributed", action="store_true", default=False,
                     help="also run the spawned gloo process groups of tests/test_distributed.py")
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the slow tests (real scripts in fresh interpreters, marker `slow`)")


def pytest_configure(config):
    config.addinivalue_line("markers", "isolated: a leak loop in a fresh interpreter (skipped unless "
                            "selected with -m isolated or --run-isolated)")
    config.addinivalue_line("markers", "distributed: spawns 2-4 gloo ranks on CPU (skipped unless "
                            "selected with -m distributed or --run-distributed)")
    config.addinivalue_line("markers", "slow: a check of 20 s or more (mypy, the executed notebook, real "
                            "scripts), skipped unless selected with -m slow (or --run-isolated)")


def pytest_collection_modifyitems(config, items):
    # markers skipped by default (CI runs each as a step of its own): leak loops, spawned
    # process groups (tests/test_distributed.py), slow checks
    markexpr = config.getoption("markexpr") or ""
    for marker, selected, how in (
        ("isolated", config.getoption("--run-isolated"), "leak loop: run with -m isolated or --run-isolated"),
        ("distributed", config.getoption("--run-distributed"),
         "spawned process group: run with -m distributed or --run-distributed"),
        ("slow", config.getoption("--run-slow") or config.getoption("--run-isolated"), "slow check (mypy, the executed notebook, the SIGKILL "
         "resume, real scripts): run with -m slow or --run-slow"),
    ):
        if selected or marker in markexpr:
            continue
        skip = pytest.mark.skip(reason=f"{how} (CI does)")
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
