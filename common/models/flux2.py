"""FLUX.2 [klein] (Qwen3 text encoder, no guidance embedding) and [dev] (Mistral3 text encoder, guidance-distilled):
0..n reference images per sample, each with its own size.

Sample i is its target's packed tokens followed by each reference's, with 4-axis ids (t, h, w, l): the target at
t = 0, reference k at t = 10 (k + 1), exactly as `Flux2KleinPipeline` / `Flux2Pipeline` build them; samples of
different sizes and reference counts share a batch through `common.flux2.padded_forward`, equal layouts take the
stock forward. Encoding is the pipelines' own: the prompt padded to `max_sequence_length` (512) through the chat
template, three hidden layers stacked (the text encoder never sees the images); each image through
`_encode_vae_image` (VAE mode, 2x2 patchify, batch-norm normalisation), stored un-patchified as (C, h, w) so the
shared 2x2 packing gives the pipelines' packed tokens bit for bit.

Timestep shift: the pipelines set mu with `compute_empirical_mu(target tokens, inference steps)`; training uses
their default step count, `TRAINING_SHIFT_STEPS` = 50, validation its own `--validation_inference_steps`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import PIL.Image
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from torch import Tensor, nn

from common import flux2
from common.attention import base_model
from common.batch import NoisyBatch
from common.flux_comfyui import DOUBLE_BLOCK_ATTENTION, BflLayout
from common.models.base import EditModel, HubDescription
from common.resolution import ResizePlan
from common.tiny_components import FLUX2_TRANSFORMER, flux2_dev_components, flux2_klein_components

# `multiple_of = vae_scale_factor * 2` in both pipelines' __call__ (8x VAE, 2x2 patches).
MULTIPLE = 16
# References above this area are scaled down to it by the pipelines (`_resize_to_target_area(img, 1024 * 1024)`).
REFERENCE_MAX_AREA = 1024 * 1024
# Inference steps whose `compute_empirical_mu` shifts the training sigmas: the pipelines' default
# `num_inference_steps`. (mu grows with the step count below 4300 target tokens; above, it does not depend on it.)
TRAINING_SHIFT_STEPS = 50
# Every linear of both streams of every block, not the modulation: double blocks' attention and MLPs, single
# blocks' fused qkv+MLP input and their output. `attn.to_out` names the single blocks' output linear; in double
# blocks it is the [linear, dropout] list, which `common.lora.adapted_modules` leaves to `attn.to_out.0`.
LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
    "attn.to_qkv_mlp_proj",
    "attn.to_out",
)
# ComfyUI runs FLUX.2 as BFL's model (`comfy.ldm.flux`): the names diffusers' own FLUX.2 LoRA converter
# (`_convert_non_diffusers_flux2_lora_to_diffusers`) reads. Unlike FLUX.1, the single blocks' linear1 is already
# fused in diffusers (`to_qkv_mlp_proj`), so only the double blocks' q/k/v are fused.
COMFYUI_LAYOUT = BflLayout(
    double={
        **DOUBLE_BLOCK_ATTENTION,
        "ff.linear_in": ("img_mlp.0", 0),
        "ff.linear_out": ("img_mlp.2", 0),
        "ff_context.linear_in": ("txt_mlp.0", 0),
        "ff_context.linear_out": ("txt_mlp.2", 0),
    },
    single={"attn.to_qkv_mlp_proj": ("linear1", 0), "attn.to_out": ("linear2", 0)},
    top={
        "x_embedder": ("img_in", 0),
        "context_embedder": ("txt_in", 0),
        "time_guidance_embed.timestep_embedder.linear_1": ("time_in.in_layer", 0),
        "time_guidance_embed.timestep_embedder.linear_2": ("time_in.out_layer", 0),
        "time_guidance_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", 0),
        "time_guidance_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", 0),
        "double_stream_modulation_img.linear": ("double_stream_modulation_img.lin", 0),
        "double_stream_modulation_txt.linear": ("double_stream_modulation_txt.lin", 0),
        "single_stream_modulation.linear": ("single_stream_modulation.lin", 0),
        "proj_out": ("final_layer.linear", 0),
        "norm_out.linear": ("final_layer.adaLN_modulation.1", 0),
    },
    fused_rows={"qkv": (1, 1, 1)},
)


def add_args(parser: argparse.ArgumentParser) -> None:
    """[klein]'s trainer flags: the text length (the pipelines pad every prompt to it)."""
    parser.add_argument("--max_sequence_length", type=int, default=512, help="text tokens, as in the cache")


def add_dev_args(parser: argparse.ArgumentParser) -> None:
    """[dev]'s trainer flags: the text length and the distilled guidance value."""
    add_args(parser)
    parser.add_argument(
        "--guidance_scale", type=float, default=4.0, help="guidance embedding value (Flux2Pipeline's default 4.0)"
    )


def reference_plan(width: int, height: int) -> ResizePlan:
    """What both pipelines' __call__ do to a reference of width x height: scale it down to 1024*1024 when larger
    (`Flux2ImageProcessor._resize_to_target_area`, int truncation), then centre-crop each side to a multiple of 16
    (`preprocess(..., resize_mode="crop")`, a plain crop in `Flux2ImageProcessor`). As a crop of the original then a
    resize: pixel-exact up to 1 MP (a crop, no resampling); above, the same region resampled once."""
    scaled_w, scaled_h = width, height
    if width * height > REFERENCE_MAX_AREA:
        scale = math.sqrt(REFERENCE_MAX_AREA / (width * height))
        scaled_w, scaled_h = int(width * scale), int(height * scale)
    w, h = max(scaled_w // MULTIPLE * MULTIPLE, MULTIPLE), max(scaled_h // MULTIPLE * MULTIPLE, MULTIPLE)
    left, top = max(scaled_w - w, 0) // 2, max(scaled_h - h, 0) // 2
    fx, fy = width / scaled_w, height / scaled_h  # scaled pixels -> original pixels
    right, bottom = min(left + w, scaled_w), min(top + h, scaled_h)
    return ResizePlan((round(left * fx), round(top * fy), round(right * fx), round(bottom * fy)), (w, h))


def encode_prompt(
    pipe: Flux2KleinPipeline | Flux2Pipeline,
    prompt: str,
    condition_images: list[PIL.Image.Image],
    max_sequence_length: int | None,
    device: torch.device,
) -> dict[str, Tensor]:
    """The pipeline's `encode_prompt`: (T, D) with T = max_sequence_length (padding is attended, as at inference)."""
    if condition_images:
        raise ValueError("FLUX.2's text encoders see no images; condition_images must be empty")
    embeds, _ = pipe.encode_prompt(prompt, device=device, max_sequence_length=max_sequence_length)
    return {"prompt_embeds": embeds[0].cpu().contiguous()}


def encode_image(pipe: Flux2KleinPipeline | Flux2Pipeline, image: Tensor) -> Tensor:
    """`_encode_vae_image` latents (patchified and batch-norm normalised), un-patchified to (C, h, w)."""
    return pipe._unpatchify_latents(pipe._encode_vae_image(image, generator=None))[0]


def decode_latents(vae: nn.Module, packed: Tensor, height: int, width: int, vae_scale_factor: int) -> Tensor:
    """Pixels of packed latents, with the pipelines' unpacking, batch-norm de-normalisation and un-patchifying."""
    rows, cols = height // (vae_scale_factor * 2), width // (vae_scale_factor * 2)
    # [klein]'s unpacking (the same scatter as [dev]'s) takes the grid size, so it needs no device sync; the ids go
    # where the latents are.
    ids = flux2.image_ids(rows, cols)[None].to(packed.device)
    latents = Flux2KleinPipeline._unpack_latents_with_ids(packed[None], ids, rows, cols)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device, latents.dtype)
    latents = Flux2Pipeline._unpatchify_latents(latents * std + mean)
    return vae.decode(latents.to(vae.dtype), return_dict=False)[0]


def initial_noise(generator: torch.Generator, channels: int, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """Noise drawn as the pipelines' `prepare_latents` draws it: (4 channels, rows, cols) patchified, then packed."""
    noise = torch.randn((1, 4 * channels, rows, cols), generator=generator, dtype=dtype)
    return Flux2Pipeline._pack_latents(noise)[0]


def timestep_mu(image_seq_len: int, scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int | None) -> float:
    """The pipelines' `compute_empirical_mu` of the target tokens; training (num_steps None) at TRAINING_SHIFT_STEPS."""
    return compute_empirical_mu(image_seq_len, num_steps or TRAINING_SHIFT_STEPS)


def predict(transformer: nn.Module, batch: NoisyBatch, args: argparse.Namespace) -> list[Tensor]:
    """Velocity predictions on each sample's target tokens; its references' tokens follow them."""
    device = batch.noisy[0].device
    hidden_states = [torch.cat([noisy, *refs]) for noisy, refs in zip(batch.noisy, batch.references, strict=True)]
    img_ids = [
        flux2.sample_ids(tuple(shapes[0][1:]), [tuple(s[1:]) for s in shapes[1:]]).to(device)
        for shapes in batch.img_shapes
    ]
    encoder_hidden_states = torch.stack(batch.prompt_embeds)
    guidance = None
    if base_model(transformer).config.guidance_embeds:  # [dev]: as Flux2Pipeline passes it, float32 per sample
        guidance = torch.full((len(batch.noisy),), args.guidance_scale, device=device, dtype=torch.float32)
    out, _ = flux2.padded_forward(
        transformer,
        hidden_states,
        img_ids,
        encoder_hidden_states,
        flux2.text_ids(encoder_hidden_states.shape[1]).to(device),
        batch.sigmas,
        guidance,
        attend=batch.attend,
    )
    return [out[i, : noisy.shape[0]] for i, noisy in enumerate(batch.noisy)]


FLUX2_KLEIN = EditModel(
    name="flux2_klein",
    title="FLUX.2 [klein]",
    pipeline_class=Flux2KleinPipeline,
    transformer_class=Flux2Transformer2DModel,
    multiple=MULTIPLE,
    rounding="floor",  # prepare_latents floors the output size to 16
    max_references=None,
    inference_reference_size=reference_plan,
    condition_size=None,
    encode_prompt=encode_prompt,
    encode_image=encode_image,
    decode_latents=decode_latents,
    prompt_sees_images=False,
    max_sequence_length=512,  # both pipelines' default; every prompt is padded to it
    lora_targets=LORA_TARGETS,
    install_mixed=flux2.install_mixed,
    predict=predict,
    add_args=add_args,
    timestep_mu=timestep_mu,
    initial_noise=initial_noise,
    comfyui_keys=COMFYUI_LAYOUT.lora_pairs,
    tiny_transformer_config={**FLUX2_TRANSFORMER, "guidance_embeds": False},
    tiny_components=flux2_klein_components,
    demo_controls_per_row=(1, 2, 3, 0),
    hub=HubDescription(
        "black-forest-labs/FLUX.2-klein-base-4B", ("flux2", "flux2-klein", "image-editing"), license="apache-2.0"
    ),
    script="train_flux2.py",
)

FLUX2_DEV = dataclasses.replace(
    FLUX2_KLEIN,
    name="flux2_dev",
    title="FLUX.2 [dev]",
    pipeline_class=Flux2Pipeline,
    add_args=add_dev_args,
    tiny_transformer_config={**FLUX2_TRANSFORMER, "guidance_embeds": True},
    tiny_components=flux2_dev_components,
    hub=HubDescription(
        "black-forest-labs/FLUX.2-dev",
        ("flux2", "flux2-dev", "image-editing"),
        license="other",
        license_name="flux-dev-non-commercial-license",
    ),
)
