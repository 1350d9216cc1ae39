"""The models the benchmarks run on.

* ``LinearStack``: a stack of square ``nn.Linear`` layers sized to a byte target,
  for checkpoints.  Each layer holds one known value (weights ``v``, bias ``-v``),
  so a restore can be checked cheaply and exactly (also in bfloat16).
  For the tensor-count axis the same layers (tiny ones) are nested in a tree of
  ``nn.Sequential`` with at most ``fanout`` children each, like a transformer's
  ``model.layers.N.attn.q_proj``: torch's ``load_state_dict`` walks every child of a
  module over all of that module's keys, so a flat stack of 50,000 layers would
  measure that square, not a checkpoint format.
* ``wide_model``: a model with a given number of small modules, for bookkeeping.
"""

from __future__ import annotations

import torch
import torch.nn as nn

HIDDEN = 2048  # 2048 x 2048 fp32 weights + bias: ~16.8 MB per layer


class LinearStack(nn.Sequential):
    """``n_layers`` square linear layers of width ``hidden``."""

    def __init__(self, n_layers: int, hidden: int = HIDDEN, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(*[nn.Linear(hidden, hidden, dtype=dtype) for _ in range(n_layers)])


def stack_shape(target_bytes: float, hidden: int, dtype: torch.dtype) -> tuple[int, int]:
    """Layers of width ``hidden`` closest to ``target_bytes`` of weights (at least one), and their bytes."""
    per_layer = (hidden * hidden + hidden) * torch.empty((), dtype=dtype).element_size()
    layers = max(1, round(target_bytes / per_layer))
    return layers, layers * per_layer


def layer_value(index: int) -> float:
    """The value held by layer ``index``; exact in float32 and bfloat16 up to 255 layers."""
    return ((index % 255) + 1) / 256.0


def _nested(layers: list[nn.Module], fanout: int) -> nn.Sequential:
    """``layers`` in order, grouped into ``nn.Sequential`` levels of at most ``fanout`` children."""
    while len(layers) > fanout:
        layers = [nn.Sequential(*layers[i : i + fanout]) for i in range(0, len(layers), fanout)]
    return nn.Sequential(*layers)


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The model's ``nn.Linear`` layers in state-dict order: layer ``i`` holds ``layer_value(i)``."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def build_stack(
    n_layers: int, hidden: int, dtype: torch.dtype, filled: bool, fanout: int | None = None
) -> nn.Sequential:
    """A ``LinearStack`` whose memory is allocated and touched (no random init).

    ``filled`` gives every layer its known value; otherwise all weights are zero,
    the state of a freshly built model that a restore will overwrite.  ``fanout``
    nests the layers in a tree of ``nn.Sequential`` with at most that many children each.
    """
    with torch.device("meta"):
        model = LinearStack(n_layers, hidden, dtype)
        if fanout is not None and n_layers > fanout:
            model = _nested(list(model), fanout)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for i, layer in enumerate(linear_layers(model)):
            value = layer_value(i) if filled else 0.0
            layer.weight.fill_(value)
            layer.bias.fill_(-value)
    return model


def check_stack(model: nn.Module) -> None:
    """Raise ``AssertionError`` unless every layer holds its known value."""
    with torch.no_grad():
        for i, layer in enumerate(linear_layers(model)):
            value = layer_value(i)
            for tensor, expected in ((layer.weight, value), (layer.bias, -value)):
                low, high = tensor.aminmax()
                assert low.item() == high.item() == expected, f"layer {i}: restored values are wrong"


def wide_model(n_modules: int) -> nn.Module:
    """A model with exactly ``n_modules`` modules (root included; at least 2).

    Mostly blocks of ten (an ``nn.Sequential`` of nine ``nn.Linear(4, 4)``): a
    two-level tree like a transformer's layers, with small weights so building is
    quick; the remainder are single ``nn.Linear(4, 4)`` under the root.
    """
    blocks, extra = divmod(max(1, n_modules - 1), 10)
    children = [nn.Sequential(*[nn.Linear(4, 4) for _ in range(9)]) for _ in range(blocks)]
    children += [nn.Linear(4, 4) for _ in range(extra)]
    return nn.Sequential(*children)
