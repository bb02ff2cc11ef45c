"""Qwen-Image 2.1 (`QwenImage21Pipeline`): edits with 0..n condition images seen by a Qwen3-VL prompt encoder.

Sample i is the joint sequence the stock transformer builds: its prompt's Qwen3-VL hidden states with each condition
image's latent tokens substituted at that image's slots (one slot = 2x2 tokens), then the target's tokens, with
block-causal attention and, for `causal_condition` checkpoints, text and condition tokens modulated at t = 0; samples
of different layouts share a batch through `common.qwen21.padded_forward`, equal layouts take the stock forward.

Encoding is the pipeline's own: `encode_prompt` with the sample's condition images (the VL encoder sees each at its
VAE size, as `__call__` feeds one resize to both), giving the hidden states and the image-slot mask; each image
through `_encode_vae_image` as RGBA with an opaque alpha (the pipeline converts every condition image to RGBA; its
VAE reads four channels). A token is one latent pixel of the 16x VAE (no 2x2 packing), so latents are stored as
(C / 4, 2h, 2w), the shared 2x2 packing of which gives the pipeline's (h * w, C) tokens bit for bit.

The image-slot mask travels inside "prompt_embeds" as one trailing channel (1.0 at the VL image slots, 0.0 on
text), so the cache, caption dropout (the empty prompt with the row's images) and validation carry it unchanged.

Control dropout keeps a dropped sample's condition tokens in place (the prompt the VL encoder wrote around them is
unchanged) but excludes them as keys, so the target sees none of them. `--export_comfyui` is refused: no ComfyUI
loader for Qwen-Image 2.1 LoRAs with known key names was found (ComfyUI can run the model's checkpoints, but its
LoRA key layout for it is not known here); the diffusers-format LoRA loads with `QwenImage21Pipeline.load_lora_weights`.
"""

from __future__ import annotations

import argparse

import PIL.Image
import torch
from diffusers import QwenImage21Pipeline, QwenImage21Transformer2DModel
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_dimensions
from torch import Tensor, nn

from common import qwen21
from common.batch import NoisyBatch
from common.models.base import EditModel, HubDescription
from common.tiny_components import QWEN21_TRANSFORMER, qwen21_components

# `multiple_of = vae_scale_factor * 2` in __call__, and `calculate_dimensions` rounds to 32.
MULTIPLE = 32
# __call__'s default `output_resolution`: condition images are resized to about this squared area.
OUTPUT_RESOLUTION = 1024
# Every linear of the 32 single-stream blocks: attention projections and the SwiGLU MLP (not the shared modulation).
LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "img_mlp.proj",
    "img_mlp.gate_layer",
    "img_mlp.out",
)


def reference_size(width: int, height: int) -> tuple[int, int]:
    """__call__'s size of each condition image: `calculate_dimensions(output_resolution ** 2, w / h)`."""
    w, h, _ = calculate_dimensions(OUTPUT_RESOLUTION * OUTPUT_RESOLUTION, width / height)
    return w, h


def condition_size(cropped: tuple[int, int], vae_size: tuple[int, int]) -> tuple[int, int]:
    """The VL encoder sees each condition image at its VAE size (__call__ feeds one resize to both)."""
    return vae_size


def encode_prompt(
    pipe: QwenImage21Pipeline,
    prompt: str,
    condition_images: list[PIL.Image.Image],
    max_sequence_length: int | None,
    device: torch.device,
) -> dict[str, Tensor]:
    """The pipeline's `encode_prompt` with the condition images: (T, D + 1), the VL hidden states (system prefix
    dropped by the pipeline) and their image-slot mask as the last channel."""
    embeds, mask, slots = pipe.encode_prompt(prompt, image=condition_images or None, device=device)
    valid = slice(None) if mask is None else mask[0].bool()
    embeds, slots = embeds[0, valid], slots[0, valid]
    expected = sum(w * h // (MULTIPLE * MULTIPLE) for w, h in (image.size for image in condition_images))
    if int(slots.sum()) != expected:
        raise ValueError(
            f"the Qwen3-VL processor gave {int(slots.sum())} image slots for condition images needing {expected} "
            "(one per 32x32 pixels): its min/max pixels resized them; condition images must be within its bounds"
        )
    return {"prompt_embeds": torch.cat([embeds, slots[:, None].to(embeds.dtype)], dim=-1).cpu().contiguous()}


def split_prompt(prompt_embeds: Tensor) -> tuple[Tensor, Tensor]:
    """(T, D) hidden states and (T,) bool image-slot mask of an `encode_prompt` result."""
    return prompt_embeds[:, :-1], prompt_embeds[:, -1] > 0.5


def encode_image(pipe: QwenImage21Pipeline, image: Tensor) -> Tensor:
    """`_encode_vae_image` latents of the image with an opaque alpha (laid out channels-last like the pipeline's
    RGBA tensors), stored (C / 4, 2h, 2w) so that the shared 2x2 packing yields the pipeline's tokens."""
    rgba = torch.cat([image.permute(0, 2, 3, 1), torch.ones_like(image[:, :1]).permute(0, 2, 3, 1)], dim=-1)
    latents = pipe._encode_vae_image(rgba.permute(0, 3, 1, 2)[:, :, None], generator=None)[0, :, 0]
    c, h, w = latents.shape
    return latents.view(c // 4, 2, 2, h, w).permute(0, 3, 1, 4, 2).reshape(c // 4, 2 * h, 2 * w)


def decode_latents(vae: nn.Module, packed: Tensor, height: int, width: int, vae_scale_factor: int) -> Tensor:
    """RGB pixels of (h * w, C) tokens: the pipeline's unpacking, de-normalisation and RGBA decoding, alpha dropped."""
    z = QwenImage21Pipeline._unpack_latents(packed[None], height, width, vae_scale_factor).to(vae.dtype)
    config = vae.config
    mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(z.device, z.dtype)
    std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(z.device, z.dtype)
    return vae.decode(z * std + mean, return_dict=False)[0][:, :3, 0]


def initial_noise(generator: torch.Generator, channels: int, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """Noise drawn as `prepare_latents` draws it, (1, 1, C, rows, cols) with C = 4 * channels, then flattened."""
    noise = torch.randn((1, 1, 4 * channels, rows, cols), generator=generator, dtype=dtype)
    return QwenImage21Pipeline._pack_latents(noise, 1, 4 * channels, rows, cols)[0]


def predict(transformer: nn.Module, batch: NoisyBatch, args: argparse.Namespace) -> list[Tensor]:
    """Velocity predictions on each sample's target tokens, the last of its joint sequence."""
    text, slots = zip(*(split_prompt(p) for p in batch.prompt_embeds), strict=True)
    out, valid = qwen21.padded_forward(
        transformer,
        [torch.cat([*refs, noisy]) for noisy, refs in zip(batch.noisy, batch.references, strict=True)],
        list(text),
        [qwen21.target_slots(s, noisy.shape[0]) for s, noisy in zip(slots, batch.noisy, strict=True)],
        [[*shapes[1:], shapes[0]] for shapes in batch.img_shapes],  # the pipeline's order: references, then target
        batch.sigmas,
        drop_references=[
            n < noisy.shape[0] + sum(r.shape[0] for r in refs)
            for n, noisy, refs in zip(batch.attend, batch.noisy, batch.references, strict=True)
        ],
    )
    lengths = valid.sum(1).tolist()
    return [out[i, n - noisy.shape[0] : n] for i, (n, noisy) in enumerate(zip(lengths, batch.noisy, strict=True))]


QWEN_IMAGE21 = EditModel(
    name="qwen_image21",
    title="Qwen-Image 2.1",
    pipeline_class=QwenImage21Pipeline,
    transformer_class=QwenImage21Transformer2DModel,
    multiple=MULTIPLE,
    rounding="nearest",  # calculate_dimensions: `round(math.sqrt(area * ar) / 32) * 32`
    max_references=None,  # the pipeline's template takes any number ("<image1>", "<image2>", ...) and checks none
    inference_reference_size=reference_size,
    condition_size=condition_size,
    encode_prompt=encode_prompt,
    encode_image=encode_image,
    decode_latents=decode_latents,
    prompt_sees_images=True,
    max_sequence_length=None,  # the pipeline never truncates the prompt
    lora_targets=LORA_TARGETS,
    install_mixed=qwen21.install_mixed,
    predict=predict,
    initial_noise=initial_noise,
    comfyui_keys=None,
    tiny_transformer_config=QWEN21_TRANSFORMER,
    tiny_components=qwen21_components,
    demo_controls_per_row=(1, 2, 1, 0),
    hub=HubDescription(
        "Qwen/Qwen-Image-2.1",
        ("qwen-image", "qwen-image-2.1", "image-editing"),
        license="other",
        license_name="qwen-research",
        license_link="https://huggingface.co/Qwen/Qwen-Image-2.1/blob/main/LICENSE",
    ),
    script="train_qwen_image21.py",
)
