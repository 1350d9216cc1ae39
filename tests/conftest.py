import sys

import pytest
import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))

import modelopt_c as mto  # noqa: E402
from modes import TinyNet, facade, register  # noqa: E402

_REGISTERED = register(facade("modelopt_c"))


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


def modelopt_available() -> bool:
    try:
        import modelopt.torch.opt  # noqa: F401
    except Exception:
        return False
    return True


__all__ = ["mto", "TinyNet"]
