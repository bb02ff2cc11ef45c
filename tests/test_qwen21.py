"""common.qwen21 against the stock diffusers Qwen-Image 2.1 transformer run on each sample alone (the oracle)."""

import math

import pytest
import torch
from conftest import check_matches_stock, lora_grads, randomize_lora, reduce_base, relative_error, to_device
from diffusers import QwenImage21Pipeline, QwenImage21Transformer2DModel
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_dimensions
from peft import LoraConfig
from PIL import Image

from common.batch import NoisyBatch, pack_latents
from common.models.qwen_image21 import QWEN_IMAGE21, split_prompt
from common.qwen21 import install_mixed, mixed_forward, padded_forward, target_slots
from common.tiny_components import QWEN21_TRANSFORMER, seeded

# Each sample: its prompt as text runs and condition images (latent grids) in order, then its target grid. Counts of
# 0, 1 and 2 references of other sizes than their targets, at other slot positions, two of them adjacent (separate
# image blocks without text between them), and prompts of different lengths.
MIXED = [
    ([5], (1, 4, 6)),
    ([3, (1, 2, 4), 4], (1, 6, 2)),
    ([2, (1, 4, 2), 1, (1, 2, 2), 3], (1, 2, 2)),
    ([2, (1, 2, 2), (1, 2, 4), 2], (1, 4, 4)),
]
# Sample 2's prompt is right-padded by two tokens that must not be attended to (the stock mask semantics).
PADDED_PROMPT = 2
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out"]


def tiny(causal_condition):
    """The tiny 2.1 transformer, with or without `causal_condition` (t = 0 rows for text and condition tokens)."""
    config = {**QWEN21_TRANSFORMER, "causal_condition": causal_condition}
    return seeded(0, lambda: QwenImage21Transformer2DModel(**config)).eval()


@pytest.fixture(scope="module", params=[True, False], ids=["causal_condition", "plain"])
def transformer(request):
    return tiny(request.param)


def make_batch(layouts, seed=0, text_masks=False):
    """Per-sample stock inputs: image tokens (condition images, then target), text rows, img_mask and img_shapes."""
    g = torch.Generator().manual_seed(seed)
    config = QWEN21_TRANSFORMER
    batch = {k: [] for k in ("hidden_states", "encoder_hidden_states", "img_mask", "img_shapes")}
    masks = []
    for runs, target in layouts:
        slots = []
        for run in runs:
            slots += [False] * run if isinstance(run, int) else [True] * (math.prod(run) // 4)
        shapes = [run for run in runs if not isinstance(run, int)] + [target]
        batch["hidden_states"].append(torch.randn(sum(map(math.prod, shapes)), config["in_channels"], generator=g))
        batch["encoder_hidden_states"].append(torch.randn(len(slots), config["context_in_dim"], generator=g))
        batch["img_mask"].append(target_slots(torch.tensor(slots), math.prod(target)))
        batch["img_shapes"].append(shapes)
        masks.append(None)
    if text_masks:
        masks[2] = torch.ones(batch["encoder_hidden_states"][2].shape[0], dtype=torch.bool)
        masks[2][-PADDED_PROMPT:] = False
        batch["encoder_hidden_states_mask"] = masks
    batch["timestep"] = torch.rand(len(layouts), generator=g)
    return batch


def stock_single(transformer, batch, i):
    """The oracle: sample i alone, unpadded, through the stock forward as the pipeline calls it."""
    masks = batch.get("encoder_hidden_states_mask") or [None] * len(batch["hidden_states"])
    return transformer(
        hidden_states=batch["hidden_states"][i][None],
        encoder_hidden_states=batch["encoder_hidden_states"][i][None],
        encoder_hidden_states_mask=None if masks[i] is None else masks[i][None],
        timestep=batch["timestep"][i : i + 1],
        img_shapes=[batch["img_shapes"][i]],
        img_mask=batch["img_mask"][i][None],
        return_dict=False,
    )[0][0]


@torch.no_grad()
def test_mixed_batch_matches_each_sample_alone(transformer):
    batch = make_batch(MIXED, text_masks=True)
    out, valid = padded_forward(transformer, **batch)
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid])), "padded outputs must be exactly zero"
    for i, o in enumerate(mixed_forward(transformer, **batch)):
        expected = stock_single(transformer, batch, i)
        assert o.shape == expected.shape
        assert (o - expected).abs().max().item() <= 1e-5


@torch.no_grad()
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal_condition", [True, False], ids=["causal_condition", "plain"])
def test_mixed_batch_matches_each_sample_alone_on_cuda(causal_condition, dtype):
    """On the GPU, with the trainers' SDPA kernels: fp32 within 1e-5, bf16 within the stock path's kernel spread."""
    transformer = tiny(causal_condition).to("cuda", dtype)
    batch = to_device(make_batch(MIXED, text_masks=True), "cuda", dtype)
    out = mixed_forward(transformer, **batch)
    check_matches_stock(out, lambda i: stock_single(transformer, batch, i), dtype)


@torch.no_grad()
def test_single_sample_and_equal_layouts_are_bitwise_stock(transformer):
    one = make_batch(MIXED[1:2])
    assert torch.equal(mixed_forward(transformer, **one)[0], stock_single(transformer, one, 0))
    batch = make_batch([MIXED[2]] * 3)
    stock = transformer(
        hidden_states=torch.stack(batch["hidden_states"]),
        encoder_hidden_states=torch.stack(batch["encoder_hidden_states"]),
        timestep=batch["timestep"],
        img_shapes=batch["img_shapes"],
        img_mask=torch.stack(batch["img_mask"]),
        return_dict=False,
    )[0]
    assert all(torch.equal(o, s) for o, s in zip(mixed_forward(transformer, **batch), stock, strict=True))


@torch.no_grad()
def test_stock_calls_unchanged_after_install(transformer):
    batch = make_batch([MIXED[2]] * 2, text_masks=False)
    text_len = batch["encoder_hidden_states"][0].shape[0]
    batch["encoder_hidden_states_mask"] = [torch.arange(text_len) < text_len - 1] * 2

    def stock_batch():
        return transformer(
            hidden_states=torch.stack(batch["hidden_states"]),
            encoder_hidden_states=torch.stack(batch["encoder_hidden_states"]),
            encoder_hidden_states_mask=torch.stack(batch["encoder_hidden_states_mask"]),
            timestep=batch["timestep"],
            img_shapes=batch["img_shapes"],
            img_mask=torch.stack(batch["img_mask"]),
            return_dict=False,
        )[0]

    before = stock_batch(), stock_single(transformer, batch, 0)
    install_mixed(transformer, "auto")
    assert torch.equal(stock_batch(), before[0]) and torch.equal(stock_single(transformer, batch, 0), before[1])


@torch.no_grad()
@pytest.mark.parametrize("option", ["fp8", "offload"])
def test_mixed_batch_on_a_reduced_base_matches_each_sample_alone(option):
    """--base_precision fp8 / --offload_blocks: the mixed batch equals the stock model with the same option."""
    transformer = tiny(True)
    reduce_base(transformer, option)
    stored = {m.weight.dtype for m in transformer.transformer_blocks.modules() if isinstance(m, torch.nn.Linear)}
    assert stored == ({torch.float8_e4m3fn} if option == "fp8" else {torch.float32})
    batch = make_batch(MIXED)
    for i, o in enumerate(mixed_forward(transformer, **batch)):
        assert (o - stock_single(transformer, batch, i)).abs().max().item() <= 1e-5


def test_token_counts_must_match(transformer):
    batch = make_batch(MIXED)
    batch["hidden_states"][1] = batch["hidden_states"][1][:-1]
    with pytest.raises(ValueError, match="sample 1"):
        mixed_forward(transformer, **batch)
    batch = make_batch(MIXED)
    batch["img_mask"][3] = batch["img_mask"][3][1:]
    with pytest.raises(ValueError, match="sample 3"):
        mixed_forward(transformer, **batch)


@pytest.mark.parametrize("causal_condition, checkpointing", [(True, True), (False, False)])
def test_lora_gradients_equal_sum_of_per_sample_gradients(causal_condition, checkpointing):
    """Mixed-batch LoRA gradients on every linear of the blocks equal the sum of the per-sample stock gradients;
    padded joint rows get exactly zero gradient, real rows a finite nonzero one. (Each modulation variant once, one
    of them through gradient checkpointing, which calls the blocks positionally.)"""
    transformer = tiny(causal_condition)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    randomize_lora(transformer)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    batch = make_batch(MIXED, seed=1, text_masks=True)
    for h in batch["hidden_states"]:
        h.requires_grad_(True)
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(m.shape[0] + 3 * int(m.sum()), 16, generator=g) for m in batch["img_mask"]]
    captured = {}

    def keep_joint_input(module, args):
        args[0].retain_grad()
        captured.setdefault("joint", args[0])

    hook = transformer.transformer_blocks[0].img_norm1.register_forward_pre_hook(keep_joint_input)
    out, valid = padded_forward(transformer, **batch)
    hook.remove()
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))
    sum((o[: w.shape[0]] * w).sum() for o, w in zip(out, weights, strict=True)).backward()
    joint_grad = captured["joint"].grad
    assert torch.equal(joint_grad[~valid], torch.zeros_like(joint_grad[~valid]))
    assert joint_grad[valid].isfinite().all() and joint_grad[valid].abs().sum() > 0
    mixed = lora_grads(transformer)
    transformer.zero_grad()
    for i, w in enumerate(weights):
        (stock_single(transformer, batch, i) * w).sum().backward()
    summed = lora_grads(transformer)
    assert len(mixed) == 2 * len(LORA_TARGETS) * transformer.config.num_layers
    for name, grad in mixed.items():
        assert summed[name].abs().sum() > 0, name
        assert relative_error(grad, summed[name]) <= 1e-5, name


@torch.no_grad()
def test_dropped_references_are_invisible_and_others_stay_exact(transformer):
    """Control dropout: a dropped sample's target does not depend on its condition tokens (they stay in place, but
    nothing attends to them; the stock forward cannot express this, so the oracle is invariance), while the other
    samples of the batch still equal the stock model alone."""
    batch = make_batch(MIXED)
    drop = [False, True, False, True]
    out = mixed_forward(transformer, **batch, drop_references=drop)
    changed = {**batch, "hidden_states": [h.clone() for h in batch["hidden_states"]]}
    for i in (1, 3):
        target = math.prod(batch["img_shapes"][i][-1])
        changed["hidden_states"][i][:-target] += 1.0
    out_changed = mixed_forward(transformer, **changed, drop_references=drop)
    for i in (1, 3):
        target = math.prod(batch["img_shapes"][i][-1])
        assert torch.equal(out[i][-target:], out_changed[i][-target:])
        assert (out[i][-target:] - stock_single(transformer, batch, i)[-target:]).abs().max() > 1e-3
    for i in (0, 2):
        assert (out[i] - stock_single(transformer, batch, i)).abs().max().item() <= 1e-5


def _image(width, height, seed):
    """A deterministic RGB noise image."""
    pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.to(torch.uint8).numpy())


@torch.no_grad()
def test_pipeline_call_is_what_the_model_encodes_and_predicts(tiny_checkpoint):
    """QwenImage21Pipeline's own transformer call (2 condition images) gets exactly the text rows, slot mask and
    packed latents our encoding produces, and `predict` reproduces its target prediction inside a mixed batch."""
    pipe = QwenImage21Pipeline.from_pretrained(tiny_checkpoint("qwen_image21"))
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda _, args, kwargs, out: calls.append((kwargs, out[0])), with_kwargs=True
    )
    images = [_image(96, 64, 0), _image(64, 128, 1)]
    prompt = "Make the sky blue"
    pipe(prompt=prompt, image=images, output_resolution=64, num_inference_steps=2, output_type="latent",
         generator=torch.Generator().manual_seed(0), use_kv_cache=False)  # fmt: skip
    hook.remove()
    kwargs, expected = calls[0]
    sizes = [calculate_dimensions(64 * 64, image.size[0] / image.size[1])[:2] for image in images]
    assert sizes == [(64, 64), (32, 96)]  # what output_resolution=64 makes of them
    resized = [image.resize(size, Image.Resampling.LANCZOS) for image, size in zip(images, sizes, strict=True)]
    text, slots = split_prompt(QWEN_IMAGE21.encode_prompt(pipe, prompt, resized, None, torch.device("cpu"))[
        "prompt_embeds"])  # fmt: skip
    assert torch.equal(text, kwargs["encoder_hidden_states"][0])
    assert torch.equal(target_slots(slots, 2 * 6), kwargs["img_mask"][0])
    pixels = [
        pipe.image_processor.preprocess(image, height=h, width=w) for image, (w, h) in zip(images, sizes, strict=True)
    ]
    references = [pack_latents(QWEN_IMAGE21.encode_image(pipe, x)) for x in pixels]
    noisy = kwargs["hidden_states"][0, -12:]
    assert torch.equal(torch.cat([*references, noisy]), kwargs["hidden_states"][0])
    other = make_batch(MIXED[:1])
    batch = NoisyBatch(
        sample_ids=["pipeline", "other"],
        noisy=[noisy, other["hidden_states"][0][:, :16]],
        references=[references, []],
        img_shapes=[[(1, 6, 2), (1, 4, 4), (1, 6, 2)], [(1, 4, 6)]],
        prompt_embeds=[
            torch.cat([text, slots[:, None].float()], dim=-1),
            torch.cat([other["encoder_hidden_states"][0], torch.zeros(5, 1)], dim=-1),
        ],
        pooled_prompt_embeds=None,
        sigmas=torch.cat([kwargs["timestep"], torch.tensor([0.3])]),
        attend=[12 + 16 + 12, 24],
    )
    prediction = QWEN_IMAGE21.predict(pipe.transformer, batch, None)
    assert (prediction[0] - expected[0, -12:]).abs().max().item() <= 1e-5
