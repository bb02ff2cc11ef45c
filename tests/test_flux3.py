"""common.flux3 against stock diffusers FLUX.3 run on each sample alone (the oracle), ids against the pipeline."""

import numpy as np
import pytest
import torch
from conftest import (
    backend_cases,
    check_backend_runs,
    check_lora_gradients,
    check_matches_stock,
    randomize_lora,
    to_device,
)
from diffusers import Flux3Transformer2DModel
from diffusers.modular_pipelines.flux3.before_denoise import Flux3TextRoPEInputsStep, _prepare_image_ids
from peft import LoraConfig
from PIL import Image

from common.batch import pack_latents
from common.flux3 import (
    IMAGE_ROPE_SCALE,
    image_ids,
    install_mixed,
    mixed_forward,
    padded_forward,
    reference_ids,
    text_ids,
)
from common.models.flux3 import FLUX3_KLEIN, encode_image, encode_prompt
from common.tiny_components import FLUX3_TRANSFORMER, seeded

IDS = ("img_ids", "txt_ids", "image_cond_ids")  # kept float32 on any device, as the pipeline keeps them
# (target grid, reference grids, text length): 0, 1 and 2 references of other sizes than their targets; text lengths
# as the pipeline pads prompts (multiples of 80, attended by the transformer).
MIXED = [((4, 6), [], 80), ((5, 5), [(2, 4)], 160), ((2, 3), [(3, 3), (4, 2)], 80)]
# Every linear of every block: the per-mode blocks of the three streams and the joint single blocks.
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.linear_in", "ff.linear_out")


@pytest.fixture
def transformer():
    """A fresh tiny FLUX.3 transformer (tests add adapters and checkpointing to it)."""
    return seeded(0, lambda: Flux3Transformer2DModel(**FLUX3_TRANSFORMER)).eval()


def make_batch(transformer, layouts, seed=0):
    """Per-sample FLUX.3 streams and ids: target, its references (l = -1, -2, ...) and its own text length."""
    g = torch.Generator().manual_seed(seed)
    config = transformer.config
    targets = [image_ids(*target) for target, _, _ in layouts]
    references = [reference_ids(refs) for _, refs, _ in layouts]
    return dict(
        hidden_states=[torch.randn(len(i), config.in_channels, generator=g) for i in targets],
        img_ids=targets,
        encoder_hidden_states=[torch.randn(t, config.joint_attention_dim, generator=g) for _, _, t in layouts],
        txt_ids=[text_ids(t) for _, _, t in layouts],
        timestep=torch.rand(len(layouts), generator=g),
        image_cond_hidden_states=[torch.randn(len(i), config.cond_in_channels, generator=g) for i in references],
        image_cond_ids=references,
    )


def stock_single(transformer, batch, i):
    """The oracle: sample i alone, unpadded, through the stock forward as the pipeline calls it (no reference
    stream at all when the sample has no references)."""
    refs = batch["image_cond_hidden_states"][i]
    cond = {"image_cond_hidden_states": refs[None], "image_cond_ids": batch["image_cond_ids"][i]} if len(refs) else {}
    if batch.get("target_timestep") is not None:
        cond["target_timestep"] = batch["target_timestep"][i : i + 1]
    return transformer(
        hidden_states=batch["hidden_states"][i][None],
        encoder_hidden_states=batch["encoder_hidden_states"][i][None],
        timestep=batch["timestep"][i : i + 1],
        img_ids=batch["img_ids"][i],
        txt_ids=batch["txt_ids"][i],
        return_dict=False,
        **cond,
    )[0][0]


def test_ids_match_the_pipeline():
    assert torch.equal(image_ids(3, 5), _prepare_image_ids(3, 5, IMAGE_ROPE_SCALE))
    expected = torch.cat(
        [_prepare_image_ids(h, w, IMAGE_ROPE_SCALE, l_coord=-(1 + k)) for k, (h, w) in enumerate([(2, 3), (4, 1)])]
    )
    assert torch.equal(reference_ids([(2, 3), (4, 1)]), expected) and reference_ids([]).shape == (0, 4)
    assert torch.equal(text_ids(9), Flux3TextRoPEInputsStep._prepare_text_ids(torch.zeros(1, 9, 3)))


@torch.no_grad()
def test_single_sample_is_bitwise_stock(transformer):
    batch = make_batch(transformer, MIXED[2:])
    assert torch.equal(mixed_forward(transformer, **batch)[0], stock_single(transformer, batch, 0))


@torch.no_grad()
@pytest.mark.parametrize("layout", [MIXED[0], MIXED[2]], ids=["no-references", "references"])
def test_equal_layouts_are_bitwise_stock_batch(transformer, layout):
    batch = make_batch(transformer, [layout] * 3)
    refs = {}
    if layout[1]:
        refs = {
            "image_cond_hidden_states": torch.stack(batch["image_cond_hidden_states"]),
            "image_cond_ids": batch["image_cond_ids"][0],
        }
    stock = transformer(
        hidden_states=torch.stack(batch["hidden_states"]),
        encoder_hidden_states=torch.stack(batch["encoder_hidden_states"]),
        timestep=batch["timestep"],
        img_ids=batch["img_ids"][0],
        txt_ids=batch["txt_ids"][0],
        return_dict=False,
        **refs,
    )[0]
    out = mixed_forward(transformer, **batch)
    assert all(torch.equal(o, s) for o, s in zip(out, stock, strict=True))
    assert not hasattr(transformer.pos_embed, "stock"), "the stock path must not install anything"


@torch.no_grad()
@pytest.mark.parametrize("device, dtype, backend", backend_cases(with_auto=False))
def test_mixed_batch_matches_each_sample_alone(transformer, device, dtype, backend):
    """CPU fp32 within 1e-5; on CUDA (fp32, and bf16 with varlen too) within the stock path's own kernel spread."""
    transformer.to(device, dtype)
    batch = to_device(make_batch(transformer, MIXED), device, dtype, keep_dtype=IDS)
    install_mixed(transformer, backend)
    check_backend_runs(backend, device, dtype)
    out = mixed_forward(transformer, **batch)
    for i, o in enumerate(out):
        assert o.shape == (len(batch["img_ids"][i]), FLUX3_TRANSFORMER["in_channels"])
    check_matches_stock(out, lambda i: stock_single(transformer, batch, i), dtype)


@torch.no_grad()
def test_flow_map_mixed_batch_matches_each_sample_alone():
    """A step-distilled (flow-map) transformer: each sample's own target timestep reaches every stream."""
    transformer = seeded(0, lambda: Flux3Transformer2DModel(**FLUX3_TRANSFORMER, flow_map=True)).eval()
    batch = make_batch(transformer, MIXED) | {"target_timestep": torch.tensor([0.1, 0.5, 0.0])}
    for i, o in enumerate(mixed_forward(transformer, **batch)):
        assert (o - stock_single(transformer, batch, i)).abs().max().item() <= 1e-5


@torch.no_grad()
def test_same_token_counts_other_positions_take_mixed_path(transformer):
    """Equal token counts with other positions (grids transposed, references swapped, text equal) are not stacked."""
    batch = make_batch(transformer, [((4, 6), [(2, 3), (3, 2)], 80), ((6, 4), [(3, 2), (2, 3)], 80)])
    out = mixed_forward(transformer, **batch)
    for i in range(2):
        assert (out[i] - stock_single(transformer, batch, i)).abs().max().item() <= 1e-5


@torch.no_grad()
def test_stock_calls_unchanged_after_install(transformer):
    batch = make_batch(transformer, MIXED[1:2])
    before = stock_single(transformer, batch, 0)
    mixed_forward(transformer, **make_batch(transformer, MIXED))  # installs, runs a mixed batch
    assert torch.equal(stock_single(transformer, batch, 0), before)


@pytest.mark.parametrize("device, dtype, backend", backend_cases(with_auto=False))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_gradients_equal_sum_of_per_sample_gradients(transformer, device, dtype, backend, checkpointing):
    transformer.to(device, dtype)
    batch = to_device(make_batch(transformer, MIXED), device, dtype, keep_dtype=IDS)
    check_backend_runs(backend, device, dtype)
    grads = check_lora_gradients(
        transformer,
        backend,
        checkpointing,
        install_mixed,
        padded_forward,
        stock_single,
        batch,
        transformer.x_embedders["image"],
        LORA_TARGETS,
    )
    config = transformer.config
    blocks = 3 * config.num_layers + config.num_single_layers  # text, target and reference per-mode blocks, joint
    assert len(grads) == 2 * len(LORA_TARGETS) * blocks
    assert all(g.isfinite().all() for g in grads.values())


def test_every_linear_reaches_the_loss(transformer):
    """Every linear, of every stream's per-mode blocks, the joint blocks, the embedders and the modulations, gets a
    gradient from a target-token loss on a mixed batch (a LoRA on any of them trains, as DDP requires)."""
    linears = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=linears))
    randomize_lora(transformer)
    out, valid = padded_forward(transformer, **make_batch(transformer, MIXED))
    out[valid].square().sum().backward()
    lora = {n: p for n, p in transformer.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * len(linears)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())


def _image(width: int, height: int) -> Image.Image:
    """A deterministic RGB gradient image."""
    pixels = np.arange(width * height * 3, dtype=np.int64).reshape(height, width, 3) % 256
    return Image.fromarray(pixels.astype(np.uint8))


@torch.no_grad()
def test_pipeline_call_equals_its_sample_in_a_mixed_batch(tiny_checkpoint):
    """The stock modular pipeline's own transformer call (2 references) has the ids, text and reference tokens our
    encoding and helpers build, and mixed_forward reproduces its output inside a mixed batch."""
    pipe = FLUX3_KLEIN.load_pipeline(str(tiny_checkpoint("flux3_klein")))
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda _, args, kwargs, out: calls.append((kwargs, out[0])), with_kwargs=True
    )
    images = [_image(96, 64), _image(64, 128)]
    prompt = "Make the sky blue"
    pipe(prompt=prompt, image=images, height=64, width=96, num_inference_steps=1, output="images")
    hook.remove()
    kwargs, expected = calls[0]  # the conditional prediction (CFG's unconditional one follows)
    assert torch.equal(kwargs["img_ids"], image_ids(4, 6))
    assert torch.equal(kwargs["image_cond_ids"], reference_ids([(4, 6), (8, 4)]))
    assert torch.equal(kwargs["txt_ids"], text_ids(80))
    embeds = encode_prompt(pipe, prompt, [], None, torch.device("cpu"))["prompt_embeds"]
    assert torch.equal(kwargs["encoder_hidden_states"][0], embeds)
    processed = [pipe.image_processor.preprocess(image, resize_mode="crop")[0] for image in images]
    references = torch.cat([pack_latents(encode_image(pipe, image)) for image in processed])
    assert torch.equal(kwargs["image_cond_hidden_states"][0], references)

    second = make_batch(pipe.transformer, [((3, 5), [], 160)])
    batch = {key: [kwargs[key][0], *second[key]] for key in ("hidden_states", "encoder_hidden_states")}
    batch |= {
        "img_ids": [kwargs["img_ids"], *second["img_ids"]],
        "txt_ids": [kwargs["txt_ids"], *second["txt_ids"]],
        "timestep": torch.cat([kwargs["timestep"], second["timestep"]]),
        "image_cond_hidden_states": [references, *second["image_cond_hidden_states"]],
        "image_cond_ids": [kwargs["image_cond_ids"], *second["image_cond_ids"]],
    }
    out = mixed_forward(pipe.transformer, **batch)
    assert (out[0] - expected[0]).abs().max().item() <= 1e-5
