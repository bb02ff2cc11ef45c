"""ComfyUI key names of a FLUX.1 or FLUX.2 LoRA: ComfyUI runs the original BFL models, so diffusers module names map
to BFL's (`BflLayout`: `FLUX1` here; FLUX.2's in `common.models.flux2`).

Keys take the BFL module names (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ...). Where BFL fuses
linears that diffusers keeps apart (q/k/v into `qkv`; FLUX.1's q/k/v/proj_mlp into `linear1`), the LoRAs are fused
exactly:
A matrices stacked along the rank, B block-diagonal with zero blocks for parts without a LoRA, so the fused `B @ A`
is the diffusers deltas stacked in BFL row order. Each B arrives with its scale already folded in (common.comfyui).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import accumulate

import torch

_FLUX_BLOCK = re.compile(r"(?P<single>single_)?transformer_blocks\.(?P<index>\d+)\.(?P<name>.+)")

# FLUX diffusers module (inside a block, or top-level) -> (BFL module, index of its part in the BFL linear), as in
# ComfyUI's `comfy.utils.flux_to_diffusers`.
# The double blocks' attention: the same diffusers names and BFL parts in FLUX.1 and FLUX.2.
DOUBLE_BLOCK_ATTENTION = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", 0),
    "attn.to_add_out": ("txt_attn.proj", 0),
}
_FLUX_DOUBLE = {
    **DOUBLE_BLOCK_ATTENTION,
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


@dataclass(frozen=True)
class BflLayout:
    """How one FLUX generation's diffusers modules map to the BFL weights ComfyUI loads."""

    double: Mapping[str, tuple[str, int]]  # module inside a double block -> (BFL module, part of its fused linear)
    single: Mapping[str, tuple[str, int]]  # module inside a single block -> (BFL module, part)
    top: Mapping[str, tuple[str, int]]  # top-level module -> (BFL module, part)
    fused_rows: Mapping[str, tuple[int, ...]]  # last name of a fused BFL linear -> rows of each part / in_features
    swapped_halves: str = _SWAPPED_HALVES  # BFL module whose output halves diffusers stores swapped

    def lora_pairs(
        self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Scaled (A, B) per diffusers module -> (A, B) per BFL module, fusing the parts BFL keeps in one linear."""
        parts: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for module, pair in pairs.items():
            target, part = self._target(module)
            parts.setdefault(target, {})[part] = pair
        return {target: self._fuse(target, target_parts) for target, target_parts in parts.items()}

    def _target(self, module: str) -> tuple[str, int]:
        """BFL module and part index of a diffusers module; ValueError where ComfyUI's model has no counterpart."""
        block = _FLUX_BLOCK.fullmatch(module)
        if block is None:
            found = self.top.get(module)
            prefix = ""
        else:
            found = (self.single if block["single"] else self.double).get(block["name"])
            prefix = f"{'single' if block['single'] else 'double'}_blocks.{block['index']}."
        if found is None:
            raise ValueError(
                f"LoRA on FLUX module {module!r} cannot be exported: ComfyUI's FLUX model (BFL layout) has no "
                f"matching linear. Supported: blocks' {sorted(self.double)}, single blocks' {sorted(self.single)}, "
                f"top-level {sorted(self.top)}"
            )
        return prefix + found[0], found[1]

    def _fuse(
        self, target: str, parts: dict[int, tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of BFL linear `target` from its parts' scaled (A, B): ranks stacked, B block-diagonal, absent
        parts 0."""
        rows = self.fused_rows.get(target.rsplit(".", 1)[-1])
        if rows is None:
            a, b = parts[0]
            return a, (torch.cat(b.chunk(2)[::-1]) if target == self.swapped_halves else b)
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


FLUX1 = BflLayout(_FLUX_DOUBLE, _FLUX_SINGLE, _FLUX_TOP, _FUSED_ROWS)
bfl_lora_pairs = FLUX1.lora_pairs  # FLUX.1 Kontext's `EditModel.comfyui_keys`
