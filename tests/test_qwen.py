"""common.qwen against stock diffusers Qwen-Image run on each sample alone (the oracle)."""

import pytest
import torch
from conftest import (
    backend_cases,
    check_backend_runs,
    check_lora_gradients,
    check_matches_stock,
    reduce_base,
    to_device,
)
from diffusers import QwenImageTransformer2DModel

from common.attention import available_backends
from common.qwen import install_mixed, mixed_forward, padded_forward

BACKENDS = available_backends(torch.device("cpu"), torch.float32) + ["auto"]
# Target first, then 0, 1 and 2 references of sizes different from the target, in one batch.
MIXED = [[(1, 4, 6)], [(1, 5, 3), (1, 2, 4)], [(1, 2, 3), (1, 6, 4), (1, 3, 3)]]
TEXT_LENGTHS = [5, 9, 3]


def load(tiny_checkpoint, model):
    return QwenImageTransformer2DModel.from_pretrained(tiny_checkpoint(model), subfolder="transformer").eval()


@pytest.fixture(params=["qwen_edit", "qwen_edit_2511"])
def transformer(request, tiny_checkpoint):
    return load(tiny_checkpoint, request.param)


def make_batch(img_shapes, text_lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=[torch.randn(sum(f * h * w for f, h, w in s), 64, generator=g) for s in img_shapes],
        img_shapes=img_shapes,
        encoder_hidden_states=[torch.randn(n, 32, generator=g) for n in text_lengths],
        timestep=torch.rand(len(img_shapes), generator=g),
    )


def stock_single(transformer, batch, i):
    """The oracle: sample i alone, unpadded and unmasked, as the stock pipeline calls the model."""
    return transformer(
        hidden_states=batch["hidden_states"][i][None],
        encoder_hidden_states=batch["encoder_hidden_states"][i][None],
        encoder_hidden_states_mask=None,
        timestep=batch["timestep"][i : i + 1],
        img_shapes=[batch["img_shapes"][i]],
        return_dict=False,
    )[0][0]


def test_tiny_2511_variant_has_zero_cond_t(tiny_checkpoint):
    assert load(tiny_checkpoint, "qwen_edit_2511").config.zero_cond_t
    assert not load(tiny_checkpoint, "qwen_edit").config.zero_cond_t


@torch.no_grad()
def test_single_sample_is_bitwise_stock(transformer):
    batch = make_batch(MIXED[1:2], TEXT_LENGTHS[1:2])
    assert torch.equal(mixed_forward(transformer, **batch)[0], stock_single(transformer, batch, 0))


@torch.no_grad()
def test_equal_shapes_and_text_lengths_are_bitwise_stock_batch(transformer):
    batch = make_batch([MIXED[1]] * 3, [6, 6, 6])
    stock = transformer(
        hidden_states=torch.stack(batch["hidden_states"]),
        encoder_hidden_states=torch.stack(batch["encoder_hidden_states"]),
        timestep=batch["timestep"],
        img_shapes=batch["img_shapes"],
        return_dict=False,
    )[0]
    out = mixed_forward(transformer, **batch)
    assert all(torch.equal(o, s) for o, s in zip(out, stock, strict=True))
    assert not hasattr(transformer.pos_embed, "stock"), "the stock path must not install anything"


@torch.no_grad()
@pytest.mark.parametrize("device, dtype, backend", backend_cases())
def test_mixed_batch_matches_each_sample_alone(transformer, device, dtype, backend):
    transformer.to(device, dtype)
    batch = to_device(make_batch(MIXED, TEXT_LENGTHS), device, dtype)
    install_mixed(transformer, backend)
    check_backend_runs(backend, device, dtype)
    check_matches_stock(mixed_forward(transformer, **batch), lambda i: stock_single(transformer, batch, i), dtype)


@torch.no_grad()
def test_equal_images_different_text_lengths(transformer):
    batch = make_batch([MIXED[2]] * 2, [4, 11])
    out = mixed_forward(transformer, **batch)
    for i, o in enumerate(out):
        assert (o - stock_single(transformer, batch, i)).abs().max().item() <= 1e-5


def test_token_count_must_match_img_shapes(transformer):
    batch = make_batch(MIXED, TEXT_LENGTHS)
    batch["hidden_states"][2] = batch["hidden_states"][2][:-1]
    with pytest.raises(ValueError, match="sample 2"):
        mixed_forward(transformer, **batch)


@pytest.mark.parametrize("device, dtype, backend", backend_cases())
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_gradients_equal_sum_of_per_sample_gradients(transformer, device, dtype, backend, checkpointing):
    transformer.to(device, dtype)
    batch = to_device(make_batch(MIXED, TEXT_LENGTHS), device, dtype)
    check_backend_runs(backend, device, dtype)
    grads = check_lora_gradients(
        transformer, backend, checkpointing, install_mixed, padded_forward, stock_single, batch, transformer.img_in
    )
    assert len(grads) == 8 * transformer.config.num_layers


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
def test_control_dropout_keeps_layout_and_equals_target_alone(transformer, backend):
    """attend = target tokens only: references stay in the sequence, the target sees none of them."""
    batch = make_batch(MIXED, TEXT_LENGTHS)
    install_mixed(transformer, backend)
    targets = [4 * 6, 5 * 3, 2 * 3]
    attend = [targets[0], targets[1], len(batch["hidden_states"][2])]
    out, _ = padded_forward(transformer, **batch, attend=attend)
    assert out.shape[1] == max(len(h) for h in batch["hidden_states"])
    for i in (0, 1):
        alone = {
            **batch,
            "hidden_states": [h[:n] for h, n in zip(batch["hidden_states"], targets, strict=True)],
            "img_shapes": [s[:1] for s in batch["img_shapes"]],
        }
        assert (out[i, : targets[i]] - stock_single(transformer, alone, i)).abs().max().item() <= 1e-5
    assert (out[2, : len(batch["hidden_states"][2])] - stock_single(transformer, batch, 2)).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["fp8", "offload"])
def test_mixed_batch_on_a_reduced_base_matches_each_sample_alone(transformer, backend, option):
    """--base_precision fp8 / --offload_blocks: the mixed batch equals the stock model with the same option."""
    reduce_base(transformer, option)
    stored = {m.weight.dtype for m in transformer.transformer_blocks.modules() if isinstance(m, torch.nn.Linear)}
    assert stored == ({torch.float8_e4m3fn} if option == "fp8" else {torch.float32})
    batch = make_batch(MIXED, TEXT_LENGTHS)
    install_mixed(transformer, backend)
    out = mixed_forward(transformer, **batch)
    for i, o in enumerate(out):
        assert (o - stock_single(transformer, batch, i)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("option", ["fp8", "offload"])
def test_lora_gradients_on_a_reduced_base(transformer, option, checkpointing):
    batch = make_batch(MIXED, TEXT_LENGTHS)
    grads = check_lora_gradients(
        transformer,
        "split",
        checkpointing,
        install_mixed,
        padded_forward,
        stock_single,
        batch,
        transformer.img_in,
        base=option,
    )
    assert len(grads) == 8 * transformer.config.num_layers
