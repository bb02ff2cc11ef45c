"""LoRA training for FLUX.1 Kontext on edit pairs of mixed resolutions, without buckets.

    accelerate launch train_flux_kontext.py --demo     # tiny random model + synthetic data under ./demo

    accelerate launch precompute_cache.py --model flux_kontext \\
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-Kontext-dev --dataset ./pairs --cache_dir ./cache \\
        --multi_resolutions 512*512 768*768 1024*1024
    accelerate launch train_flux_kontext.py --pretrained_model_name_or_path black-forest-labs/FLUX.1-Kontext-dev \\
        --cache_dir ./cache --multi_resolutions 512*512 768*768 1024*1024 --output_dir ./kontext-lora \\
        --train_batch_size 4 --group_by_length --gradient_checkpointing --mixed_precision bf16 --max_train_steps 2000

Each sample is its target's packed tokens followed by its reference image's tokens, with ids whose first channel
is 1, exactly as `FluxKontextPipeline` builds them; samples of different sizes share a batch through
`common.flux.mixed_forward` and equal-size batches take the stock forward.
"""

import argparse

import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from torch import Tensor, nn

from common import flux
from common.attention import base_model
from common.cli import add_data_args, add_model_args, add_training_args, check_training_args
from common.demo import run
from common.errors import run_script
from common.training import NoisyBatch, Recipe

MODEL = "flux_kontext"
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Shared flags plus Kontext's own: the distilled guidance value and the T5 length."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, demo=True)
    add_data_args(parser)
    add_training_args(parser, LORA_TARGETS)
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="guidance embedding value while training")
    parser.add_argument("--max_sequence_length", type=int, default=512, help="T5 tokens, as in the cache")
    args = parser.parse_args(argv)
    check_training_args(args)
    return args


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


RECIPE = Recipe(
    model=MODEL,
    pipeline_class=FluxKontextPipeline,
    transformer_class=FluxTransformer2DModel,
    lora_targets=LORA_TARGETS,
    install_mixed=flux.install_mixed,
    predict=predict,
)


if __name__ == "__main__":
    run_script(lambda: run(parse_args(), RECIPE))
