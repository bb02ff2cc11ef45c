"""Padding of ragged per-sample sequences into one batch, and the bookkeeping that goes with it."""

from collections.abc import Sequence

import torch
from torch import Tensor


def lengths_mask(
    lengths: Sequence[int], max_len: int | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Bool (B, max_len) mask, True on each sample's first `lengths[i]` positions; built without a device sync."""
    max_len = max(lengths) if max_len is None else max_len
    positions = torch.arange(max_len)
    return (positions[None, :] < torch.tensor(list(lengths))[:, None]).to(device)


def pad_sequences(seqs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack (N_i, ...) tensors into a zero-padded (B, N_max, ...) batch and its (B, N_max) validity mask."""
    padded = torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True)
    return padded, lengths_mask([s.shape[0] for s in seqs], padded.shape[1], padded.device)


def unpad(padded: Tensor, lengths: Sequence[int]) -> list[Tensor]:
    """Inverse of `pad_sequences`: sample i's first `lengths[i]` rows."""
    return [padded[i, :n] for i, n in enumerate(lengths)]


def padding_ratio(lengths: Sequence[int]) -> float:
    """Share of a padded batch's token slots that hold padding: 1 - sum(N_i) / (B * max N_i)."""
    if not lengths:
        return 0.0
    return 1.0 - sum(lengths) / (len(lengths) * max(lengths))
