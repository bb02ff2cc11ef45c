"""LoRA adapters on the stock transformer: add, save in the pipelines' own format, load back for resume."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.training_utils import _collate_lora_metadata, cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from common.attention import base_model

LORA_FILE = "pytorch_lora_weights.safetensors"
COMFYUI_FILE = "pytorch_lora_weights_comfyui.safetensors"


def add_lora(
    transformer: nn.Module, rank: int, alpha: float, target_modules: list[str], exclude_modules: list[str] = ()
) -> list[nn.Parameter]:
    """Freeze the base weights, add a LoRA adapter, keep its weights in float32; returns the trainable parameters.

    `exclude_modules`: full names of matching modules to leave alone, e.g. ones whose output never reaches the
    loss (their LoRA would get no gradient, which DDP rejects). Exclusions are resolved here into full module
    names, so the adapter config saved with the weights names exactly the adapted modules and loads cleanly.
    """
    transformer.requires_grad_(False)
    if exclude_modules:
        target_modules = [
            name
            for name, _ in transformer.named_modules()
            if name not in exclude_modules and any(name == t or name.endswith(f".{t}") for t in target_modules)
        ]
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)
    transformer.add_adapter(config)
    cast_training_params(transformer, dtype=torch.float32)
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"--lora_target_modules {target_modules} matched no module of the transformer")
    return params


def save_lora(pipeline_class: type[DiffusionPipeline], transformer: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `pytorch_lora_weights.safetensors` with the pipeline's `save_lora_weights` (diffusers keys, adapter
    config in the metadata), through a temporary folder and a rename so a crash never leaves half a file."""
    model = base_model(transformer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = _collate_lora_metadata({"transformer": model})
    with tempfile.TemporaryDirectory(dir=directory, prefix=".lora-") as tmp:
        pipeline_class.save_lora_weights(tmp, transformer_lora_layers=get_peft_model_state_dict(model), **metadata)
        os.replace(Path(tmp) / LORA_FILE, directory / LORA_FILE)
    return directory / LORA_FILE


def load_lora(pipeline_class: type[DiffusionPipeline], transformer: nn.Module, directory: str | os.PathLike) -> None:
    """Load weights written by `save_lora` into the adapter of `transformer` (exact copy, for resume)."""
    state = pipeline_class.lora_state_dict(str(directory))
    state = state[0] if isinstance(state, tuple) else state
    prefix = "transformer."
    state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    incompatible = set_peft_model_state_dict(base_model(transformer), state, adapter_name="default")
    unexpected = getattr(incompatible, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA weights in {directory} do not fit this adapter: unexpected keys {unexpected[:5]}")
