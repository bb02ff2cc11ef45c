"""What the Qwen-Image-Edit and Edit-Plus trainers share: flags, default LoRA targets and the prediction.

Both families feed the transformer [target tokens | reference tokens of each control image] with `img_shapes`
target first, and text embeddings that saw the control images (computed per sample by the encoders/cache);
they differ only in their pipeline class (prompt template, image sizes), which the scripts supply.
"""

import argparse

import torch
from diffusers import DiffusionPipeline, QwenImageTransformer2DModel
from torch import Tensor, nn

from common import qwen
from common.cli import add_data_args, add_model_args, add_training_args, check_training_args
from common.model_card import HubDescription
from common.training import NoisyBatch, Recipe

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


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The shared trainer flags (Qwen-Image-Edit takes no guidance value and no T5 length)."""
    parser = argparse.ArgumentParser(description=description)
    add_model_args(parser, demo=True)
    add_data_args(parser)
    add_training_args(parser, LORA_TARGETS)
    args = parser.parse_args(argv)
    check_training_args(args, argv)
    return args


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


def recipe(model: str, pipeline_class: type[DiffusionPipeline], hub: HubDescription) -> Recipe:
    """The training recipe of one Qwen-Image-Edit variant."""
    return Recipe(
        model=model,
        pipeline_class=pipeline_class,
        transformer_class=QwenImageTransformer2DModel,
        lora_targets=LORA_TARGETS,
        install_mixed=qwen.install_mixed,
        predict=predict,
        hub=hub,
        unused_modules=unused_modules,
    )
