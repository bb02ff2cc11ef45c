"""FLUX.1 Kontext: one reference image, T5 + CLIP text conditioning that sees no image, guidance-distilled.

Each sample is its target's packed tokens followed by its reference image's tokens, with ids whose first channel
is 1, exactly as `FluxKontextPipeline` builds them; samples of different sizes share a batch through
`common.flux.mixed_forward` and equal-size batches take the stock forward.
"""

from __future__ import annotations

import argparse

import PIL.Image
import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from torch import Tensor, nn

from common import flux
from common.attention import base_model
from common.batch import NoisyBatch
from common.flux_comfyui import bfl_lora_pairs
from common.models.base import EditModel, HubDescription
from common.tiny_components import FLUX_TRANSFORMER, flux_components

# `multiple_of = vae_scale_factor * 2` in FluxKontextPipeline.__call__ (8x VAE, 2x2 packing).
MULTIPLE = 16
# The diffusers Kontext example's default set: attention, context attention and MLPs of every block.
LORA_TARGETS = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
)


def add_args(parser: argparse.ArgumentParser) -> None:
    """Kontext's own trainer flags: the distilled guidance value and the T5 length."""
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="guidance embedding value while training")
    parser.add_argument("--max_sequence_length", type=int, default=512, help="T5 tokens, as in the cache")


def kontext_preferred_size(width: int, height: int) -> tuple[int, int]:
    """(w, h) FluxKontextPipeline.__call__ gives an input image of width x height (`_auto_resize`, the default).

    Same steps: the image processor's default size rounds each side down to 16, the PREFERRED_KONTEXT_RESOLUTIONS
    entry nearest in aspect ratio is taken, then rounded down to `multiple_of`.
    """
    width, height = max(width - width % MULTIPLE, MULTIPLE), max(height - height % MULTIPLE, MULTIPLE)
    ratio = width / height
    _, w, h = min((abs(ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return w // MULTIPLE * MULTIPLE, h // MULTIPLE * MULTIPLE


def encode_prompt(
    pipe: FluxKontextPipeline,
    prompt: str,
    condition_images: list[PIL.Image.Image],
    max_sequence_length: int | None,
    device: torch.device,
) -> dict[str, Tensor]:
    """T5 embeddings padded to `max_sequence_length` (the pipeline attends to the padding too), CLIP pooled one."""
    if condition_images:
        raise ValueError("FLUX.1 Kontext's text encoders see no images; condition_images must be empty")
    embeds, pooled, _ = pipe.encode_prompt(
        prompt, prompt_2=None, device=device, max_sequence_length=max_sequence_length
    )
    return {"prompt_embeds": embeds[0].cpu().contiguous(), "pooled_prompt_embeds": pooled[0].cpu().contiguous()}


def encode_image(pipe: FluxKontextPipeline, image: Tensor) -> Tensor:
    """VAE latents `(argmax - shift_factor) * scaling_factor` (C, h, w), by the pipeline's `_encode_vae_image`."""
    return pipe._encode_vae_image(image, generator=None)[0]


def decode_latents(vae: nn.Module, packed: Tensor, height: int, width: int, vae_scale_factor: int) -> Tensor:
    """Pixels of packed latents, with the pipeline's unpacking and VAE normalisation."""
    z = FluxKontextPipeline._unpack_latents(packed[None], height, width, vae_scale_factor).to(vae.dtype)
    return vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]


def predict(transformer: nn.Module, batch: NoisyBatch, args: argparse.Namespace) -> list[Tensor]:
    """Velocity predictions on each sample's target tokens (reference tokens are appended after them)."""
    hidden_states, img_ids = [], []
    for i, (noisy, references, shapes) in enumerate(zip(batch.noisy, batch.references, batch.img_shapes, strict=True)):
        if len(references) > 1:
            raise ValueError(
                f"sample {batch.sample_ids[i]}: FLUX.1 Kontext takes one reference image, not {len(references)}"
            )
        hidden_states.append(torch.cat([noisy, *references]))
        img_ids.append(torch.cat([flux.image_ids(h, w, index=int(k > 0)) for k, (_, h, w) in enumerate(shapes)]))
    encoder_hidden_states = torch.stack(batch.prompt_embeds)
    device, batch_size = encoder_hidden_states.device, len(batch.noisy)
    guidance = None
    if base_model(transformer).config.guidance_embeds:
        guidance = torch.full((batch_size,), args.guidance_scale, device=device)
    out = flux.mixed_forward(
        transformer,
        hidden_states,
        [ids.to(device) for ids in img_ids],
        encoder_hidden_states,
        torch.stack(batch.pooled_prompt_embeds),
        batch.sigmas,
        torch.zeros(encoder_hidden_states.shape[1], 3, device=device),
        guidance,
        attend=batch.attend,
    )
    return [o[: n.shape[0]] for o, n in zip(out, batch.noisy, strict=True)]


FLUX_KONTEXT = EditModel(
    name="flux_kontext",
    title="FLUX.1 Kontext",
    pipeline_class=FluxKontextPipeline,
    transformer_class=FluxTransformer2DModel,
    # FluxKontextPipeline.__call__: `width = round((max_area * ar) ** 0.5)`, then `width // 16 * 16`.
    multiple=MULTIPLE,
    rounding="floor",
    max_references=1,
    inference_reference_size=kontext_preferred_size,
    condition_size=None,
    encode_prompt=encode_prompt,
    encode_image=encode_image,
    decode_latents=decode_latents,
    prompt_sees_images=False,
    max_sequence_length=512,  # FluxKontextPipeline's default T5 length
    lora_targets=LORA_TARGETS,
    install_mixed=flux.install_mixed,
    predict=predict,
    add_args=add_args,
    comfyui_keys=bfl_lora_pairs,
    hub=HubDescription(
        "black-forest-labs/FLUX.1-Kontext-dev",
        ("flux", "flux-kontext", "image-editing"),
        license="other",
        license_name="flux-1-dev-non-commercial-license",
        license_link="https://huggingface.co/black-forest-labs/FLUX.1-Kontext-dev/blob/main/LICENSE.md",
    ),
    script="train_flux_kontext.py",
    tiny_transformer_config=FLUX_TRANSFORMER,
    tiny_components=flux_components,
)
