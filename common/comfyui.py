"""Export a LoRA in the key format of ComfyUI's native LoRA loader, from the file diffusers' `save_lora_weights` writes.

- FLUX.1 Kontext: ComfyUI runs the original BFL model, so keys take the BFL module names under `diffusion_model.`
  (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ...). Where BFL fuses linears that diffusers keeps
  apart (q/k/v into `qkv`; q/k/v/proj_mlp into `linear1`), the LoRAs are fused exactly: A matrices stacked along the
  rank, B block-diagonal with zero blocks for parts without a LoRA, so the fused `B @ A` is the diffusers deltas
  stacked in BFL row order.
- Qwen-Image-Edit(-Plus, -2511): ComfyUI's Qwen-Image model uses the diffusers module names, so only the
  `transformer.` prefix becomes `diffusion_model.`.

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
from itertools import accumulate
from pathlib import Path

import safetensors.torch
import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft import LoraConfig
from safetensors import safe_open

from common.encoders import MODELS
from common.lora import lora_scale, scale_b

_DIFFUSERS_KEY = re.compile(r"transformer\.(?P<module>.+)\.lora_(?P<matrix>[AB])\.weight")
_FLUX_BLOCK = re.compile(r"(?P<single>single_)?transformer_blocks\.(?P<index>\d+)\.(?P<name>.+)")

# FLUX diffusers module (inside a block, or top-level) -> (BFL module, index of its part in the BFL linear), as in
# ComfyUI's `comfy.utils.flux_to_diffusers`.
_FLUX_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", 0),
    "attn.to_add_out": ("txt_attn.proj", 0),
    "ff.net.0.proj": ("img_mlp.0", 0),
    "ff.net.2": ("img_mlp.2", 0),
    "ff_context.net.0.proj": ("txt_mlp.0", 0),
    "ff_context.net.2": ("txt_mlp.2", 0),
    "norm1.linear": ("img_mod.lin", 0),
    "norm1_context.linear": ("txt_mod.lin", 0),
}
_FLUX_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", 0),
    "norm.linear": ("modulation.lin", 0),
}
_FLUX_TOP = {
    "x_embedder": ("img_in", 0),
    "context_embedder": ("txt_in", 0),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", 0),
    "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", 0),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", 0),
    "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", 0),
    "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", 0),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", 0),
    "proj_out": ("final_layer.linear", 0),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", 0),
}
# Rows of each part of a fused BFL linear, in multiples of its input features (the hidden size; FLUX's MLP ratio is 4).
_FUSED_ROWS = {"qkv": (1, 1, 1), "linear1": (1, 1, 1, 4)}
# diffusers' final norm emits (scale, shift), BFL's (shift, scale): the halves of the output rows swap.
_SWAPPED_HALVES = "final_layer.adaLN_modulation.1"


def comfyui_state_dict(
    model: str,
    lora_state_dict: Mapping[str, torch.Tensor],
    alpha: float | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    use_rslora: bool = False,
) -> dict[str, torch.Tensor]:
    """LoRA weights keyed for ComfyUI's loader of `model`, from the `transformer.`-keyed dict of `save_lora_weights`.

    `alpha`, `alpha_pattern` and `use_rslora` are the adapter's `LoraConfig` fields that set its scale, so the export
    applies the delta diffusers applies; `alpha=None` means scale 1, as diffusers loads a file without an alpha.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    scaled = {
        module: (a, scale_b(b, lora_scale(module, a.shape[0], alpha, alpha_pattern or {}, use_rslora)))
        for module, (a, b) in _lora_pairs(lora_state_dict).items()
    }
    if model == "flux_kontext":
        parts: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for module, pair in scaled.items():
            target, part = _flux_target(module)
            parts.setdefault(target, {})[part] = pair
        scaled = {target: _fuse(target, target_parts) for target, target_parts in parts.items()}
    out = {}
    for module, (a, b) in scaled.items():
        out[f"diffusion_model.{module}.lora_A.weight"] = a.contiguous()
        out[f"diffusion_model.{module}.lora_B.weight"] = b.contiguous()
    return out


def save_comfyui_lora(
    model: str, diffusers_lora_file: str | os.PathLike, out_file: str | os.PathLike, alpha: float | None = None
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


def _flux_target(module: str) -> tuple[str, int]:
    """BFL module and part index of a diffusers FLUX module; ValueError where ComfyUI's FLUX has no counterpart."""
    block = _FLUX_BLOCK.fullmatch(module)
    if block is None:
        found = _FLUX_TOP.get(module)
        prefix = ""
    else:
        found = (_FLUX_SINGLE if block["single"] else _FLUX_DOUBLE).get(block["name"])
        prefix = f"{'single' if block['single'] else 'double'}_blocks.{block['index']}."
    if found is None:
        raise ValueError(
            f"LoRA on FLUX module {module!r} cannot be exported: ComfyUI's FLUX model (BFL layout) has no matching "
            f"linear. Supported: blocks' {sorted(_FLUX_DOUBLE)}, single blocks' {sorted(_FLUX_SINGLE)}, "
            f"top-level {sorted(_FLUX_TOP)}"
        )
    return prefix + found[0], found[1]


def _fuse(target: str, parts: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of BFL linear `target` from its parts' scaled (A, B): ranks stacked, B block-diagonal, absent parts 0."""
    rows = _FUSED_ROWS.get(target.rsplit(".", 1)[-1])
    if rows is None:
        a, b = parts[0]
        return a, (torch.cat(b.chunk(2)[::-1]) if target == _SWAPPED_HALVES else b)
    order = sorted(parts)
    in_features = parts[order[0]][0].shape[1]
    sizes = [n * in_features for n in rows]
    offsets = [0, *accumulate(sizes)]
    a = torch.cat([parts[i][0] for i in order])
    b = torch.zeros(offsets[-1], a.shape[0], dtype=parts[order[0]][1].dtype)
    column = 0
    for i in order:
        part_a, part_b = parts[i]
        if part_b.shape[0] != sizes[i]:
            raise ValueError(f"part {i} of {target} has {part_b.shape[0]} output rows, expected {sizes[i]}")
        b[offsets[i] : offsets[i + 1], column : column + part_a.shape[0]] = part_b
        column += part_a.shape[0]
    return a, b
