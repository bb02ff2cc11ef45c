"""Encoding a prepared sample gives exactly the conditioning the stock pipelines compute at inference."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline, FluxKontextPipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE,
    VAE_IMAGE_SIZE,
    calculate_dimensions,
)

from common.batch import latent_shape_to_tokens, pack_latents
from common.encoders import Encoders, encode_row, load_encoders
from common.models import MODELS

PIPELINES = {name: model.pipeline_class for name, model in MODELS.items()}

PROMPT = "Make the sky blue and add a small red dog."
LONG_PROMPT = "Turn the cat into a tiger sitting on a wooden chair. Remove the person in the background."
QWEN_MODELS = ("qwen_edit", "qwen_edit_plus", "qwen_edit_2511")


def _image(width: int, height: int, seed: int) -> PIL.Image.Image:
    """A random RGB image."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def _pixels(height: int, width: int, seed: int) -> torch.Tensor:
    """A random (1, 3, H, W) batch in [-1, 1], made by the pipelines' image processor (so in its memory layout)."""
    array = np.random.default_rng(seed).random((1, height, width, 3), dtype=np.float32)
    return VaeImageProcessor(vae_scale_factor=16).preprocess(array)


def _sample(target: torch.Tensor, controls: list[torch.Tensor], condition_images: list, prompt: str = PROMPT) -> Any:
    """A stand-in for common.data.PreparedSample."""
    return SimpleNamespace(
        index=0,
        sample_id="s0",
        prompt=prompt,
        target=target,
        controls=controls,
        condition_images=condition_images,
        mask=None,
        sources={},
    )


def _capture_transformer_inputs(pipe: DiffusionPipeline, **kwargs: Any) -> dict[str, Any]:
    """Run the stock pipeline for one step and return the keyword arguments its transformer was called with."""
    seen: dict[str, Any] = {}

    def hook(module: torch.nn.Module, args: tuple, hook_kwargs: dict[str, Any]) -> None:
        seen.update(hook_kwargs)

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs)
    finally:
        handle.remove()
    return seen


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint: Any) -> dict[str, DiffusionPipeline]:
    """Each model's complete stock pipeline (with its transformer), as used for inference."""
    out = {model: cls.from_pretrained(tiny_checkpoint(model)) for model, cls in PIPELINES.items()}
    for pipe in out.values():
        pipe.set_progress_bar_config(disable=True)
    return out


@pytest.fixture(scope="module")
def encoders(tiny_checkpoint: Any) -> dict[str, Encoders]:
    """Each model's encoders, loaded the way training loads them."""
    return {model: load_encoders(model, str(tiny_checkpoint(model))) for model in PIPELINES}


def test_pack_latents_matches_pipelines() -> None:
    latents = torch.randn(16, 6, 10, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    for cls in (FluxKontextPipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline):
        assert torch.equal(packed, cls._pack_latents(latents[None], 1, 16, 6, 10)[0])
    assert packed.shape == (15, 64)
    assert latent_shape_to_tokens(latents.shape) == (3, 5)
    with pytest.raises(ValueError):
        latent_shape_to_tokens((16, 6, 9))


def test_encoders_are_frozen_without_transformer(encoders: dict[str, Encoders]) -> None:
    for enc in encoders.values():
        assert enc.pipe.transformer is None
        modules = [m for m in enc.pipe.components.values() if isinstance(m, torch.nn.Module)]
        assert modules and all(not m.training for m in modules)
        assert not any(p.requires_grad for m in modules for p in m.parameters())


def test_flux_matches_pipeline_methods(encoders: dict[str, Encoders], pipes: dict[str, DiffusionPipeline]) -> None:
    pipe, enc = pipes["flux_kontext"], encoders["flux_kontext"]
    target, control = _pixels(64, 96, seed=1), _pixels(48, 48, seed=2)
    out = enc.encode(_sample(target[0], [control[0]], []))

    assert set(out) == {"prompt_embeds", "pooled_prompt_embeds", "target_latents", "control_latents"}
    assert out["prompt_embeds"].shape == (512, 32) and out["pooled_prompt_embeds"].shape == (32,)
    assert out["target_latents"].shape == (16, 8, 12) and out["control_latents"][0].shape == (16, 6, 6)

    with torch.no_grad():  # as in the pipeline's __call__ (grad mode changes T5's last bits on CPU)
        embeds, pooled, _ = pipe.encode_prompt(PROMPT, prompt_2=None)
        assert torch.equal(out["prompt_embeds"], embeds[0]) and torch.equal(out["pooled_prompt_embeds"], pooled[0])
        assert torch.equal(out["target_latents"], pipe._encode_vae_image(target, generator=None)[0])
        _, image_latents, _, _ = pipe.prepare_latents(control, 1, 16, 64, 96, torch.float32, "cpu", None)
        short = pipe.encode_prompt(PROMPT, max_sequence_length=64)[0][0]
    assert torch.equal(pack_latents(out["control_latents"][0]), image_latents[0])
    short_enc = Encoders("flux_kontext", enc.pipe, max_sequence_length=64)
    assert torch.equal(short_enc.encode_prompt(PROMPT)["prompt_embeds"], short) and short.shape == (64, 32)
    with pytest.raises(ValueError):
        enc.encode_prompt(PROMPT, [_image(16, 16, seed=0)])
    with pytest.raises(ValueError):
        enc.encode_image(torch.zeros(3, 40, 48))
    # Same bits whatever the input's memory layout (convolutions round differently by layout).
    assert torch.equal(enc.encode_image(target[0].contiguous()), out["target_latents"])


def test_flux_equals_stock_inference_inputs(encoders: dict[str, Encoders], pipes: dict[str, DiffusionPipeline]) -> None:
    pipe = pipes["flux_kontext"]
    control_image = _image(48, 32, seed=3)
    control = pipe.image_processor.preprocess(control_image, 32, 48)[0]
    out = encoders["flux_kontext"].encode(_sample(_pixels(64, 96, seed=4)[0], [control], []))

    seen = _capture_transformer_inputs(
        pipe, image=control_image, prompt=PROMPT, height=64, width=96, max_area=64 * 96, _auto_resize=False
    )
    assert torch.equal(seen["encoder_hidden_states"][0], out["prompt_embeds"])
    assert torch.equal(seen["pooled_projections"][0], out["pooled_prompt_embeds"])
    n_target = math.prod(latent_shape_to_tokens(out["target_latents"].shape))
    assert torch.equal(seen["hidden_states"][0, n_target:], pack_latents(out["control_latents"][0]))


@pytest.mark.parametrize("model", QWEN_MODELS)
def test_qwen_matches_pipeline_methods(
    model: str, encoders: dict[str, Encoders], pipes: dict[str, DiffusionPipeline]
) -> None:
    pipe, enc = pipes[model], encoders[model]
    n_images = 1 if model == "qwen_edit" else 2
    condition_images = [_image(64, 64, seed=10 + k) for k in range(n_images)]
    controls = [_pixels(64, 64, seed=20 + k) for k in range(n_images)]
    target = _pixels(64, 96, seed=5)
    out = enc.encode(_sample(target[0], [c[0] for c in controls], condition_images))

    assert set(out) == {"prompt_embeds", "target_latents", "control_latents"}
    assert out["target_latents"].shape == (16, 8, 12)
    assert [c.shape for c in out["control_latents"]] == [(16, 8, 8)] * n_images

    image = condition_images[0] if model == "qwen_edit" else condition_images
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(PROMPT, image=image)
    assert mask is None or mask.all()
    assert out["prompt_embeds"].ndim == 2 and torch.equal(out["prompt_embeds"], embeds[0])

    with torch.no_grad():
        latents = pipe._encode_vae_image(target[:, :, None], generator=None)
        assert torch.equal(out["target_latents"], latents[0, :, 0])
        vae_images = [c[:, :, None] for c in controls]
        if model == "qwen_edit":
            vae_images = vae_images[0]
        _, image_latents = pipe.prepare_latents(vae_images, 1, 16, 64, 96, torch.float32, "cpu", None)
    assert torch.equal(torch.cat([pack_latents(c) for c in out["control_latents"]]), image_latents[0])


@pytest.mark.parametrize("model", QWEN_MODELS)
def test_qwen_prompt_embeds_depend_on_images_and_prompt(model: str, encoders: dict[str, Encoders]) -> None:
    enc = encoders[model]
    n_images = 1 if model == "qwen_edit" else 2
    images = [_image(64, 64, seed=30 + k) for k in range(n_images)]
    other = [_image(64, 64, seed=40), *images[1:]]
    base = enc.encode_prompt(PROMPT, images)["prompt_embeds"]

    changed = enc.encode_prompt(PROMPT, other)["prompt_embeds"]
    assert changed.shape == base.shape and not torch.allclose(changed, base)

    longer = enc.encode_prompt(LONG_PROMPT, images)["prompt_embeds"]
    assert longer.shape[0] > base.shape[0]
    empty = enc.encode_prompt("", images)["prompt_embeds"]
    assert empty.shape[0] < base.shape[0]

    without = enc.encode_prompt(PROMPT, [])["prompt_embeds"]
    assert without.shape[0] < base.shape[0]
    with pytest.raises(ValueError):
        enc.encode(_sample(_pixels(64, 64, seed=0)[0], [], images))
    if model == "qwen_edit":
        with pytest.raises(ValueError):
            enc.encode_prompt(PROMPT, images * 2)


@pytest.mark.parametrize("model", QWEN_MODELS)
def test_qwen_prompt_without_image_is_edit_plus_text_only(
    model: str, encoders: dict[str, Encoders], pipes: dict[str, DiffusionPipeline]
) -> None:
    """A row without control encodes its prompt as Edit-Plus's encode_prompt(image=None), the only stock path."""
    pipe, stock = pipes[model], None
    if model == "qwen_edit":
        # Edit's template holds an image placeholder: transformers 5.23's processor refuses to leave it empty, 5.17's
        # encodes the bare placeholder tokens (checked below) ...
        try:
            with torch.no_grad():
                stock = pipe.encode_prompt(PROMPT, image=None)[0]
        except ValueError as error:
            assert "no images were passed" in str(error)
        # ... and without its vision block it is Edit-Plus's template, which Edit-Plus fills with no "Picture k".
        text_only = QwenImageEditPlusPipeline(**pipe.components)
        vision = "<|vision_start|><|image_pad|><|vision_end|>"
        assert pipe.prompt_template_encode.replace(vision, "") == text_only.prompt_template_encode
    else:
        text_only = pipe
    for prompt in (PROMPT, ""):
        with torch.no_grad():
            embeds, mask = text_only.encode_prompt(prompt, image=None)
        assert mask is None and embeds.shape[0] == 1
        if stock is not None and prompt == PROMPT:  # vision start, image pad and vision end: not a text-only prompt
            assert stock.shape[1] == embeds.shape[1] + 3
        got = encoders[model].encode_prompt(prompt, [])["prompt_embeds"]
        assert got.shape == embeds[0].shape and torch.equal(got, embeds[0])


@pytest.mark.parametrize(("model", "n_controls"), [("flux_kontext", 1), ("qwen_edit", 0), ("qwen_edit", 1)])
def test_encode_row_adds_shapes_ids_and_empty_prompt(
    model: str, n_controls: int, encoders: dict[str, Encoders]
) -> None:
    enc = encoders[model]
    controls = [_pixels(48, 80, seed=60)[0]][:n_controls]
    condition_images = [] if model == "flux_kontext" else [_image(80, 48, seed=61)][:n_controls]
    sample = _sample(_pixels(64, 96, seed=62)[0], controls, condition_images)
    sample.mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(0))
    sample.sources = {"image": "t.png"}
    row = encode_row(enc, sample)
    fresh = enc.encode(sample)
    assert set(row) == set(fresh) | {"sample_id", "mask", "img_shapes", "sources"} | (
        set() if model == "flux_kontext" else {"empty_prompt_embeds"}
    )
    assert all(torch.equal(row[k], fresh[k]) for k in fresh if k != "control_latents")
    assert all(torch.equal(a, b) for a, b in zip(row["control_latents"], fresh["control_latents"], strict=True))
    assert row["img_shapes"] == [[1, 4, 6]] + [[1, 3, 5]] * n_controls
    assert (row["sample_id"], row["sources"]) == ("s0", {"image": "t.png"}) and row["mask"] is sample.mask
    if model != "flux_kontext":
        empty = enc.encode_prompt("", condition_images)["prompt_embeds"]
        assert torch.equal(row["empty_prompt_embeds"], empty)


# One step makes the Qwen scheduler's terminal stretch divide 0 by 0; only the transformer's inputs matter here.
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("model", ["qwen_edit", "qwen_edit_plus"])  # 2511 shares Plus's pipeline and encoders
def test_qwen_equals_stock_inference_inputs(
    model: str, encoders: dict[str, Encoders], pipes: dict[str, DiffusionPipeline]
) -> None:
    """Inputs prepared as the pipeline prepares them encode to exactly what its transformer receives."""
    pipe = pipes[model]
    # One image each: the VAE always sees ~1 MP here, which is slow on CPU (several images: the test above).
    raw = [_image(96, 64, seed=50)] if model == "qwen_edit" else [_image(64, 96, seed=51)]
    condition_images, controls = [], []
    for img in raw:
        vae_w, vae_h = calculate_dimensions(VAE_IMAGE_SIZE, img.width / img.height)
        controls.append(pipe.image_processor.preprocess(img, vae_h, vae_w)[0])
        if model == "qwen_edit":  # the VL encoder sees the control at its VAE size
            condition_images.append(pipe.image_processor.resize(img, vae_h, vae_w))
        else:  # one ~384x384 "Picture k" per image
            cond_w, cond_h = calculate_dimensions(CONDITION_IMAGE_SIZE, img.width / img.height)
            condition_images.append(pipe.image_processor.resize(img, cond_h, cond_w))
    out = encoders[model].encode(_sample(_pixels(64, 96, seed=6)[0], controls, condition_images))

    image = raw[0] if model == "qwen_edit" else raw
    seen = _capture_transformer_inputs(pipe, image=image, prompt=PROMPT, height=64, width=96, true_cfg_scale=1.0)
    assert torch.equal(seen["encoder_hidden_states"][0], out["prompt_embeds"])
    n_target = math.prod(latent_shape_to_tokens(out["target_latents"].shape))
    packed = torch.cat([pack_latents(c) for c in out["control_latents"]])
    assert torch.equal(seen["hidden_states"][0, n_target:], packed)
