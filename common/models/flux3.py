"""FLUX.3 [klein] (Qwen3-VL text encoder, the FLUX.2 VAE): 0..n reference images per sample, each with its own size.

FLUX.3 has modular pipelines only (`Flux3ModularPipeline`): the checkpoint is loaded with `from_pretrained` and
`load_components`, and encoding runs the pipeline's own steps. The prompt goes through `Flux3TextEncoderStep`'s
Qwen3-VL encoding: the chat template, right-padded to a multiple of 80 tokens (capped at 8192), eight hidden layers
stacked; the transformer attends to that padding, so each sample keeps its own text length T_i. Each image goes
through `Flux3VaeEncoderStep` (VAE mode, 2x2 patchify, batch-norm normalisation), stored un-patchified as (C, h, w)
so the shared 2x2 packing gives the pipeline's tokens bit for bit.

The transformer keeps the target, its references and the text in three streams (`common.flux3`): ids (t, h, w, l)
with h, w scaled by 0.5, the target at l = 0, reference k at l = -(k + 1), text along l. Control dropout drops a
sample's reference stream (the stock text-to-image call), which changes no other stream's layout.

Sampling uses the scheduler's constant shift (6.93): as an exponential time shift it is mu = log(shift), the same for
every size. Validation runs the conditional prediction only (the base model samples with CFG 4 at inference).
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux3Transformer2DModel
from diffusers.modular_pipelines import Flux3AutoBlocks, Flux3ModularPipeline
from diffusers.modular_pipelines.flux3.decoders import Flux3DecodeStep
from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep, Flux3VaeEncoderStep
from diffusers.modular_pipelines.modular_pipeline import PipelineState
from torch import Tensor, nn

from common import flux3
from common.batch import NoisyBatch
from common.models import flux2
from common.models.base import EditModel, HubDescription, edit_snippet
from common.tiny_components import FLUX3_TRANSFORMER, flux3_klein_components

MULTIPLE = 16  # `Flux3PrepareLatentsStep.check_inputs`: sizes divisible by vae_scale_factor * 2
PAD_MULTIPLE = 80  # `Flux3TextEncoderStep(pad_multiple=80)`
MAX_SEQUENCE_LENGTH = 8192  # `Flux3TextEncoderStep`'s default `max_sequence_length`: a cap, not a padded length
ENCODER_COMPONENTS = ("text_encoder", "tokenizer", "vae")  # what training loads besides the transformer
# Every linear of every block: the per-mode blocks of the text, target and reference streams and the joint blocks.
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.linear_in", "ff.linear_out")
# BFL's module names, as diffusers' `_convert_non_diffusers_flux3_lora_to_diffusers` reads them (its inverse).
_BFL_BLOCKS = {
    ".attn.to_q.": ".q_proj.",
    ".attn.to_k.": ".k_proj.",
    ".attn.to_v.": ".v_proj.",
    ".attn.to_out.0.": ".attn_out.",
    ".ff.linear_in.": ".mlp_in.",
    ".ff.linear_out.": ".mlp_out.",
}


def load_pipeline(path: str, dtype: torch.dtype, revision: str | None, transformer: bool) -> Flux3ModularPipeline:
    """The checkpoint's `Flux3ModularPipeline` on `Flux3AutoBlocks` without the prompt upsampler (prompts are encoded
    as given, as in training), with the encoders (and the transformer if asked) loaded, and the scheduler where the
    checkpoint's index lists one; the image processor and guider (and else the scheduler) are built from config."""
    blocks = Flux3AutoBlocks()
    blocks.sub_blocks.pop("prompt_upsampler")
    pipe = Flux3ModularPipeline(blocks, pretrained_model_name_or_path=path, revision=revision)
    names = [*ENCODER_COMPONENTS, *(["transformer"] * transformer)]
    if "scheduler" in pipe.pretrained_component_names:  # the checkpoint's index lists it (else it is from config)
        names.append("scheduler")
    pipe.load_components(names=names, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_pipeline(components: dict[str, Any], transformer: nn.Module, out: Path) -> None:
    """A `Flux3ModularPipeline` checkpoint: the pipeline's `save_pretrained` (modular_model_index.json and a folder per
    loaded component), plus the scheduler's folder, which the trainer reads (the pipeline builds it from config)."""
    components = dict(components)
    scheduler = components.pop("scheduler")
    pipe = Flux3ModularPipeline()
    pipe.update_components(**components, transformer=transformer)
    pipe.save_pretrained(str(out), safe_serialization=True, overwrite_modular_index=True)
    scheduler.save_pretrained(Path(out) / "scheduler")


def encode_prompt(
    pipe: Flux3ModularPipeline,
    prompt: str,
    condition_images: list[PIL.Image.Image],
    max_sequence_length: int | None,
    device: torch.device,
) -> dict[str, Tensor]:
    """`Flux3TextEncoderStep`'s encoding: (T, D), T the prompt's tokens rounded up to a multiple of 80."""
    if condition_images:
        raise ValueError("FLUX.3's text encoder sees no images; condition_images must be empty")
    embeds = Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds(
        pipe.text_encoder,
        pipe.tokenizer,
        prompt,
        device=device,
        max_sequence_length=max_sequence_length or MAX_SEQUENCE_LENGTH,
        pad_multiple=PAD_MULTIPLE,
    )
    return {"prompt_embeds": embeds[0].cpu().contiguous()}


def encode_image(pipe: Flux3ModularPipeline, image: Tensor) -> Tensor:
    """`Flux3VaeEncoderStep` run on one image (patchified, batch-norm normalised), un-patchified to (C, h, w)."""
    state = PipelineState()
    state.set("condition_images", [image])
    _, state = Flux3VaeEncoderStep()(pipe, state)
    return Flux3DecodeStep._unpatchify_latents(state.get("image_cond_latents")[0])[0]


def initial_noise(generator: torch.Generator, channels: int, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """Noise as `Flux3PrepareLatentsStep` draws it: (4 channels, rows, cols) in float32, cast, packed to tokens."""
    noise = torch.randn((1, 4 * channels, rows, cols), generator=generator, dtype=torch.float32).to(dtype)
    return noise.flatten(2).transpose(1, 2)[0]


def timestep_mu(image_seq_len: int, scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int | None) -> float:
    """The scheduler's constant shift as the exponential time shift's mu, log(shift): the same for every size."""
    return math.log(scheduler.config.shift)


def comfyui_keys(pairs: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
    """BFL's module names (`content_mode_blocks`, `single_blocks`, `q_proj`, `attn_out`, `mlp_in`, ...)."""
    out = {}
    for module, pair in pairs.items():
        name = re.sub(r"^mode_blocks\.", "content_mode_blocks.", module + ".")
        name = name.replace("single_transformer_blocks.", "single_blocks.")
        for diffusers_name, bfl_name in _BFL_BLOCKS.items():
            name = name.replace(diffusers_name, bfl_name)
        out[name[:-1]] = pair
    return out


def usage_snippet(base_model: str, lora: str, prompt: str, steps: int) -> str:
    """Python that edits one image with the modular pipeline and this LoRA, the prompt encoded as given (as trained)."""
    load = f"""blocks = Flux3AutoBlocks()
blocks.sub_blocks.pop("prompt_upsampler")  # the LoRA was trained on prompts as given
pipe = blocks.init_pipeline({base_model!r})
pipe.load_components(dtype=torch.bfloat16)"""
    result = '    output="images",\n)[0]'
    return edit_snippet("from diffusers import Flux3AutoBlocks", load, lora, prompt, steps, result)


def predict(transformer: nn.Module, batch: NoisyBatch, args: argparse.Namespace) -> list[Tensor]:
    """Velocity predictions on each sample's target tokens; its references (unless dropped) in their own stream."""
    device = batch.noisy[0].device
    img_ids, refs, ref_ids = [], [], []
    for noisy, references, shapes, attend in zip(
        batch.noisy, batch.references, batch.img_shapes, batch.attend, strict=True
    ):
        kept = attend > noisy.shape[0]  # control dropout: the sample attends to its target only
        img_ids.append(flux3.image_ids(*shapes[0][1:]).to(device))
        refs.append(torch.cat(references) if kept and references else noisy[:0])
        ref_ids.append(flux3.reference_ids([tuple(s[1:]) for s in shapes[1:]] if kept else []).to(device))
    txt_ids = [flux3.text_ids(p.shape[0]).to(device) for p in batch.prompt_embeds]
    out, _ = flux3.padded_forward(
        transformer, batch.noisy, img_ids, batch.prompt_embeds, txt_ids, batch.sigmas, refs, ref_ids
    )
    return [out[i, : noisy.shape[0]] for i, noisy in enumerate(batch.noisy)]


FLUX3_KLEIN = EditModel(
    name="flux3_klein",
    title="FLUX.3 [klein]",
    pipeline_class=Flux3ModularPipeline,
    transformer_class=Flux3Transformer2DModel,
    multiple=MULTIPLE,
    rounding="floor",
    max_references=None,
    # Several references: fitted under 1 MP and centre-cropped to 16, FLUX.2's rule (`resize_mode="crop"`). A single
    # reference is reflect-padded to its 16-pixel canvas at inference (`"fill"`), which no crop plan expresses.
    inference_reference_size=flux2.reference_plan,
    condition_size=None,
    encode_prompt=encode_prompt,
    encode_image=encode_image,
    decode_latents=flux2.decode_latents,  # `Flux3DecodeStep`'s unpacking, de-normalisation and un-patchifying
    prompt_sees_images=False,
    max_sequence_length=None,  # no fixed length: each prompt's multiple of 80, up to MAX_SEQUENCE_LENGTH
    lora_targets=LORA_TARGETS,
    install_mixed=flux3.install_mixed,
    predict=predict,
    timestep_mu=timestep_mu,
    initial_noise=initial_noise,
    comfyui_keys=comfyui_keys,
    tiny_transformer_config=FLUX3_TRANSFORMER,
    tiny_components=flux3_klein_components,
    demo_controls_per_row=(1, 2, 0),
    hub=HubDescription(
        "black-forest-labs/flux-3-image-klein-base",
        ("flux3", "flux3-klein", "image-editing"),
        license="other",
        license_name="flux-kommunity-license",
        license_link="https://huggingface.co/black-forest-labs/flux-3-image-klein/blob/main/LICENSE.md",
    ),
    script="train_flux3.py",
    pipeline_loader=load_pipeline,
    pipeline_writer=write_pipeline,
    usage_snippet=usage_snippet,
    ddp_find_unused_parameters=True,
)
