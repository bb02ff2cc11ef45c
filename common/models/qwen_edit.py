"""Qwen-Image-Edit, Qwen-Image-Edit-Plus (2509) and 2511: Qwen2.5-VL conditioning that sees the control images.

All three feed the transformer [target tokens | reference tokens of each control image] with `img_shapes` target
first, and text embeddings that saw the control images (computed per sample by the encoders/cache), through
`common.qwen.mixed_forward`. They differ in their pipeline: Edit takes one control, whose VAE-sized image its VL
encoder also sees; Edit-Plus takes 0..n, each a "Picture k:" entry of the prompt at the condition size (384*384)
and a reference at the VAE size. 2511 checkpoints (`zero_cond_t`) run the Edit-Plus pipeline and encode their
data identically, so they share Edit-Plus caches and its trainer.

Rows without a control image: no stock pipeline can run without an image (both `__call__`s read `image.size`), and
Qwen-Image-Edit's template holds an `<|image_pad|>` that its processor refuses to leave empty; the only stock code
that encodes a prompt without an image is Edit-Plus's `encode_prompt(prompt, image=None)` (its template with no
"Picture k" entries, i.e. Edit's template without the vision block), so both models encode such prompts that way.
"""

from __future__ import annotations

import argparse
import dataclasses

import PIL.Image
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImageTransformer2DModel
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus
from torch import Tensor, nn

from common import qwen
from common.batch import NoisyBatch
from common.models.base import EditModel, HubDescription
from common.resolution import size_for_area
from common.tiny_components import QWEN_TRANSFORMER, qwen_components

# `calculate_dimensions` rounds both sides to multiples of 32 (the model itself needs 16).
MULTIPLE = 32
# Every linear layer of the image and text streams of each block (attention and MLPs), not the modulation.
LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)


def edit_reference_size(width: int, height: int) -> tuple[int, int]:
    """QwenImageEditPipeline.__call__'s size for its image: `calculate_dimensions(1024 * 1024, w / h)`."""
    w, h, _ = pipeline_qwenimage_edit.calculate_dimensions(1024 * 1024, width / height)
    return w, h


def plus_reference_size(width: int, height: int) -> tuple[int, int]:
    """QwenImageEditPlusPipeline.__call__'s VAE size of each image: `calculate_dimensions(VAE_IMAGE_SIZE, w / h)`."""
    return pipeline_qwenimage_edit_plus.calculate_dimensions(
        pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE, width / height
    )


def edit_condition_size(cropped: tuple[int, int], vae_size: tuple[int, int]) -> tuple[int, int]:
    """Qwen-Image-Edit's VL encoder sees the control resized to its VAE size (the pipeline passes the same image)."""
    return vae_size


def plus_condition_size(cropped: tuple[int, int], vae_size: tuple[int, int]) -> tuple[int, int]:
    """Edit-Plus's VL encoder sees each control at `calculate_dimensions(CONDITION_IMAGE_SIZE, w / h)` (384*384)."""
    return size_for_area(*cropped, pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE, MULTIPLE)


def _prompt_embeds(
    pipe: QwenImageEditPlusPipeline, prompt: str, image: object, device: torch.device
) -> dict[str, Tensor]:
    """The pipeline's `encode_prompt` of one prompt on `device`, prefix dropped by the pipeline and padding by its
    mask."""
    embeds, mask = pipe.encode_prompt(prompt, image=image, device=device)
    embeds = embeds[0] if mask is None else embeds[0, mask[0].bool()]
    return {"prompt_embeds": embeds.cpu().contiguous()}


def encode_prompt_edit(
    pipe: QwenImageEditPipeline,
    prompt: str,
    condition_images: list[PIL.Image.Image],
    max_sequence_length: int | None,
    device: torch.device,
) -> dict[str, Tensor]:
    """Qwen2.5-VL embedding of the prompt with its single resized control image (module doc for none)."""
    if len(condition_images) > 1:
        raise ValueError(f"Qwen-Image-Edit's template holds at most one image, got {len(condition_images)}")
    if not condition_images:
        return _prompt_embeds(QwenImageEditPlusPipeline(**pipe.components), prompt, None, device)
    return _prompt_embeds(pipe, prompt, condition_images[0], device)


def encode_prompt_plus(
    pipe: QwenImageEditPlusPipeline,
    prompt: str,
    condition_images: list[PIL.Image.Image],
    max_sequence_length: int | None,
    device: torch.device,
) -> dict[str, Tensor]:
    """Qwen2.5-VL embedding of the prompt with a "Picture k:" entry per condition image."""
    return _prompt_embeds(pipe, prompt, condition_images or None, device)


def encode_image(pipe: QwenImageEditPipeline, image: Tensor) -> Tensor:
    """3D-VAE latents normalised by `latents_mean` / `latents_std`, frame dimension dropped: (C, h, w)."""
    return pipe._encode_vae_image(image[:, :, None], generator=None)[0, :, 0]


def decode_latents(vae: nn.Module, packed: Tensor, height: int, width: int, vae_scale_factor: int) -> Tensor:
    """Pixels of packed latents: the pipeline's unpacking, then the 3-D VAE on de-normalised one-frame latents."""
    z = QwenImageEditPipeline._unpack_latents(packed[None], height, width, vae_scale_factor).to(vae.dtype)
    config = vae.config
    mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(z.device, z.dtype)
    std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(z.device, z.dtype)
    return vae.decode(z / std + mean, return_dict=False)[0][:, :, 0]


def predict(transformer: nn.Module, batch: NoisyBatch, args: argparse.Namespace) -> list[Tensor]:
    """Velocity predictions on each sample's target tokens; its 0..n reference images follow them."""
    hidden_states = [torch.cat([noisy, *refs]) for noisy, refs in zip(batch.noisy, batch.references, strict=True)]
    out = qwen.mixed_forward(
        transformer, hidden_states, batch.img_shapes, batch.prompt_embeds, batch.sigmas, attend=batch.attend
    )
    return [o[: n.shape[0]] for o, n in zip(out, batch.noisy, strict=True)]


def unused_modules(transformer: nn.Module) -> list[str]:
    """The last block's text queries and text outputs: the model returns image tokens only, so they never reach
    the loss (text keys and values still do, through the image tokens' attention)."""
    last = f"transformer_blocks.{len(transformer.transformer_blocks) - 1}"
    return [f"{last}.{name}" for name in ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")]


QWEN_EDIT = EditModel(
    name="qwen_edit",
    title="Qwen-Image-Edit",
    pipeline_class=QwenImageEditPipeline,
    transformer_class=QwenImageTransformer2DModel,
    multiple=MULTIPLE,
    rounding="nearest",  # calculate_dimensions: `round(math.sqrt(area * ar) / 32) * 32`
    max_references=1,
    inference_reference_size=edit_reference_size,
    condition_size=edit_condition_size,
    encode_prompt=encode_prompt_edit,
    encode_image=encode_image,
    decode_latents=decode_latents,
    prompt_sees_images=True,
    max_sequence_length=None,  # the Qwen pipelines never truncate the prompt
    lora_targets=LORA_TARGETS,
    install_mixed=qwen.install_mixed,
    predict=predict,
    unused_modules=unused_modules,
    tiny_transformer_config=QWEN_TRANSFORMER,
    tiny_components=qwen_components,
    hub=HubDescription(
        "Qwen/Qwen-Image-Edit", ("qwen-image", "qwen-image-edit", "image-editing"), license="apache-2.0"
    ),
    script="train_qwen_edit.py",
)

QWEN_EDIT_PLUS = dataclasses.replace(
    QWEN_EDIT,
    name="qwen_edit_plus",
    title="Qwen-Image-Edit-Plus",
    pipeline_class=QwenImageEditPlusPipeline,
    max_references=None,
    inference_reference_size=plus_reference_size,
    condition_size=plus_condition_size,
    encode_prompt=encode_prompt_plus,
    demo_controls_per_row=(1, 2, 1, 0),
    hub=HubDescription(
        "Qwen/Qwen-Image-Edit-2509",
        ("qwen-image", "qwen-image-edit", "qwen-image-edit-plus", "image-editing"),
        license="apache-2.0",
    ),
    script="train_qwen_edit_plus.py",
)

QWEN_EDIT_2511 = dataclasses.replace(
    QWEN_EDIT_PLUS,
    name="qwen_edit_2511",
    title="Qwen-Image-Edit-2511",
    tiny_transformer_config={**QWEN_TRANSFORMER, "zero_cond_t": True},
    hub=dataclasses.replace(QWEN_EDIT_PLUS.hub, repo_id="Qwen/Qwen-Image-Edit-2511"),
    shares_data_with=QWEN_EDIT_PLUS.name,  # same pipeline, same encoded data: Edit-Plus caches serve it
)
