"""Export a LoRA in the key format of ComfyUI's native LoRA loader, from the file diffusers' `save_lora_weights` writes.

Module names are the model's (`EditModel.comfyui_keys`): FLUX.1 maps to the original BFL names with fused linears
(`common.flux_comfyui`); ComfyUI's Qwen-Image uses the diffusers names. Keys go under `diffusion_model.`.

Scale: PEFT multiplies `B @ A` by `lora_alpha / r` (rsLoRA: `/ sqrt(r)`, per-module alphas from `alpha_pattern`);
ComfyUI multiplies by `alpha / rank` only where a `.alpha` key exists and by 1 otherwise, with `rank` the rows of the
(fused) A. Each module's scale is therefore baked into its B and no `.alpha` key is written, so the file means the
same delta to ComfyUI and to diffusers' own loaders however many ranks a fused module stacks.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft import LoraConfig
from safetensors import safe_open

from common.lora import lora_scale, scale_b
from common.models import EditModel, get_model

_DIFFUSERS_KEY = re.compile(r"transformer\.(?P<module>.+)\.lora_(?P<matrix>[AB])\.weight")


def comfyui_state_dict(
    model: EditModel | str,
    lora_state_dict: Mapping[str, torch.Tensor],
    alpha: float | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    use_rslora: bool = False,
) -> dict[str, torch.Tensor]:
    """LoRA weights keyed for ComfyUI's loader of `model`, from the `transformer.`-keyed dict of `save_lora_weights`.

    `alpha`, `alpha_pattern` and `use_rslora` are the adapter's `LoraConfig` fields that set its scale, so the export
    applies the delta diffusers applies; `alpha=None` means scale 1, as diffusers loads a file without an alpha.
    """
    model = get_model(model)
    scaled = {
        module: (a, scale_b(b, lora_scale(module, a.shape[0], alpha, alpha_pattern or {}, use_rslora)))
        for module, (a, b) in _lora_pairs(lora_state_dict).items()
    }
    out = {}
    for module, (a, b) in model.comfyui_keys(scaled).items():
        out[f"diffusion_model.{module}.lora_A.weight"] = a.contiguous()
        out[f"diffusion_model.{module}.lora_B.weight"] = b.contiguous()
    return out


def save_comfyui_lora(
    model: EditModel | str,
    diffusers_lora_file: str | os.PathLike,
    out_file: str | os.PathLike,
    alpha: float | None = None,
) -> Path:
    """Write the ComfyUI copy of a `save_lora_weights` file atomically (temp file + rename); returns its path.

    The scale comes from the adapter config diffusers stores in the file's metadata (what `load_lora_weights` uses);
    an explicit `alpha` (the `lora_alpha` of every module) replaces it, for files saved without that metadata.
    """
    with safe_open(diffusers_lora_file, framework="pt") as f:
        metadata = f.metadata() or {}
        state = {key: f.get_tensor(key) for key in f.keys()}
    if alpha is not None:
        tensors = comfyui_state_dict(model, state, alpha)
    elif LORA_ADAPTER_METADATA_KEY in metadata:
        config = _transformer_lora_config(metadata[LORA_ADAPTER_METADATA_KEY])
        tensors = comfyui_state_dict(model, state, config.lora_alpha, config.alpha_pattern, config.use_rslora)
    else:
        tensors = comfyui_state_dict(model, state)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(safetensors.torch.save(tensors, metadata={"format": "pt"}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _transformer_lora_config(raw_metadata: str) -> LoraConfig:
    """The transformer's `LoraConfig` as diffusers rebuilds it from `lora_adapter_metadata` when loading the file."""
    prefix = "transformer."
    fields = {k.removeprefix(prefix): v for k, v in json.loads(raw_metadata).items() if k.startswith(prefix)}
    return LoraConfig(**fields)


def _lora_pairs(lora_state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of every transformer module in a diffusers LoRA dict; ValueError for any key that is not one of those."""
    matrices: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora_state_dict.items():
        match = _DIFFUSERS_KEY.fullmatch(key)
        if match is None:
            raise ValueError(
                f"cannot export LoRA key {key!r} to ComfyUI: expected transformer LoRA matrices "
                "'transformer.<module>.lora_A.weight' / '.lora_B.weight' (no biases, DoRA or text-encoder LoRA)"
            )
        matrices.setdefault(match["module"], {})[match["matrix"]] = tensor
    for module, pair in matrices.items():
        if len(pair) != 2:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise ValueError(f"LoRA of transformer module {module!r} has no {missing} matrix")
    return {module: (pair["A"], pair["B"]) for module, pair in matrices.items()}
