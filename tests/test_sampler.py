"""common.sampler: exact epoch coverage, seeding, length grouping, resume, rank slicing, ragged collation."""

import random

import pytest
import torch
from torch.utils.data import DataLoader

from common.sampler import (
    LengthGroupedBatchSampler,
    RandomBatchSampler,
    TokenBudgetBatchSampler,
    collate_ragged,
    mean_padding_ratio,
)

SAMPLERS = [RandomBatchSampler, LengthGroupedBatchSampler]


def synthetic_lengths(n: int, seed: int = 0) -> list[int]:
    """Token counts of n images of three areas with varied aspect ratios, like a multi-resolution edit set."""
    rng = random.Random(seed)
    return [rng.choice([32, 48, 64]) * rng.randint(20, 40) for _ in range(n)]


def epoch(sampler: RandomBatchSampler, e: int = 0) -> list[list[int]]:
    sampler.set_epoch(e)
    return list(sampler)


@pytest.mark.parametrize("cls", SAMPLERS)
@pytest.mark.parametrize("n, batch_size", [(100, 8), (96, 8), (7, 3), (1000, 4)])
def test_every_index_exactly_once_per_epoch(cls, n, batch_size):
    sampler = cls(synthetic_lengths(n), batch_size, seed=3)
    for e in range(3):
        batches = epoch(sampler, e)
        assert len(batches) == len(sampler) == -(-n // batch_size)
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
        assert len(batches[-1]) == n - batch_size * (len(batches) - 1)  # the only short batch is the last one


@pytest.mark.parametrize("cls", SAMPLERS)
def test_drop_last_drops_only_the_short_batch(cls):
    n, batch_size = 101, 8
    sampler = cls(synthetic_lengths(n), batch_size, seed=1, drop_last=True)
    for e in range(3):
        batches = epoch(sampler, e)
        seen = [i for b in batches for i in b]
        assert len(batches) == len(sampler) == 12
        assert all(len(b) == batch_size for b in batches)
        assert len(seen) == len(set(seen)) == 96 and set(seen) <= set(range(n))


@pytest.mark.parametrize("cls", SAMPLERS)
def test_deterministic_for_a_seed_and_different_per_epoch_and_seed(cls):
    lengths = synthetic_lengths(200)
    a, b, c = cls(lengths, 4, seed=7), cls(lengths, 4, seed=7), cls(lengths, 4, seed=8)
    assert epoch(a, 0) == epoch(b, 0)
    assert epoch(a, 1) == epoch(b, 1)
    assert epoch(a, 0) != epoch(a, 1)
    assert epoch(a, 0) != epoch(c, 0)
    assert list(a) == list(a)  # re-iterating the same epoch repeats its order


def test_grouped_batches_pad_much_less_than_random():
    lengths = synthetic_lengths(1024)
    random_ratio = RandomBatchSampler(lengths, 4).padding_ratio()
    grouped = LengthGroupedBatchSampler(lengths, 4)
    assert random_ratio > 0.2
    assert grouped.padding_ratio() < 0.03
    assert grouped.padding_ratio() == pytest.approx(mean_padding_ratio(list(grouped), lengths))
    # A window of one batch only sorts inside each batch: it pads exactly as much as random order.
    assert LengthGroupedBatchSampler(lengths, 4, window_batches=1).padding_ratio() == pytest.approx(random_ratio)


def test_grouped_batch_order_is_shuffled_not_long_to_short():
    lengths = list(range(1, 257))  # distinct lengths: a fully sorted window gives strictly decreasing batch maxima
    batches = epoch(LengthGroupedBatchSampler(lengths, 4, window_batches=64))
    maxima = [max(lengths[i] for i in b) for b in batches]
    assert sorted(maxima, reverse=True) == [256 - 4 * k for k in range(64)]  # batches are consecutive in length
    assert maxima != sorted(maxima, reverse=True)


def test_mean_padding_ratio():
    lengths = [4, 4, 1, 3, 2]
    assert mean_padding_ratio([[0, 1], [2, 3], [4], []], lengths) == pytest.approx((0 + (1 - 4 / 6) + 0) / 3)
    assert mean_padding_ratio([], lengths) == 0.0


@pytest.mark.parametrize("cls", SAMPLERS)
@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_gives_exactly_the_remaining_batches(cls, drop_last):
    lengths = synthetic_lengths(150)
    full = epoch(cls(lengths, 8, seed=5, drop_last=drop_last), 2)
    run = cls(lengths, 8, seed=5, drop_last=drop_last)
    run.set_epoch(2)
    it = iter(run)
    done = [next(it) for _ in range(7)]
    state = run.state_dict()
    assert state == {"epoch": 2, "batches_done": 7}

    resumed = cls(lengths, 8, seed=5, drop_last=drop_last)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the trainer's loop sets the epoch again: must keep the resume point
    rest = list(resumed)
    assert done + rest == full
    assert resumed.state_dict() == {"epoch": 2, "batches_done": len(full)}
    assert epoch(resumed, 3) == epoch(cls(lengths, 8, seed=5, drop_last=drop_last), 3)  # next epoch from its start


def test_resume_with_trained_count_through_a_prefetching_dataloader():
    lengths = synthetic_lengths(64)
    sampler = LengthGroupedBatchSampler(lengths, 4, seed=2)
    full = epoch(LengthGroupedBatchSampler(lengths, 4, seed=2))
    loader = DataLoader(list(range(64)), batch_sampler=sampler, num_workers=2, prefetch_factor=2)
    it = iter(loader)
    trained = [next(it).tolist() for _ in range(5)]
    state = sampler.state_dict(batches_done=len(trained))
    assert sampler.state_dict()["batches_done"] > 5  # the loader fetched ahead of training
    del it
    resumed = LengthGroupedBatchSampler(lengths, 4, seed=2)
    resumed.load_state_dict(state)
    assert trained + list(resumed) == full


def test_load_state_dict_rejects_out_of_range():
    sampler = RandomBatchSampler(synthetic_lengths(10), 4)
    with pytest.raises(ValueError):
        sampler.load_state_dict({"epoch": 0, "batches_done": 4})


@pytest.mark.parametrize("cls", SAMPLERS)
@pytest.mark.parametrize("n", [160, 163, 161])  # 161: the short final global batch has fewer samples than ranks
def test_rank_slices_union_equals_one_process_global_batches(cls, n):
    lengths = synthetic_lengths(n)
    for replicas in (2, 4):
        single = epoch(cls(lengths, 4 * replicas, seed=9), 1)
        ranks = [epoch(cls(lengths, 4, seed=9, num_replicas=replicas, rank=r), 1) for r in range(replicas)]
        assert all(len(r) == len(single) for r in ranks)  # same number of steps on every rank
        for step, global_batch in enumerate(single):
            slices = [r[step] for r in ranks]
            assert sorted(i for s in slices for i in s) == sorted(global_batch)
            if len(global_batch) == 4 * replicas:
                assert all(len(s) == 4 for s in slices)
            else:
                assert max(map(len, slices)) - min(map(len, slices)) <= 1
        rank_ratios = {cls(lengths, 4, seed=9, num_replicas=replicas, rank=r).padding_ratio() for r in range(replicas)}
        assert len(rank_ratios) == 1  # every rank logs the same padding ratio


def test_rank_slices_of_a_grouped_global_batch_are_contiguous():
    lengths = list(range(1, 65))
    single = epoch(LengthGroupedBatchSampler(lengths, 8))
    rank1 = epoch(LengthGroupedBatchSampler(lengths, 4, num_replicas=2, rank=1))
    assert [b[4:] for b in single] == rank1


def test_invalid_arguments():
    with pytest.raises(ValueError):
        RandomBatchSampler([1, 2], 0)
    with pytest.raises(ValueError):
        RandomBatchSampler([1, 2], 1, num_replicas=2, rank=2)
    with pytest.raises(ValueError):
        LengthGroupedBatchSampler([1, 2], 1, window_batches=0)


def test_collate_keeps_ragged_shapes():
    rows = [
        {
            "target_latents": torch.randn(16, h, w),
            "control_latents": [torch.randn(16, h // 2, w // 2)] * k,
            "prompt_embeds": torch.randn(t, 8),
            "img_shapes": [[1, h // 2, w // 2]] + [[1, h // 4, w // 4]] * k,
            "sample_id": f"s{i}",
            "index": i,
        }
        for i, (h, w, t, k) in enumerate([(64, 32, 5, 1), (32, 96, 9, 2), (48, 48, 7, 0)])
    ]
    batch = collate_ragged(rows)
    assert set(batch) == set(rows[0]) | {"lengths"}
    assert [x.shape for x in batch["target_latents"]] == [(16, 64, 32), (16, 32, 96), (16, 48, 48)]
    assert [len(c) for c in batch["control_latents"]] == [1, 2, 0]
    assert [x.shape for x in batch["prompt_embeds"]] == [(5, 8), (9, 8), (7, 8)]
    assert batch["target_latents"][1] is rows[1]["target_latents"]  # no copy, no padding
    assert batch["sample_id"] == ["s0", "s1", "s2"]
    assert batch["index"] == [0, 1, 2]
    assert batch["lengths"] == [32 * 16 + 16 * 8, 16 * 48 + 2 * 8 * 24, 24 * 24]
    assert "lengths" not in collate_ragged([{"index": 0}])


def budget_sampler(lengths, max_tokens, **kwargs):
    return TokenBudgetBatchSampler(lengths, max_tokens, seed=5, **kwargs)


@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_token_budget_batches_fit_cover_the_epoch_and_give_ranks_equal_counts(group_by_length, replicas):
    lengths = synthetic_lengths(300)
    text = [random.Random(i).randint(50, 300) for i in range(300)]
    tokens = [n + t for n, t in zip(lengths, text, strict=True)]
    budget = 6000
    ranks = [
        TokenBudgetBatchSampler(
            lengths, budget, tokens=tokens, group_by_length=group_by_length, seed=5, num_replicas=replicas, rank=r
        )
        for r in range(replicas)
    ]
    for e in range(2):
        per_rank = [epoch(sampler, e) for sampler in ranks]
        assert all(len(batches) == len(ranks[0]) for batches in per_rank), "every rank runs as many micro-batches"
        seen = [i for batches in per_rank for batch in batches for i in batch]
        assert sorted(seen) == list(range(300)), "every sample exactly once per epoch"
        batches = [batch for batches in per_rank for batch in batches]
        assert all(batch and sum(tokens[i] for i in batch) <= budget for batch in batches)
        counts = [len(b) for b in batches]
        assert min(counts) < max(counts), "batch sizes follow the budget, not a fixed count"
        # A batch closes only when the next sample does not fit: only the epoch's last batch and the halves that
        # give every rank a batch in the short last step may hold less than budget - the longest sample.
        underfull = [b for b in batches if sum(tokens[i] for i in b) <= budget - max(tokens)]
        assert len(underfull) <= 2 * replicas


def test_token_budget_grouped_batches_pad_less_than_random():
    lengths = synthetic_lengths(1024)
    random_ratio = budget_sampler(lengths, 12000).padding_ratio()
    grouped = budget_sampler(lengths, 12000, group_by_length=True)
    assert grouped.padding_ratio() < 0.05 < 0.2 < random_ratio
    assert grouped.padding_ratio() == pytest.approx(mean_padding_ratio(list(grouped), lengths))


def test_token_budget_short_last_step_gives_every_rank_a_batch():
    lengths = [10] * 7  # budget 40: batches of 4 and 3 samples, for 3 ranks
    steps = TokenBudgetBatchSampler(lengths, 40, num_replicas=3).steps()
    assert len(steps) == 1 and sorted(len(b) for b in steps[0]) == [2, 2, 3]
    # Budget 30, 2 ranks: batches of 3, 3, 1 samples; the short step [1] joins the one before: [3], [2], [1, 1].
    steps = TokenBudgetBatchSampler(lengths, 30, num_replicas=2).steps()
    assert [sorted(len(b) for b in step) for step in steps] == [[1, 2], [1, 3]]
    dropped = TokenBudgetBatchSampler(lengths, 40, num_replicas=3, drop_last=True)
    assert dropped.steps() == [] and len(dropped) == 0
    assert TokenBudgetBatchSampler([10] * 2, 40, num_replicas=3).steps()[0].count([]) == 1


@pytest.mark.parametrize("group_by_length", [False, True])
def test_token_budget_resume_is_exact(group_by_length):
    lengths = synthetic_lengths(200)
    sampler = budget_sampler(lengths, 5000, group_by_length=group_by_length, num_replicas=2, rank=1)
    sampler.set_epoch(1)
    full = list(sampler)
    for k in (0, 3, len(full)):
        resumed = budget_sampler(lengths, 5000, group_by_length=group_by_length, num_replicas=2, rank=1)
        resumed.load_state_dict({"epoch": 1, "batches_done": k})
        assert list(resumed) == full[k:]
        assert resumed.state_dict() == {"epoch": 1, "batches_done": len(full)}


def test_token_budget_smaller_than_a_sample_names_the_flag():
    with pytest.raises(ValueError, match=r"--max_tokens_per_batch 100 is smaller than sample 1 \(150 tokens\)"):
        TokenBudgetBatchSampler([50, 150, 20], 100)
