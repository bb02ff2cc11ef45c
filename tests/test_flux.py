"""common.flux against stock diffusers FLUX run on each sample alone (the oracle)."""

import pytest
import torch
from conftest import (
    backend_cases,
    check_backend_runs,
    check_flux_control_dropout,
    check_lora_gradients,
    check_matches_stock,
    reduce_base,
    to_device,
)
from diffusers import FluxKontextPipeline, FluxTransformer2DModel

from common.attention import available_backends
from common.flux import image_ids, install_mixed, mixed_forward, padded_forward

BACKENDS = available_backends(torch.device("cpu"), torch.float32) + ["auto"]
TEXT_LEN = 7
# (target grid, reference grid) in packed tokens; references differ in size from their targets.
MIXED = [((4, 6), (3, 3)), ((5, 5), (2, 4)), ((2, 3), (6, 4))]


@pytest.fixture
def transformer(tiny_checkpoint):
    return FluxTransformer2DModel.from_pretrained(tiny_checkpoint("flux_kontext"), subfolder="transformer").eval()


def make_batch(layouts, seed=0):
    """Per-sample Kontext tokens and ids (target first, then the reference with first id channel 1)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(layouts)
    hidden = [torch.randn(t[0] * t[1] + r[0] * r[1], 64, generator=g) for t, r in layouts]
    ids = [torch.cat([image_ids(*t), image_ids(*r, index=1)]) for t, r in layouts]
    return dict(
        hidden_states=hidden,
        img_ids=ids,
        encoder_hidden_states=torch.randn(batch, TEXT_LEN, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.rand(batch, generator=g),
        txt_ids=torch.zeros(TEXT_LEN, 3),
        guidance=torch.full((batch,), 2.5),
    )


def stock_single(transformer, batch, i):
    """The oracle: sample i alone, unpadded, through the stock forward."""
    return transformer(
        hidden_states=batch["hidden_states"][i][None],
        encoder_hidden_states=batch["encoder_hidden_states"][i : i + 1],
        pooled_projections=batch["pooled_projections"][i : i + 1],
        timestep=batch["timestep"][i : i + 1],
        img_ids=batch["img_ids"][i],
        txt_ids=batch["txt_ids"],
        guidance=batch["guidance"][i : i + 1],
        return_dict=False,
    )[0][0]


def test_image_ids_match_kontext_pipeline():
    expected = FluxKontextPipeline._prepare_latent_image_ids(1, 5, 7, "cpu", torch.float32)
    assert torch.equal(image_ids(5, 7), expected)
    expected[..., 0] = 1
    assert torch.equal(image_ids(5, 7, index=1), expected)


@torch.no_grad()
def test_single_sample_is_bitwise_stock(transformer):
    batch = make_batch(MIXED[:1])
    assert torch.equal(mixed_forward(transformer, **batch)[0], stock_single(transformer, batch, 0))


@torch.no_grad()
def test_equal_layouts_are_bitwise_stock_batch(transformer):
    batch = make_batch([MIXED[0]] * 3)
    stock = transformer(
        hidden_states=torch.stack(batch["hidden_states"]),
        **{k: v for k, v in batch.items() if k not in ("hidden_states", "img_ids")},
        img_ids=batch["img_ids"][0],
        return_dict=False,
    )[0]
    out = mixed_forward(transformer, **batch)
    assert all(torch.equal(o, s) for o, s in zip(out, stock, strict=True))
    assert not hasattr(transformer.pos_embed, "stock"), "the stock path must not install anything"


@torch.no_grad()
@pytest.mark.parametrize("device, dtype, backend", backend_cases())
def test_mixed_batch_matches_each_sample_alone(transformer, device, dtype, backend):
    transformer.to(device, dtype)
    batch = to_device(make_batch(MIXED), device, dtype)
    install_mixed(transformer, backend)
    check_backend_runs(backend, device, dtype)
    check_matches_stock(mixed_forward(transformer, **batch), lambda i: stock_single(transformer, batch, i), dtype)


@torch.no_grad()
def test_same_token_count_different_grids_take_mixed_path(transformer):
    """4x6 and 6x4 targets have equal lengths but different positions: stacking them would be wrong."""
    batch = make_batch([((4, 6), (2, 2)), ((6, 4), (2, 2))])
    out = mixed_forward(transformer, **batch)
    assert (out[1] - stock_single(transformer, batch, 1)).abs().max().item() <= 1e-5


@torch.no_grad()
def test_stock_calls_unchanged_after_install(transformer):
    batch = make_batch(MIXED[:1])
    before = stock_single(transformer, batch, 0)
    install_mixed(transformer, "split")
    assert torch.equal(stock_single(transformer, batch, 0), before)


@pytest.mark.parametrize("device, dtype, backend", backend_cases())
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_gradients_equal_sum_of_per_sample_gradients(transformer, device, dtype, backend, checkpointing):
    transformer.to(device, dtype)
    batch = to_device(make_batch(MIXED), device, dtype)
    check_backend_runs(backend, device, dtype)
    grads = check_lora_gradients(
        transformer, backend, checkpointing, install_mixed, padded_forward, stock_single, batch, transformer.x_embedder
    )
    # A and B of 4 adapted projections in each double block, of 3 in each single block (it has no to_out).
    assert len(grads) == 8 * transformer.config.num_layers + 6 * transformer.config.num_single_layers


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
def test_control_dropout_keeps_layout_and_equals_target_alone(transformer, backend):
    """attend = target tokens only: the sequence keeps its reference tokens, the target sees none of them."""
    install_mixed(transformer, backend)
    targets = [t[0] * t[1] for t, _ in MIXED]
    check_flux_control_dropout(transformer, make_batch(MIXED), targets, padded_forward, stock_single)


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["fp8", "offload"])
def test_mixed_batch_on_a_reduced_base_matches_each_sample_alone(transformer, backend, option):
    """--base_precision fp8 / --offload_blocks: the mixed batch equals the stock model with the same option."""
    reduce_base(transformer, option)
    stored = {m.weight.dtype for m in transformer.transformer_blocks.modules() if isinstance(m, torch.nn.Linear)}
    assert stored == ({torch.float8_e4m3fn} if option == "fp8" else {torch.float32})
    batch = make_batch(MIXED)
    install_mixed(transformer, backend)
    out = mixed_forward(transformer, **batch)
    for i, o in enumerate(out):
        assert (o - stock_single(transformer, batch, i)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("option", ["fp8", "offload"])
def test_lora_gradients_on_a_reduced_base(transformer, option, checkpointing):
    batch = make_batch(MIXED)
    grads = check_lora_gradients(
        transformer,
        "split",
        checkpointing,
        install_mixed,
        padded_forward,
        stock_single,
        batch,
        transformer.x_embedder,
        base=option,
    )
    assert len(grads) == 8 * transformer.config.num_layers + 6 * transformer.config.num_single_layers
