"""Two example modes, the template for writing your own (used by the demo).

* ``swap_activation`` replaces every ``nn.ReLU`` with another activation: a mode
  that changes the module tree.  Its metadata records which modules it replaced,
  so ``restore`` can replay exactly that on a fresh model.
* ``magnitude_prune`` masks the smallest weights of every ``nn.Linear`` (a
  sparsity-like mode).  The masks are buffers, so they travel in the state dict;
  ``restore`` only re-creates empty buffers for the weights to be loaded into.
  Its export mode, ``magnitude_prune_export``, folds the masks into the weights.

Import this module to register them (registry ``"examples"``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModeloptBaseConfig, ModeloptField
from .mode import ModeDescriptor, _ModeRegistryCls

__all__ = ["ExampleModeRegistry", "MagnitudePruneConfig", "SwapActivationConfig"]

ExampleModeRegistry = _ModeRegistryCls("examples")

_ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class SwapActivationConfig(ModeloptBaseConfig):
    """Config of ``swap_activation``."""

    to: str = ModeloptField("gelu", description="the activation that replaces ReLU: gelu, silu or tanh")


class MagnitudePruneConfig(ModeloptBaseConfig):
    """Config of ``magnitude_prune``."""

    sparsity: float = ModeloptField(0.5, ge=0.0, lt=1.0, description="fraction of weights to zero")


class ExportConfig(ModeloptBaseConfig):
    """The export mode takes no options."""


def _swap(model: nn.Module, names: list[str], to: str) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _ACTIVATIONS[to]())


def _swap_convert(model, config, **kwargs):
    names = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    _swap(model, names, config.to)
    return model, {"replaced": names}


def _swap_restore(model, config, metadata):
    _swap(model, metadata["replaced"], config.to)
    return model


def _masked_forward(module: nn.Linear, args):
    module.weight.data.mul_(module.weight_mask)  # keep pruned weights at zero


def _add_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        layer = model.get_submodule(name)
        layer.register_buffer("weight_mask", mask)
        layer.register_forward_pre_hook(_masked_forward)


def _prune_convert(model, config, **kwargs):
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            scores = m.weight.detach().abs().flatten()
            k = int(scores.numel() * config.sparsity)
            mask = torch.ones_like(m.weight)
            if k:
                mask.view(-1)[scores.argsort()[:k]] = 0
            masks[name] = mask
    _add_masks(model, masks)
    return model, {"layers": sorted(masks), "zeroed": {n: int((m == 0).sum()) for n, m in masks.items()}}


def _prune_restore(model, config, metadata):
    # empty masks of the right shape: the saved ones arrive with the weights
    _add_masks(model, {n: torch.ones_like(model.get_submodule(n).weight) for n in metadata["layers"]})
    return model


def _fold_masks(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Linear) and hasattr(m, "weight_mask"):
            with torch.no_grad():
                m.weight.mul_(m.weight_mask)
            del m.weight_mask
            m._forward_pre_hooks.clear()


def _export_convert(model, config, **kwargs):
    _fold_masks(model)
    return model, {}


def _export_restore(model, config, metadata):
    _fold_masks(model)
    return model


@ExampleModeRegistry.register_mode
class SwapActivationMode(ModeDescriptor):
    """Replace every ReLU with another activation."""

    name = "swap_activation"  # class attributes work as well as properties
    config_class = SwapActivationConfig

    @property
    def convert(self):
        return _swap_convert

    @property
    def restore(self):
        return _swap_restore


@ExampleModeRegistry.register_mode
class MagnitudePruneMode(ModeDescriptor):
    """Zero the smallest weights; must eventually be followed by its export mode."""

    name = "magnitude_prune"
    config_class = MagnitudePruneConfig
    export_mode = "magnitude_prune_export"
    next_prohibited_modes = {"swap_activation"}  # swapping after pruning is not supported

    @property
    def convert(self):
        return _prune_convert

    @property
    def restore(self):
        return _prune_restore


@ExampleModeRegistry.register_mode
class MagnitudePruneExportMode(ModeDescriptor):
    """Fold the masks into the weights and drop them."""

    name = "magnitude_prune_export"
    config_class = ExportConfig
    is_export_mode = True

    @property
    def convert(self):
        return _export_convert

    @property
    def restore(self):
        return _export_restore
