"""Tests for common.loss: masked MSE over padded batches (seed 001 §6.2.2) and edit-mask weights."""

import pytest
import torch

from common.loss import edit_mask_weights, masked_mse_loss

C = 64


def _batch(lengths, max_len, channels=C, seed=0, dtype=torch.float64):
    """Random pred/target (B, max_len, C) and valid mask with the first `lengths[i]` tokens real."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    pred = torch.randn(b, max_len, channels, generator=g, dtype=dtype)
    target = torch.randn(b, max_len, channels, generator=g, dtype=dtype)
    valid = torch.zeros(b, max_len, dtype=torch.bool)
    for i, n in enumerate(lengths):
        valid[i, :n] = True
    return pred, target, valid


def test_edit_mask_weights_values():
    mask = torch.tensor([[0.0, 1.0, 0.5, 0.25]])
    assert torch.equal(edit_mask_weights(mask, 2.0, 1.0), torch.tensor([[1.0, 2.0, 1.5, 1.25]]))
    assert torch.equal(edit_mask_weights(mask, 1.0, 0.0), mask)
    b = torch.tensor([[True, False]])
    w = edit_mask_weights(b, 3.0, 0.5)
    assert w.dtype == torch.float32 and torch.equal(w, torch.tensor([[3.0, 0.5]]))


def test_mask_weighted_loss_equals_hand_computation():
    """Seed test_mask_loss_with_reduction_none: fg 2 / bg 1 weights, reduced by the count of valid tokens."""
    pred, target, valid = _batch([10, 10], 10, seed=1)
    mask = torch.rand(2, 10, generator=torch.Generator().manual_seed(2)) > 0.5
    weight = edit_mask_weights(mask, 2.0, 1.0)
    loss = masked_mse_loss(pred, target, valid, weight=weight)

    element = (pred - target) ** 2
    weight_mask = (mask.double() * 2.0 + (~mask).double() * 1.0).unsqueeze(-1)
    expected = (element * weight_mask).sum() / (20 * C)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    # weights matter: the unweighted loss is different, and weight == 1 is the unweighted loss
    assert not torch.isclose(loss, masked_mse_loss(pred, target, valid))
    torch.testing.assert_close(
        masked_mse_loss(pred, target, valid, weight=torch.ones(2, 10)),
        masked_mse_loss(pred, target, valid),
        rtol=1e-12,
        atol=0,
    )


def test_weighted_loss_with_padding_uses_count_not_weight_sum():
    pred, target, valid = _batch([7, 4], 9, seed=3)
    weight = torch.rand(2, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3
    weight[~valid] = 1e6  # weights on padding must be ignored too
    loss = masked_mse_loss(pred, target, valid, weight=weight)
    sq = ((pred - target) ** 2).sum(-1) * weight
    expected = (sq[0, :7].sum() + sq[1, :4].sum()) / ((7 + 4) * C)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_loss_normalization_with_padding():
    """Seed test: 8 and 6 valid tokens of 10 -> sum / ((8 + 6) * C); the naive mean is diluted."""
    pred, target, valid = _batch([8, 6], 10, seed=5)
    loss = masked_mse_loss(pred, target, valid)
    expected = (((pred[0, :8] - target[0, :8]) ** 2).sum() + ((pred[1, :6] - target[1, :6]) ** 2).sum()) / ((8 + 6) * C)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    naive = ((pred - target) ** 2).mean()
    assert not torch.isclose(naive, loss, rtol=1e-3)
    # With zeros in the padding (what a padded target/pred pair looks like), the naive mean is diluted by 14/20.
    pred0, target0 = pred.clone(), target.clone()
    pred0[~valid] = 0
    target0[~valid] = 0
    naive0 = ((pred0 - target0) ** 2).mean()
    torch.testing.assert_close(naive0, loss * 14 / 20, rtol=1e-12, atol=0)
    assert naive0 < loss


@pytest.mark.parametrize("poison", [None, float("nan"), float("inf")])
def test_padding_token_zero_gradient(poison):
    """Seed test, made strict: padding gradient is exactly zero, even with NaN/inf in padded pred and target."""
    pred, target, valid = _batch([8, 6], 10, seed=6)
    weight = torch.full((2, 10), 1.5, dtype=torch.float64)
    if poison is not None:
        pred[~valid] = poison
        target[0, 9] = poison
        weight[1, 7] = poison
    pred.requires_grad_(True)
    loss = masked_mse_loss(pred, target, valid, weight=weight)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.equal(pred.grad[0, 8:], torch.zeros(2, C, dtype=torch.float64))
    assert torch.equal(pred.grad[1, 6:], torch.zeros(4, C, dtype=torch.float64))
    # real tokens: d/dpred of sum(1.5 * (p - t)^2) / (14 * C)
    expected = 2 * 1.5 * (pred.detach() - target) / (14 * C)
    torch.testing.assert_close(pred.grad[0, :8], expected[0, :8], rtol=1e-12, atol=0)
    torch.testing.assert_close(pred.grad[1, :6], expected[1, :6], rtol=1e-12, atol=0)


def test_multiplying_by_mask_would_leak_nan():
    """Control: the naive `mse * mask` reduction is poisoned by NaN padding, which masked_mse_loss avoids."""
    pred, target, valid = _batch([8, 6], 10, seed=7)
    pred[~valid] = float("nan")
    pred.requires_grad_(True)
    naive = (((pred - target) ** 2) * valid.unsqueeze(-1)).sum() / (14 * C)
    assert torch.isnan(naive)
    assert torch.isfinite(masked_mse_loss(pred, target, valid))


def test_per_sample_normalization_is_mean_of_sample_means():
    pred, target, valid = _batch([8, 6, 3], 10, seed=8)
    loss = masked_mse_loss(pred, target, valid, normalize="sample")
    means = [((pred[i, :n] - target[i, :n]) ** 2).mean() for i, n in enumerate([8, 6, 3])]
    expected = torch.stack(means).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert not torch.isclose(loss, masked_mse_loss(pred, target, valid), rtol=1e-3)


def test_per_sample_normalization_with_weights_and_empty_sample():
    pred, target, valid = _batch([5, 0, 2], 6, seed=9)
    pred[~valid] = float("nan")
    weight = torch.arange(18, dtype=torch.float64).reshape(3, 6) / 10
    pred.requires_grad_(True)
    loss = masked_mse_loss(pred, target, valid, weight=weight, normalize="sample")
    sq = ((pred.detach() - target) ** 2).sum(-1) * weight
    # the empty sample is left out of the mean over samples
    expected = (sq[0, :5].sum() / (5 * C) + sq[2, :2].sum() / (2 * C)) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    loss.backward()
    assert torch.equal(pred.grad[~valid], torch.zeros(int((~valid).sum()), C, dtype=torch.float64))


def test_global_valid_tokens_sets_denominator():
    pred, target, valid = _batch([8, 6], 10, seed=10)
    total = ((pred - target) ** 2)[valid].sum()
    local = masked_mse_loss(pred, target, valid)
    torch.testing.assert_close(local, total / (14 * C), rtol=1e-12, atol=0)
    g = masked_mse_loss(pred, target, valid, global_valid_tokens=56)
    torch.testing.assert_close(g, total / (56 * C), rtol=1e-12, atol=0)
    torch.testing.assert_close(g * 4, local, rtol=1e-12, atol=0)
    gt = masked_mse_loss(pred, target, valid, global_valid_tokens=torch.tensor(56))
    torch.testing.assert_close(gt, g, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="below"):
        masked_mse_loss(pred, target, valid, global_valid_tokens=10)
    with pytest.raises(ValueError, match="only applies"):
        masked_mse_loss(pred, target, valid, normalize="sample", global_valid_tokens=56)


def test_global_valid_tokens_matches_single_process_over_shards():
    """Two 'ranks' with different resolutions: summing their losses with the global count = one big batch."""
    pred_a, target_a, valid_a = _batch([8, 6], 10, seed=11)
    pred_b, target_b, valid_b = _batch([3], 4, seed=12)
    n_global = int(valid_a.sum() + valid_b.sum())
    la = masked_mse_loss(pred_a, target_a, valid_a, global_valid_tokens=n_global)
    lb = masked_mse_loss(pred_b, target_b, valid_b, global_valid_tokens=n_global)
    big_pred = torch.cat([pred_a, torch.nn.functional.pad(pred_b, (0, 0, 0, 6))])
    big_target = torch.cat([target_a, torch.nn.functional.pad(target_b, (0, 0, 0, 6))])
    big_valid = torch.cat([valid_a, torch.nn.functional.pad(valid_b, (0, 6))])
    torch.testing.assert_close(la + lb, masked_mse_loss(big_pred, big_target, big_valid), rtol=1e-12, atol=0)


def test_longer_padding_gives_same_loss_and_gradients():
    pred, target, valid = _batch([8, 6], 10, seed=13)
    weight = torch.rand(2, 10, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    extra = 7
    pad_pred = torch.cat([pred, torch.full((2, extra, C), float("nan"), dtype=torch.float64)], dim=1)
    pad_target = torch.cat([target, torch.randn(2, extra, C, dtype=torch.float64) * 1e3], dim=1)
    pad_valid = torch.cat([valid, torch.zeros(2, extra, dtype=torch.bool)], dim=1)
    pad_weight = torch.cat([weight, torch.full((2, extra), 5.0, dtype=torch.float64)], dim=1)
    for normalize in ("tokens", "sample"):
        p1 = pred.clone().requires_grad_(True)
        p2 = pad_pred.clone().requires_grad_(True)
        l1 = masked_mse_loss(p1, target, valid, weight=weight, normalize=normalize)
        l2 = masked_mse_loss(p2, pad_target, pad_valid, weight=pad_weight, normalize=normalize)
        l1.backward()
        l2.backward()
        torch.testing.assert_close(l2, l1, rtol=1e-13, atol=0)  # only the summation order may differ
        assert torch.equal(p2.grad[:, :10], p1.grad), normalize
        assert torch.equal(p2.grad[:, 10:], torch.zeros(2, extra, C, dtype=torch.float64))


def test_all_padding_gives_zero_connected_loss():
    pred, target, _ = _batch([0, 0], 5, seed=15)
    valid = torch.zeros(2, 5, dtype=torch.bool)
    pred.requires_grad_(True)
    for normalize in ("tokens", "sample"):
        loss = masked_mse_loss(pred, target, valid, normalize=normalize)
        assert loss.item() == 0.0 and loss.requires_grad
        (g,) = torch.autograd.grad(loss, pred)
        assert torch.equal(g, torch.zeros_like(pred))


def test_bf16_inputs_are_reduced_in_float32():
    pred, target, valid = _batch([8, 6], 10, seed=16, dtype=torch.float32)
    loss = masked_mse_loss(pred.bfloat16(), target.bfloat16(), valid)
    assert loss.dtype == torch.float32
    ref = masked_mse_loss(pred.bfloat16().float(), target.bfloat16().float(), valid)
    assert torch.equal(loss, ref)


def test_input_validation():
    pred, target, valid = _batch([3], 4, channels=2)
    with pytest.raises(ValueError, match="shapes differ"):
        masked_mse_loss(pred, target[:, :3], valid)
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        masked_mse_loss(pred[0], target[0], valid)
    with pytest.raises(ValueError, match="valid must be \\(B, N\\)"):
        masked_mse_loss(pred, target, valid[:, :3])
    with pytest.raises(ValueError, match="bool"):
        masked_mse_loss(pred, target, valid.float())
    with pytest.raises(ValueError, match="weight"):
        masked_mse_loss(pred, target, valid, weight=torch.ones(1, 3))
    with pytest.raises(ValueError, match="normalize"):
        masked_mse_loss(pred, target, valid, normalize="mean")
