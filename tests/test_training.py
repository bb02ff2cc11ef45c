"""common.training: per-sample draws, dropout semantics and the resumable micro-batch stream."""

import argparse

import pytest
import torch
from accelerate import Accelerator
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.attention import AttentionModuleMixin
from torch.utils.data import DataLoader

from common.lora import add_lora
from common.models.flux_kontext import FLUX_KONTEXT
from common.sampler import RandomBatchSampler, collate_ragged
from common.sdpa import DEFAULT_SDPA_KERNELS, enabled_sdpa_kernels, sdpa_kernels
from common.tiny import tiny_transformer
from common.training import TrainState, accumulate_step, make_noisy_batch, micro_batches, target_token_count
from common.training_data import TrainingData


def args(**overrides):
    values = dict(
        seed=3,
        caption_dropout=0.0,
        control_dropout=0.0,
        timestep_sampling="shift",
        logit_mean=0.0,
        logit_std=1.0,
        sigmoid_scale=1.0,
        mask_loss_weight=1.0,
        sdpa_kernels=DEFAULT_SDPA_KERNELS,
    )
    return argparse.Namespace(**{**values, **overrides})


def rows():
    """Collated Qwen-style rows: 2x2 and 3x2 token targets, the first with two references, the second none."""
    g = torch.Generator().manual_seed(0)
    latents = lambda h, w: torch.randn(4, 2 * h, 2 * w, generator=g)  # noqa: E731
    items = [
        dict(
            index=5,
            sample_id="a",
            target_latents=latents(2, 2),
            control_latents=[latents(1, 3), latents(2, 1)],
            prompt_embeds=torch.randn(6, 8, generator=g),
            empty_prompt_embeds=torch.randn(4, 8, generator=g),
            mask=torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
            img_shapes=[[1, 2, 2], [1, 1, 3], [1, 2, 1]],
        ),
        dict(
            index=9,
            sample_id="b",
            target_latents=latents(3, 2),
            control_latents=[],
            prompt_embeds=torch.randn(3, 8, generator=g),
            empty_prompt_embeds=torch.randn(4, 8, generator=g),
            mask=None,
            img_shapes=[[1, 3, 2]],
        ),
    ]
    return collate_ragged(items)


@pytest.fixture
def scheduler():
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)


def noisy(batch, scheduler, epoch=0, **overrides):
    data = TrainingData(dataset=None, lengths=[], empty_prompt=None, cached=True)
    return make_noisy_batch(batch, epoch, args(**overrides), scheduler, data, torch.device("cpu"), torch.float32)


def test_layout_and_targets(scheduler):
    batch = rows()
    nb, targets, weights = noisy(batch, scheduler)
    assert [n.shape for n in nb.noisy] == [(4, 16), (6, 16)]
    assert [[r.shape[0] for r in refs] for refs in nb.references] == [[3, 2], []]
    assert nb.attend == [4 + 3 + 2, 6] and weights is None
    assert nb.img_shapes == [[(1, 2, 2), (1, 1, 3), (1, 2, 1)], [(1, 3, 2)]]
    # noisy = (1 - s) x0 + s eps and target = eps - x0  =>  x0 = noisy - s * target.
    for n, t, s, lat in zip(nb.noisy, targets, nb.sigmas, batch["target_latents"], strict=True):
        x0 = lat.view(4, lat.shape[1] // 2, 2, lat.shape[2] // 2, 2).permute(1, 3, 0, 2, 4).reshape(-1, 16)
        assert torch.allclose(n - s * t, x0, atol=1e-5)


def test_draws_depend_on_the_sample_not_the_batch(scheduler):
    batch = rows()
    single = {k: v[1:] for k, v in batch.items()}
    both, alone = noisy(batch, scheduler)[0], noisy(single, scheduler)[0]
    assert torch.equal(both.noisy[1], alone.noisy[0]) and both.sigmas[1] == alone.sigmas[0]
    assert not torch.equal(noisy(batch, scheduler, epoch=1)[0].noisy[1], both.noisy[1])


def test_control_dropout_masks_references_but_keeps_the_layout(scheduler):
    batch = rows()
    kept, dropped = noisy(batch, scheduler)[0], noisy(batch, scheduler, control_dropout=1.0)[0]
    assert dropped.attend == [4, 6]  # target tokens only; sample b had no references to drop
    assert [len(r) for r in dropped.references] == [len(r) for r in kept.references]
    assert all(torch.equal(a, b) for a, b in zip(kept.noisy, dropped.noisy, strict=True))


def test_caption_dropout_uses_the_rows_empty_prompt(scheduler):
    batch = rows()
    dropped = noisy(batch, scheduler, caption_dropout=1.0)[0]
    assert all(torch.equal(p, e) for p, e in zip(dropped.prompt_embeds, batch["empty_prompt_embeds"], strict=True))


def test_edit_mask_weights_the_loss(scheduler):
    _, _, weights = noisy(rows(), scheduler, mask_loss_weight=3.0)
    assert weights[0].tolist() == [3.0, 1.0, 1.0, 1.0] and weights[1].tolist() == [1.0] * 6


def test_micro_batches_resume_where_the_state_says():
    lengths = list(range(1, 8))
    loader = DataLoader([{"index": i} for i in range(7)], batch_sampler=RandomBatchSampler(lengths, 2, seed=1))
    loader.collate_fn = collate_ragged
    state = TrainState()
    stream = micro_batches(loader, state)
    full = [next(stream) for _ in range(9)]  # crosses into the second epoch (4 batches per epoch)
    assert [e for e, _ in full] == [0] * 4 + [1] * 4 + [2]
    resumed_state = TrainState()
    resumed_state.load_state_dict({"step": 0, "epoch": 1, "batches_done": 1})
    resumed = micro_batches(loader, resumed_state)
    assert [next(resumed)[1]["index"] for _ in range(4)] == [b["index"] for _, b in full[5:9]]


def flux_items(channels=4, text_dim=8, pooled_dim=6):
    """FLUX-style rows (pooled CLIP embedding per row) with targets of 2x2, 16x12 and 3x2 tokens and references of
    other sizes than their targets, so the batch's largest sample is neither the first nor the last."""
    g = torch.Generator().manual_seed(1)
    latents = lambda h, w: torch.randn(channels, 2 * h, 2 * w, generator=g)  # noqa: E731
    grids = [((2, 2), [(3, 1)]), ((16, 12), [(2, 5)]), ((3, 2), [])]
    return [
        dict(
            index=index,
            sample_id=str(index),
            target_latents=latents(*target),
            control_latents=[latents(*r) for r in refs],
            prompt_embeds=torch.randn(5, text_dim, generator=g),
            pooled_prompt_embeds=torch.randn(pooled_dim, generator=g),
            img_shapes=[[1, *target], *([1, *r] for r in refs)],
        )
        for index, (target, refs) in zip((4, 11, 7), grids, strict=True)
    ]


def flux_rows():
    return collate_ragged(flux_items())


def flux_empty_prompt():
    g = torch.Generator().manual_seed(2)
    return {"prompt_embeds": torch.randn(5, 8, generator=g), "pooled_prompt_embeds": torch.randn(6, generator=g)}


def flux_noisy(batch, scheduler, **overrides):
    data = TrainingData(dataset=None, lengths=[], empty_prompt=flux_empty_prompt(), cached=True)
    return make_noisy_batch(batch, 0, args(**overrides), scheduler, data, torch.device("cpu"), torch.float32)[0]


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_flux_caption_dropout_replaces_the_pooled_embedding_too(scheduler, dropout):
    batch, empty = flux_rows(), flux_empty_prompt()
    nb = flux_noisy(batch, scheduler, caption_dropout=dropout)
    expected_t5 = [empty["prompt_embeds"]] * 3 if dropout else batch["prompt_embeds"]
    expected_pooled = [empty["pooled_prompt_embeds"]] * 3 if dropout else batch["pooled_prompt_embeds"]
    assert all(torch.equal(p, e) for p, e in zip(nb.prompt_embeds, expected_t5, strict=True))
    # The unconditional sample must not keep its caption's CLIP embedding.
    assert all(torch.equal(p, e) for p, e in zip(nb.pooled_prompt_embeds, expected_pooled, strict=True))


@pytest.mark.parametrize("sampling", ["shift", "logit_normal"])
def test_every_sample_draws_alike_alone_and_in_a_mixed_batch(scheduler, sampling):
    batch = flux_rows()
    both = flux_noisy(batch, scheduler, timestep_sampling=sampling)
    for i in range(3):
        alone = flux_noisy({k: v[i : i + 1] for k, v in batch.items()}, scheduler, timestep_sampling=sampling)
        assert alone.sigmas[0] == both.sigmas[i], f"sample {i}"
        assert torch.equal(alone.noisy[0], both.noisy[i]), f"sample {i}"


def test_the_step_loss_denominator_counts_target_tokens_only():
    items = flux_items()
    step = [(0, collate_ragged(items[:2])), (0, collate_ragged(items[2:]))]
    assert target_token_count(step) == 2 * 2 + 16 * 12 + 3 * 2  # references (3 + 10 tokens) and text excluded


@pytest.fixture(scope="module")
def kontext_step():
    """A tiny FLUX.1 Kontext with a LoRA, the flags and data one training step needs, and its mixed-size rows."""
    transformer = tiny_transformer(FLUX_KONTEXT)
    params = add_lora(transformer, 4, 4.0, FLUX_KONTEXT.lora_targets)
    with torch.no_grad():  # B = 0 at init would leave A without gradient
        generator = torch.Generator().manual_seed(0)
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=generator)
    flags = args(guidance_scale=1.0, output_dir="unused")
    empty = {"prompt_embeds": torch.zeros(5, 32), "pooled_prompt_embeds": torch.zeros(32)}
    data = TrainingData(dataset=None, lengths=[], empty_prompt=empty, cached=True)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    items = flux_items(channels=16, text_dim=32, pooled_dim=32)

    def run(step_batches):
        transformer.zero_grad(set_to_none=True)
        totals = accumulate_step(
            Accelerator(), transformer, FLUX_KONTEXT, flags, scheduler, data, step_batches, TrainState()
        )
        return totals, [p.grad.clone() for p in params]

    return transformer, flags, data, scheduler, items, run


def test_the_step_loss_is_the_mean_over_every_target_token_of_the_step(kontext_step):
    transformer, flags, data, scheduler, items, run = kontext_step
    totals, _ = run([(0, collate_ragged(items[:2])), (0, collate_ragged(items[2:]))])
    nb, targets, _ = make_noisy_batch(
        collate_ragged(items), 0, flags, scheduler, data, torch.device("cpu"), torch.float32
    )
    with torch.no_grad():
        predictions = FLUX_KONTEXT.predict(transformer, nb, flags)
    squared = sum(((p - t) ** 2).sum() for p, t in zip(predictions, targets, strict=True))
    expected = squared / sum(t.numel() for t in targets)  # target elements only: references are inputs, not targets
    assert totals["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_two_micro_batches_of_different_sizes_equal_one_combined_batch(kontext_step):
    *_, items, run = kontext_step
    split_totals, split = run([(0, collate_ragged(items[:2])), (0, collate_ragged(items[2:]))])
    whole_totals, whole = run([(0, collate_ragged(items))])
    assert split_totals["loss"] == pytest.approx(whole_totals["loss"], rel=1e-5)
    for a, b in zip(split, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert max(float(g.abs().max()) for g in whole) > 1e-4  # the gradients compared are not all zero


def test_every_attention_call_of_a_step_runs_without_cudnn_attention(kontext_step):
    """--sdpa_kernels' default holds in the forward of mixed and equal-size (stock path) batches and in backward,
    where gradient checkpointing recomputes the forward outside the forward's own context; it is undone after."""
    transformer, *_, items, run = kontext_step
    seen = []

    def record(module, args):
        seen.append((torch._C._current_graph_task_id() != -1, tuple(enabled_sdpa_kernels())))

    attention = [m for m in transformer.modules() if isinstance(m, AttentionModuleMixin)]
    handles = [m.register_forward_pre_hook(record) for m in attention]
    transformer.enable_gradient_checkpointing()
    everything = ["flash", "efficient", "cudnn", "math"]
    try:
        with sdpa_kernels(everything):  # what torch allows by default (tests run inside the trainers' default)
            run([(0, collate_ragged(items[::2])), (0, collate_ragged(items[2:]))])  # mixed, then one sample (stock)
            assert enabled_sdpa_kernels() == everything
    finally:
        transformer.disable_gradient_checkpointing()
        for handle in handles:
            handle.remove()
    assert {in_backward for in_backward, _ in seen} == {False, True}  # forward, and recompute in backward
    assert {kernels for _, kernels in seen} == {DEFAULT_SDPA_KERNELS} and "cudnn" not in DEFAULT_SDPA_KERNELS


def test_configuration_line_states_memory_options_token_budget_and_compile(tmp_path):
    """The flags that change memory or speed show in the configuration line; a token budget replaces the sample
    count ("6 steps of 4 samples" was printed with --max_tokens_per_batch, whose steps hold varying samples)."""
    import types

    import train_flux_kontext
    from common.training import _summary

    base = ["--pretrained_model_name_or_path", "org/model", "--cache_dir", str(tmp_path), "--max_train_steps", "6"]
    processes = types.SimpleNamespace(num_processes=2, mixed_precision="bf16")
    plain = _summary(train_flux_kontext.parse_args([*base, "--train_batch_size", "4"]), FLUX_KONTEXT, processes)
    assert "6 steps of 8 samples (4 x 1 accumulation x 2 processes)" in plain
    assert "base weights bf16" in plain and "no block offloading" in plain and "eager (no --compile)" in plain
    budget = [*base, "--base_precision", "fp8", "--offload_blocks", "--max_tokens_per_batch", "3000", "--compile"]
    line = _summary(train_flux_kontext.parse_args(budget), FLUX_KONTEXT, processes)
    expected = "6 steps of up to 3000 real tokens per micro-batch and process (samples per step vary; 1 accumulation"
    assert f"{expected} x 2 processes)" in line
    assert "samples (" not in line
    assert "base weights fp8 (e4m3, per-row scales)" in line and "blocks offloaded to CPU memory" in line
    assert "--compile: the first steps and each new batch layout compile first" in line
