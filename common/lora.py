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

    `target_modules` are PEFT-style names or name suffixes; `exclude_modules`: full names of matching modules to
    leave alone, e.g. ones whose output never reaches the loss (their LoRA would get no gradient, which DDP
    rejects). Both are resolved here into full module names (`adapted_modules`), so the adapter config saved with
    the weights names exactly the adapted modules and loads cleanly.
    """
    transformer.requires_grad_(False)
    modules = adapted_modules(transformer, target_modules, exclude_modules)
    if not modules:
        raise ValueError(f"--lora_target_modules {list(target_modules)} matched no layer of the transformer")
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=modules)
    transformer.add_adapter(config)
    cast_training_params(transformer, dtype=torch.float32)
    return [p for p in transformer.parameters() if p.requires_grad]


def adapted_modules(transformer: nn.Module, target_modules: list[str], exclude_modules: list[str] = ()) -> list[str]:
    """Full names of the modules that `target_modules` name (as a name or a ".name" suffix, PEFT's rule), leaving out
    `exclude_modules` and module containers: a suffix may name a layer in one block and the list holding a layer in
    another (FLUX.2's `attn.to_out` is the single blocks' output linear and the double blocks' [linear, dropout]),
    and PEFT adapts layers only."""
    return [
        name
        for name, module in transformer.named_modules()
        if name not in exclude_modules
        and not isinstance(module, nn.ModuleList | nn.ModuleDict | nn.Sequential)
        and any(name == t or name.endswith(f".{t}") for t in target_modules)
    ]


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
