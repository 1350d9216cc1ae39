"""Test modes, defined once and registered in either library.

`register(lib)` builds the descriptors against a library facade (ours, or
nvidia-modelopt's) so the same scenario runs on both in differential tests.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn


def facade(name: str) -> types.SimpleNamespace:
    """The API pieces a mode author uses, from modelopt_c or from nvidia-modelopt."""
    if name == "modelopt_c":
        import modelopt_c as lib

        return types.SimpleNamespace(
            name=name,
            mto=lib,
            Registry=lib._ModeRegistryCls,
            ModeDescriptor=lib.ModeDescriptor,
            Config=lib.ModeloptBaseConfig,
            Field=lib.ModeloptField,
            ModelLikeModule=lib.ModelLikeModule,
        )
    import modelopt.torch.opt as mto
    from modelopt.torch.opt.config import ModeloptBaseConfig, ModeloptField
    from modelopt.torch.opt.conversion import ModelLikeModule
    from modelopt.torch.opt.mode import ModeDescriptor, _ModeRegistryCls

    return types.SimpleNamespace(
        name=name,
        mto=mto,
        Registry=_ModeRegistryCls,
        ModeDescriptor=ModeDescriptor,
        Config=ModeloptBaseConfig,
        Field=ModeloptField,
        ModelLikeModule=ModelLikeModule,
    )


class TinyNet(nn.Module):
    """A small net with a ReLU to replace and Linears to sparsify."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, 3)
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _replace_acts(model: nn.Module, names: list[str]) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.Tanh())


def _add_masks(model: nn.Module, ratio: float, magnitude: bool) -> list[str]:
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if magnitude:
                k = int(m.weight.numel() * ratio)
                mask = torch.ones_like(m.weight)
                if k:
                    idx = m.weight.detach().abs().flatten().argsort()[:k]
                    mask.view(-1)[idx] = 0
            else:
                mask = torch.zeros_like(m.weight)
            m.register_buffer("weight_mask", mask)
            layers.append(name)
    return layers


def register(lib: types.SimpleNamespace, registry_name: str = "t_modes") -> types.SimpleNamespace:
    """Register the test modes in a new registry of `lib`; returns the registry and configs."""
    R = lib.Registry(registry_name)

    class ReplaceConfig(lib.Config):
        act: str = lib.Field("tanh", description="what replaces ReLU")

    class SparseConfig(lib.Config):
        ratio: float = lib.Field(0.5, ge=0.0, le=1.0, alias="sparsity")

    class EmptyConfig(lib.Config):
        pass

    class UpdateConfig(lib.Config):
        saves: int = lib.Field(0)

    def replace_convert(model, config, **kwargs):
        names = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
        _replace_acts(model, names)
        return model, {"replaced": names, "kwargs_seen": sorted(kwargs)}

    def replace_restore(model, config, metadata):
        _replace_acts(model, metadata["replaced"])
        return model

    def sparse_convert(model, config, **kwargs):
        return model, {"layers": _add_masks(model, config.ratio, True), "shape": torch.Size([2, 3])}

    def sparse_restore(model, config, metadata):
        _add_masks(model, config.ratio, False)
        return model

    def export_convert(model, config, **kwargs):
        for m in model.modules():
            if isinstance(m, nn.Linear) and hasattr(m, "weight_mask"):
                with torch.no_grad():
                    m.weight.mul_(m.weight_mask)
                del m.weight_mask
        return model, {"exported": True}

    def export_restore(model, config, metadata):
        for m in model.modules():
            if isinstance(m, nn.Linear) and hasattr(m, "weight_mask"):
                del m.weight_mask
        return model

    def identity_convert(model, config, **kwargs):
        return model, {}

    def identity_restore(model, config, metadata):
        return model

    def bad_convert(model, config, **kwargs):
        return model  # not (model, metadata)

    def update_for_save(model, config, metadata):
        config.saves += 1
        metadata["saved"] = metadata.get("saved", 0) + 1

    def update_for_new_mode(model, config, metadata):
        metadata["followed"] = True

    def holder_convert(model, config, **kwargs):
        assert isinstance(model, lib.ModelLikeModule), type(model)
        return model, {"holder": type(model).__name__}

    def make(name_, config_cls, convert_, restore_, **extra):
        attrs = {
            "name": property(lambda self: name_),
            "config_class": property(lambda self: config_cls),
            "convert": property(lambda self: convert_),
            "restore": property(lambda self: restore_),
        }
        for key, value in extra.items():
            attrs[key] = property(lambda self, v=value: v)
        cls = type(f"Mode_{name_}", (lib.ModeDescriptor,), attrs)
        R.register_mode(cls)
        return cls

    make("t_replace", ReplaceConfig, replace_convert, replace_restore)
    make("t_sparse", SparseConfig, sparse_convert, sparse_restore, export_mode="t_sparse_export",
         next_prohibited_modes={"t_replace"})
    make("t_sparse_export", EmptyConfig, export_convert, export_restore, is_export_mode=True)
    make("t_only_replace_next", EmptyConfig, identity_convert, identity_restore, next_modes={"t_replace"})
    make("t_unsaved", EmptyConfig, identity_convert, identity_restore, save_mode_in_state=False)
    make("t_update", UpdateConfig, identity_convert, identity_restore, update_for_save=update_for_save,
         update_for_new_mode=update_for_new_mode)
    make("t_bad_convert", EmptyConfig, bad_convert, identity_restore)
    make("t_holder", EmptyConfig, holder_convert, identity_restore, require_model_like=True)
    return types.SimpleNamespace(registry=R, SparseConfig=SparseConfig, ReplaceConfig=ReplaceConfig,
                                 UpdateConfig=UpdateConfig)
