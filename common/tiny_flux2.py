"""Tiny random FLUX.2 checkpoints ([klein]: Qwen3 text encoder; [dev]: Mistral3 text encoder + Pixtral processor),
built with the real classes and written by the stock pipelines' `save_pretrained` in the hub repo layout.

The text encoders keep the depth the pipelines read from (hidden states 9/18/27 for klein, 10/20/30 for dev), so the
stock `encode_prompt` runs unchanged; everything else is a few channels wide. Writing one takes about a second.
"""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import Any

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from common.tiny import _bpe, _qwen_tokenizer, _seeded

MODELS = ("flux2_klein", "flux2_dev")

_TEXT_WIDTH = 16
_LATENT_CHANNELS = 4  # patchified 2x2 into the transformer's 16 input channels
_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 4 * _LATENT_CHANNELS,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 3 * _TEXT_WIDTH,  # the pipelines stack three hidden layers of the text encoder
    "timestep_guidance_channels": 32,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (4, 4, 4, 4),
    "rope_theta": 2000,
}
_VAE = {
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "latent_channels": _LATENT_CHANNELS,
    "norm_num_groups": 4,
    "sample_size": 32,
}
# The scheduler config of the black-forest-labs/FLUX.2 repos; the pipelines set mu themselves
# (`compute_empirical_mu`), so base/max shift are not read at inference.
_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}
# Qwen3's chat template reduced to what Flux2KleinPipeline renders: user turns, the generation prompt and the
# empty thinking block that `enable_thinking=False` adds.
_QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
_MISTRAL_SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
)
# Mistral-Small-3.1's chat template reduced to what Flux2Pipeline renders: system and user turns whose content is a
# list of text (and image) blocks.
_MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' }}{%- endif %}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] == 'image' %}{{- '[IMG]' }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def tiny_transformer_config(model: str) -> dict[str, Any]:
    """The tiny transformer config of `model`: [dev] has a guidance embedder, [klein] has none."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    return {**_TRANSFORMER, "guidance_embeds": model == "flux2_dev"}


def tiny_transformer(model: str, seed: int = 0, **overrides: Any) -> Flux2Transformer2DModel:
    """Build only the tiny FLUX.2 transformer of `model` with the real class."""
    config = {**tiny_transformer_config(model), **overrides}
    return _seeded(seed, lambda: Flux2Transformer2DModel(**config))


def _vae(seed: int) -> AutoencoderKLFlux2:
    """A tiny FLUX.2 VAE whose latent batch-norm statistics are not the identity, so the pipelines' normalisation
    of latents is exercised."""
    vae = _seeded(seed, lambda: AutoencoderKLFlux2(**_VAE))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=generator) * 0.1)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=generator) + 0.5)
    return vae


def _klein_components(seed: int) -> dict[str, Any]:
    """All components of a Flux2KleinPipeline: Qwen3 causal LM (28 layers, so hidden state 27 is not the last)."""
    tokenizer = _qwen_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = _QWEN3_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_WIDTH,
        intermediate_size=32,
        num_hidden_layers=28,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**_SCHEDULER),
        "vae": _vae(seed),
        "text_encoder": _seeded(seed, lambda: Qwen3ForCausalLM(config)),
        "tokenizer": tokenizer,
        "transformer": tiny_transformer("flux2_klein", seed),
    }


def _mistral_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer with Mistral's special tokens and chat markers, trained on the tiny corpus."""
    vocab, merges = _bpe(Qwen2Tokenizer(), _MISTRAL_SPECIAL_TOKENS)
    backend = Qwen2Tokenizer(vocab=vocab, merges=merges).backend_tokenizer
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=list(_MISTRAL_SPECIAL_TOKENS[4:]),
        model_max_length=131072,
    )


def _dev_components(seed: int) -> dict[str, Any]:
    """All components of a Flux2Pipeline: Mistral3 (31 text layers) with its Pixtral processor as `tokenizer`."""
    tokenizer = _mistral_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = Mistral3Config(
        text_config=MistralConfig(
            vocab_size=len(tokenizer),
            hidden_size=_TEXT_WIDTH,
            intermediate_size=32,
            num_hidden_layers=31,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,
            bos_token_id=ids("<s>"),
            eos_token_id=ids("</s>"),
            pad_token_id=ids("<pad>"),
        ),
        vision_config=PixtralVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=8,
            image_size=224,
            patch_size=14,
        ),
        image_token_index=ids("[IMG]"),
        spatial_merge_size=2,
        tie_word_embeddings=False,
    )
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessor(patch_size=14, size={"longest_edge": 224}),
        tokenizer=tokenizer,
        patch_size=14,
        spatial_merge_size=2,
        chat_template=_MISTRAL_CHAT_TEMPLATE,
    )
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**_SCHEDULER),
        "vae": _vae(seed),
        "text_encoder": _seeded(seed, lambda: Mistral3ForConditionalGeneration(config)),
        "tokenizer": processor,
        "transformer": tiny_transformer("flux2_dev", seed),
    }


def write_tiny_flux2(model: str, out_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Write a tiny random FLUX.2 checkpoint of `model` in the hub repo layout under out_dir; return out_dir."""
    if model == "flux2_klein":
        pipe = Flux2KleinPipeline(**_klein_components(seed), is_distilled=False)
    elif model == "flux2_dev":
        pipe = Flux2Pipeline(**_dev_components(seed))
    else:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    out = pathlib.Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: write a tiny FLUX.2 checkpoint and print where it went."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_flux2(args.model, args.out_dir, args.seed))


if __name__ == "__main__":
    main()
