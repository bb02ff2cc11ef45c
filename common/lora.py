"""LoRA adapters on the stock transformer: add, save in the pipelines' own format, load back for resume.

Every `pytorch_lora_weights.safetensors` written here (the result and each checkpoint's copy) has each module's PEFT
scale (`lora_alpha / r`) folded into its B matrix and says `lora_alpha = r` in its metadata: diffusers then applies
B @ A at scale 1, and so does ComfyUI, which ignores that metadata. The adapter as trained (unfolded, float32) goes
to `lora_training_state.safetensors` in checkpoints, which resume reads, so resuming stays bitwise exact.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file
from torch import nn

from common.attention import base_model

LORA_FILE = "pytorch_lora_weights.safetensors"
COMFYUI_FILE = "pytorch_lora_weights_comfyui.safetensors"
STATE_FILE = "lora_training_state.safetensors"  # in checkpoints: the adapter's parameters as trained


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


def lora_scale(module: str, rank: int, alpha: float | None, alpha_pattern: Mapping[str, float], rslora: bool) -> float:
    """PEFT's scale of one module: its alpha (`alpha_pattern` match, else `alpha`) over r, or sqrt(r) with rsLoRA."""
    if alpha is None:
        return 1.0
    module_alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha)
    return module_alpha / (math.sqrt(rank) if rslora else rank)


def scale_b(b: torch.Tensor, scale: float) -> torch.Tensor:
    """B times a module's scale, computed in float32 and stored in B's dtype."""
    return (b.float() * scale).to(b.dtype)


def folded_lora(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter's state dict with every module's scale folded into its B, and its config at scale 1 (alpha = r)."""
    config = model.peft_config["default"]
    state = get_peft_model_state_dict(model)
    folded = {}
    for key, value in state.items():
        if key.endswith(".lora_B.weight"):
            module = key.removesuffix(".lora_B.weight")
            rank = state[f"{module}.lora_A.weight"].shape[0]
            value = scale_b(value, lora_scale(module, rank, config.lora_alpha, config.alpha_pattern, config.use_rslora))
        folded[key] = value
    unit = {"lora_alpha": config.r, "alpha_pattern": dict(config.rank_pattern), "use_rslora": False}
    return folded, {**config.to_dict(), **unit}


def save_lora(pipeline_class: type[DiffusionPipeline], transformer: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `pytorch_lora_weights.safetensors` with the pipeline's `save_lora_weights` (diffusers keys, adapter
    config in the metadata), scales folded into B (module doc), through a temporary folder and a rename so a crash
    never leaves half a file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, config = folded_lora(base_model(transformer))
    with tempfile.TemporaryDirectory(dir=directory, prefix=".lora-") as tmp:
        pipeline_class.save_lora_weights(tmp, transformer_lora_layers=state, transformer_lora_adapter_metadata=config)
        os.replace(Path(tmp) / LORA_FILE, directory / LORA_FILE)
    return directory / LORA_FILE


def save_lora_state(transformer: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapter's parameters as trained (no folding) to `lora_training_state.safetensors`, for resume."""
    path = Path(directory) / STATE_FILE
    save_file(get_peft_model_state_dict(base_model(transformer)), path)
    return path


def load_lora(transformer: nn.Module, directory: str | os.PathLike) -> None:
    """Load the parameters `save_lora_state` wrote into the adapter of `transformer` (exact copy, for resume)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no {STATE_FILE}: not a checkpoint of this trainer's version")
    incompatible = set_peft_model_state_dict(base_model(transformer), load_file(path), adapter_name="default")
    unexpected = getattr(incompatible, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA weights in {directory} do not fit this adapter: unexpected keys {unexpected[:5]}")
