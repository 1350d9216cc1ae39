"""ModelLike: a module, or a recipe to build one, held until a mode needs the model."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

__all__ = ["ModelLikeModule", "init_model_from_model_like"]


def _recipe(model_like: Any) -> tuple[Any, tuple, dict]:
    """Split a model-like recipe into ``(constructor, args, kwargs)``."""
    if isinstance(model_like, tuple) and 1 <= len(model_like) <= 3 and callable(model_like[0]):
        ctor = model_like[0]
        args = tuple(model_like[1]) if len(model_like) > 1 else ()
        kwargs = dict(model_like[2]) if len(model_like) > 2 else {}
        return ctor, args, kwargs
    if callable(model_like) and not isinstance(model_like, tuple):
        return model_like, (), {}
    raise ValueError(
        f"Expected type or tuple or callable but got {model_like!r}: a model must be an "
        "nn.Module, a model class or callable, or a tuple (cls,), (cls, args) or "
        f"(cls, args, kwargs); got a {type(model_like).__name__}."
    )


def init_model_from_model_like(model_like: Any) -> nn.Module:
    """Build the model: an ``nn.Module`` as is, else ``cls(*args, **kwargs)``."""
    if isinstance(model_like, nn.Module):
        return model_like
    ctor, args, kwargs = _recipe(model_like)
    model = ctor(*args, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"The model-like recipe {ctor!r} built a {type(model).__name__}, not an nn.Module.")
    return model


class ModelLikeModule(nn.Module):
    """Holds the recipe of a model (and its modelopt state) until a mode needs the model.

    Modes with ``require_model_like`` receive this holder; every other mode gets the
    built model, to which the state moves.  No public function returns a holder.
    """

    def __init__(self, modellike: Any) -> None:
        super().__init__()
        assert not isinstance(modellike, nn.Module), "modellike should not be a nn.Module!"
        _recipe(modellike)  # fail now, before any state is attached
        self.modellike = modellike

    def init_modellike(self) -> nn.Module:
        """Build the model and move this holder's modelopt state onto it."""
        from . import ModeloptStateManager

        model = init_model_from_model_like(self.modellike)
        if ModeloptStateManager.is_converted(self):
            ModeloptStateManager.transfer_state_dict(self, model)
        return model
