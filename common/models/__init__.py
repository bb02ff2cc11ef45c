"""The registry of edit models: `--model` names of precompute_cache.py (and of `common.tiny`) -> `EditModel`.

A new model is a module next to these that builds an `EditModel`, listed here (or, from a test or a plugin,
added with `register`).
"""

from __future__ import annotations

from common.models.base import EditModel
from common.models.flux2 import FLUX2_DEV, FLUX2_KLEIN
from common.models.flux3 import FLUX3_KLEIN
from common.models.flux_kontext import FLUX_KONTEXT
from common.models.qwen_edit import QWEN_EDIT, QWEN_EDIT_2511, QWEN_EDIT_PLUS
from common.models.qwen_image21 import QWEN_IMAGE21

MODELS: dict[str, EditModel] = {
    model.name: model
    for model in (
        FLUX_KONTEXT,
        QWEN_EDIT,
        QWEN_EDIT_PLUS,
        QWEN_EDIT_2511,
        FLUX2_KLEIN,
        FLUX2_DEV,
        QWEN_IMAGE21,
        FLUX3_KLEIN,
    )
}

__all__ = ["MODELS", "EditModel", "get_model", "register"]


def register(model: EditModel) -> EditModel:
    """Add `model` under its name (replacing one of that name); returns it."""
    MODELS[model.name] = model
    return model


def get_model(model: EditModel | str) -> EditModel:
    """The description of `model`, given as a description or a registered name; ValueError for an unknown name."""
    if isinstance(model, EditModel):
        return model
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {tuple(MODELS)}")
    return MODELS[model]
