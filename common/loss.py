"""Flow-matching MSE over padded mixed-resolution batches: only real target tokens count, padding gets no gradient."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Normalize = Literal["tokens", "sample"]


def edit_mask_weights(edit_mask: Tensor, foreground_weight: float, background_weight: float) -> Tensor:
    """Per-token loss weights bg + (fg - bg) * mask from an edit mask in [0, 1] (B, N), to emphasise edited regions.

    A bool mask is converted to float32; a float mask keeps its dtype (soft masks give interpolated weights).
    """
    mask = edit_mask.to(torch.float32) if not edit_mask.is_floating_point() else edit_mask
    return background_weight + (foreground_weight - background_weight) * mask


def masked_mse_loss(
    pred: Tensor,
    target: Tensor,
    valid: Tensor,
    weight: Tensor | None = None,
    normalize: Normalize = "tokens",
    global_valid_tokens: int | Tensor | None = None,
) -> Tensor:
    """Mean squared error of pred vs target (B, N, C) over the tokens where valid (B, N) is True.

    Padded / non-target positions (valid False) are excluded by selection (torch.where), not by multiplying with
    the mask, so their gradient is exactly zero even when pred or target hold inf/NaN there.

    weight: optional per-token weights (B, N), e.g. from edit_mask_weights. The denominator stays the *count* of
    valid tokens, not the sum of weights (as in seed 001's MaskEditLoss): a foreground weight of 2 then really
    doubles the pull of edited tokens instead of being renormalised away, and weight == 1 reproduces the plain loss.

    normalize="tokens" (default, seed 001 §4.3): sum over valid elements / (valid tokens in the batch * C), so every
    real token counts the same whatever its sample's resolution or padding. normalize="sample": each sample's mean
    over its own valid tokens, then the mean over samples that have at least one valid token (small images count
    as much as large ones).

    global_valid_tokens: for multi-GPU training with normalize="tokens", pass the number of valid tokens summed over
    all ranks (the caller all-reduces valid.sum()); the denominator becomes global_valid_tokens * C, so every token
    in the global batch has the same weight even when ranks hold different resolutions. DDP *averages* gradients
    over ranks, so multiply the returned loss by the world size to get the exact global-token mean gradient.

    Computed in at least float32 (bf16/fp16 inputs are upcast). With no valid tokens the loss is 0 and still
    connected to pred (zero gradient), so DDP sees the same graph on every rank.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.ndim != 3:
        raise ValueError(f"pred must be (B, N, C), got shape {tuple(pred.shape)}")
    if valid.shape != pred.shape[:2]:
        raise ValueError(f"valid must be (B, N) = {tuple(pred.shape[:2])}, got {tuple(valid.shape)}")
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got {valid.dtype}")
    if weight is not None and weight.shape != pred.shape[:2]:
        raise ValueError(f"weight must be (B, N) = {tuple(pred.shape[:2])}, got {tuple(weight.shape)}")
    if normalize not in ("tokens", "sample"):
        raise ValueError(f"normalize must be 'tokens' or 'sample', got {normalize!r}")
    if global_valid_tokens is not None and normalize != "tokens":
        raise ValueError("global_valid_tokens only applies to normalize='tokens'")

    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    channels = pred.shape[-1]
    valid3 = valid.unsqueeze(-1)
    zero = torch.zeros((), dtype=dtype, device=pred.device)
    # Select, don't multiply: where() sends a zero gradient to the unselected branch, and subtraction passes it on
    # unchanged, so inf/NaN in padded pred/target can neither leak into the value nor into the gradient.
    diff = torch.where(valid3, pred.to(dtype) - target.to(dtype), zero)
    sq = diff.square()
    if weight is not None:
        sq = sq * torch.where(valid, weight.to(dtype), zero).unsqueeze(-1)

    if normalize == "sample":
        per_sample_tokens = valid.sum(dim=1)  # (B,)
        per_sample = sq.sum(dim=(1, 2)) / (per_sample_tokens.clamp(min=1).to(dtype) * channels)
        has_tokens = per_sample_tokens > 0
        n_samples = has_tokens.sum().clamp(min=1).to(dtype)
        return torch.where(has_tokens, per_sample, zero).sum() / n_samples

    if global_valid_tokens is None:
        n_tokens = valid.sum().to(dtype)
    elif isinstance(global_valid_tokens, Tensor):
        n_tokens = global_valid_tokens.detach().to(device=pred.device, dtype=dtype).reshape(())
    else:
        if isinstance(global_valid_tokens, bool) or global_valid_tokens < 0:
            raise ValueError(f"global_valid_tokens must be a non-negative int, got {global_valid_tokens!r}")
        local = int(valid.sum())
        if global_valid_tokens < local:
            raise ValueError(f"global_valid_tokens={global_valid_tokens} is below this rank's {local} valid tokens")
        n_tokens = torch.tensor(float(global_valid_tokens), dtype=dtype, device=pred.device)
    return sq.sum() / (n_tokens.clamp(min=1) * channels)
