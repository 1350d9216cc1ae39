"""Shared fixtures of the safetensors-format and CLI tests: this tree's package first
on the path, a sample modelopt state holding tensors, and a small model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))  # this tree's package, not an installed one

from modelopt_c import _conversion  # noqa: E402,F401  (re-exported to the tests)


def sample_state() -> dict[str, Any]:
    return {
        "modelopt_state_dict": [
            ("quantize", {"config": {"num_bits": 8, "axis": None, "names": ["a", "b"]},
                          "metadata": {"amax": torch.tensor([1.5, 2.0]), "shape": (3, 4)}}),
            ("sparsity", {"config": {"ratio": 0.5}, "metadata": {"masks": {"w": torch.ones(2, 2, dtype=torch.bool)}}}),
        ],
        "modelopt_version": "0.1.0",
    }


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.emb = torch.nn.Embedding(5, 2).to(torch.bfloat16)
        self.register_buffer("steps", torch.tensor(7, dtype=torch.int64))
