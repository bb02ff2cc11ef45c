"""common.flux2 against stock diffusers FLUX.2 run on each sample alone (the oracle), ids against the pipelines."""

import numpy as np
import pytest
import torch
from conftest import check_flux_control_dropout, check_lora_gradients, randomize_lora
from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from peft import LoraConfig
from PIL import Image

from common.attention import available_backends
from common.flux2 import (
    image_ids,
    install_mixed,
    mixed_forward,
    padded_forward,
    reference_ids,
    sample_ids,
    text_ids,
)
from common.tiny import write_tiny

MODELS = ("flux2_klein", "flux2_dev")
PIPELINES = {"flux2_klein": Flux2KleinPipeline, "flux2_dev": Flux2Pipeline}
BACKENDS = available_backends(torch.device("cpu"), torch.float32) + ["auto"]
TEXT_LEN = 7
# (target grid, reference grids) in packed tokens: 0, 1 and 3 references, of other sizes than their targets.
MIXED = [((4, 6), []), ((5, 5), [(2, 4)]), ((2, 3), [(3, 3), (4, 2), (2, 5)])]
# Every linear of both block kinds, the single blocks' fused qkv+MLP projection and output included.
LORA_TARGETS = r".*\.(to_q|to_k|to_v|to_out\.0|to_qkv_mlp_proj)|single_transformer_blocks\.\d+\.attn\.to_out"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each tiny FLUX.2 checkpoint, written once for the module."""
    root = tmp_path_factory.mktemp("flux2")
    return {model: write_tiny(model, root / model) for model in MODELS}


@pytest.fixture(params=MODELS)
def transformer(request, checkpoints):
    """The tiny transformer loaded through `from_pretrained` ([dev] has a guidance embedder, [klein] none)."""
    return Flux2Transformer2DModel.from_pretrained(checkpoints[request.param], subfolder="transformer").eval()


def make_batch(transformer, layouts, seed=0, text_len=TEXT_LEN):
    """Per-sample FLUX.2 tokens and ids (target first, then its references at t = 10, 20, ...)."""
    g = torch.Generator().manual_seed(seed)
    config = transformer.config
    batch = len(layouts)
    ids = [sample_ids(target, refs) for target, refs in layouts]
    return dict(
        hidden_states=[torch.randn(len(i), config.in_channels, generator=g) for i in ids],
        img_ids=ids,
        encoder_hidden_states=torch.randn(batch, text_len, config.joint_attention_dim, generator=g),
        txt_ids=text_ids(text_len),
        timestep=torch.rand(batch, generator=g),
        guidance=torch.full((batch,), 2.5) if config.guidance_embeds else None,
    )


def stock_single(transformer, batch, i):
    """The oracle: sample i alone, unpadded, through the stock forward with (1, N, 4) ids as the pipelines pass."""
    guidance = batch["guidance"]
    return transformer(
        hidden_states=batch["hidden_states"][i][None],
        encoder_hidden_states=batch["encoder_hidden_states"][i : i + 1],
        timestep=batch["timestep"][i : i + 1],
        img_ids=batch["img_ids"][i][None],
        txt_ids=batch["txt_ids"][None],
        guidance=None if guidance is None else guidance[i : i + 1],
        return_dict=False,
    )[0][0]


@pytest.mark.parametrize("pipeline", [Flux2KleinPipeline, Flux2Pipeline])
def test_ids_match_the_pipelines(pipeline):
    assert torch.equal(image_ids(3, 5), pipeline._prepare_latent_ids(torch.zeros(2, 8, 3, 5))[0])
    refs = [torch.zeros(1, 8, 2, 3), torch.zeros(1, 8, 4, 1), torch.zeros(1, 8, 1, 1)]
    assert torch.equal(reference_ids([(2, 3), (4, 1), (1, 1)]), pipeline._prepare_image_ids(refs)[0])
    assert torch.equal(text_ids(9), pipeline._prepare_text_ids(torch.zeros(2, 9, 3))[1])
    assert torch.equal(sample_ids((3, 5), []), image_ids(3, 5)) and reference_ids([]).shape == (0, 4)


@torch.no_grad()
def test_single_sample_is_bitwise_stock(transformer):
    batch = make_batch(transformer, MIXED[2:])
    assert torch.equal(mixed_forward(transformer, **batch)[0], stock_single(transformer, batch, 0))


@torch.no_grad()
def test_equal_layouts_are_bitwise_stock_batch(transformer):
    batch = make_batch(transformer, [MIXED[1]] * 3)
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
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_matches_each_sample_alone(transformer, backend):
    batch = make_batch(transformer, MIXED)
    install_mixed(transformer, backend)
    out = mixed_forward(transformer, **batch)
    for i, o in enumerate(out):
        expected = stock_single(transformer, batch, i)
        assert o.shape == expected.shape == (len(batch["img_ids"][i]), transformer.out_channels)
        assert (o - expected).abs().max().item() <= 1e-5


@torch.no_grad()
def test_same_layout_lengths_but_other_reference_times_take_mixed_path(transformer):
    """Equal token counts with other positions (grids transposed, references swapped) must not be stacked."""
    batch = make_batch(transformer, [((4, 6), [(2, 3), (3, 2)]), ((6, 4), [(3, 2), (2, 3)])])
    out = mixed_forward(transformer, **batch)
    for i in range(2):
        assert (out[i] - stock_single(transformer, batch, i)).abs().max().item() <= 1e-5


@torch.no_grad()
def test_stock_calls_unchanged_after_install(transformer):
    batch = make_batch(transformer, MIXED[1:2])
    before = stock_single(transformer, batch, 0)
    install_mixed(transformer, "split")
    assert torch.equal(stock_single(transformer, batch, 0), before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_gradients_equal_sum_of_per_sample_gradients(transformer, backend, checkpointing):
    batch = make_batch(transformer, MIXED)
    grads = check_lora_gradients(
        transformer,
        backend,
        checkpointing,
        install_mixed,
        padded_forward,
        stock_single,
        batch,
        transformer.x_embedder,
        LORA_TARGETS,
    )
    # A and B of 4 projections in each double block, of 2 (fused qkv+MLP in, out) in each single block.
    assert len(grads) == 8 * transformer.config.num_layers + 4 * transformer.config.num_single_layers


def test_every_linear_reaches_the_loss(transformer):
    """Unlike Qwen's last block, no FLUX.2 linear is dead for an image-token loss: the text stream runs through the
    shared single blocks, so a LoRA on every linear (guidance embedder of [dev] included) trains, as DDP requires."""
    linears = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=linears))
    randomize_lora(transformer)
    out, valid = padded_forward(transformer, **make_batch(transformer, MIXED))
    out[valid].square().sum().backward()
    lora = {n: p for n, p in transformer.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * len(linears)  # A and B of each
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
def test_control_dropout_keeps_layout_and_equals_target_alone(transformer, backend):
    """attend = target tokens only: the sequence keeps its reference tokens, the target sees none of them."""
    install_mixed(transformer, backend)
    targets = [t[0] * t[1] for t, _ in MIXED]
    check_flux_control_dropout(transformer, make_batch(transformer, MIXED), targets, padded_forward, stock_single)


def _image(width: int, height: int) -> Image.Image:
    """A deterministic RGB gradient image."""
    pixels = np.arange(width * height * 3, dtype=np.int64).reshape(height, width, 3) % 256
    return Image.fromarray(pixels.astype(np.uint8))


@torch.no_grad()
@pytest.mark.parametrize("model", MODELS)
def test_pipeline_call_equals_its_sample_in_a_mixed_batch(model, checkpoints):
    """The stock pipeline's own transformer call (2 references) is reproduced by mixed_forward inside a mixed batch,
    and its ids are the ones our helpers build."""
    pipe = PIPELINES[model].from_pretrained(checkpoints[model])
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda _, args, kwargs, out: calls.append((kwargs, out[0])), with_kwargs=True
    )
    pipe(
        prompt="Make the sky blue",
        image=[_image(96, 64), _image(64, 128)],
        height=64,
        width=96,
        num_inference_steps=1,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    hook.remove()
    kwargs, expected = calls[0]
    assert torch.equal(kwargs["img_ids"][0], sample_ids((4, 6), [(4, 6), (8, 4)]))
    assert torch.equal(kwargs["txt_ids"][0], text_ids(512))
    guidance = kwargs["guidance"]
    assert (guidance is None) == (model == "flux2_klein")
    second = make_batch(pipe.transformer, [((3, 5), [])], text_len=512)
    batch = {
        "hidden_states": [kwargs["hidden_states"][0], *second["hidden_states"]],
        "img_ids": [kwargs["img_ids"][0], *second["img_ids"]],
        "encoder_hidden_states": torch.cat([kwargs["encoder_hidden_states"], second["encoder_hidden_states"]]),
        "txt_ids": kwargs["txt_ids"][0],
        "timestep": torch.cat([kwargs["timestep"], second["timestep"]]),
        "guidance": None if guidance is None else torch.cat([guidance, second["guidance"]]),
    }
    out = mixed_forward(pipe.transformer, **batch)
    assert (out[0] - expected[0]).abs().max().item() <= 1e-5
