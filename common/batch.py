"""What a model's prediction receives: one micro-batch of ragged per-sample tokens, and the 2x2 latent packing.

Both sit below the model descriptions (`common.models`) and the training loop, so either can use them without
importing the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class NoisyBatch:
    """One micro-batch as the model sees it: ragged per-sample tokens, each sample with its own sigma."""

    sample_ids: list[str]
    noisy: list[Tensor]  # (N_i, C) noisy packed target tokens
    references: list[list[Tensor]]  # packed reference tokens of each sample, in img_shapes order
    img_shapes: list[list[tuple[int, int, int]]]  # packed grids, target first
    prompt_embeds: list[Tensor]  # (T_i, D), after caption dropout
    pooled_prompt_embeds: list[Tensor] | None  # models with a pooled text embedding (FLUX.1) only
    sigmas: Tensor  # (B,)
    attend: list[int]  # image tokens each sample attends to (its target only when its references were dropped)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Pack (C, h, w) latents into (h/2 * w/2, 4C) tokens in the layout of the pipelines' `_pack_latents`."""
    c, h, w = latents.shape
    return latents.view(c, h // 2, 2, w // 2, 2).permute(1, 3, 0, 2, 4).reshape((h // 2) * (w // 2), c * 4)


def latent_shape_to_tokens(c_h_w: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """Packed token grid (rows, cols) of a (C, h, w) latent: 2x2 latent patches, as `pack_latents` makes them."""
    _, h, w = c_h_w
    if h % 2 or w % 2:
        raise ValueError(f"latent size {h}x{w} is not even, so it cannot be packed 2x2")
    return h // 2, w // 2
