"""common.padding: ragged sequences to a padded batch and back."""

import pytest
import torch

from common.padding import lengths_mask, pad_sequences, padding_ratio, unpad


def test_pad_sequences_zero_pads_and_marks_valid_positions():
    seqs = [torch.ones(3, 2), 2 * torch.ones(1, 2), 3 * torch.ones(4, 2)]
    padded, valid = pad_sequences(seqs)
    assert padded.shape == (3, 4, 2)
    assert valid.tolist() == [[True] * 3 + [False], [True] + [False] * 3, [True] * 4]
    assert torch.equal(padded[0, 3], torch.zeros(2))
    assert torch.equal(padded[1, 1:], torch.zeros(3, 2))
    assert all(torch.equal(a, b) for a, b in zip(unpad(padded, [3, 1, 4]), seqs, strict=True))


def test_lengths_mask_with_explicit_length():
    assert lengths_mask([2, 0], 3).tolist() == [[True, True, False], [False, False, False]]


def test_padding_ratio():
    assert padding_ratio([4, 4]) == 0.0
    assert padding_ratio([1, 3]) == pytest.approx(1 - 4 / 6)
    assert padding_ratio([1024, 4096, 2304, 4096]) == pytest.approx(1 - 11520 / 16384)
    assert padding_ratio([]) == 0.0
