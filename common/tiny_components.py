"""Tiny random components of each model family (FLUX.1, Qwen-Image, FLUX.2, Qwen-Image 2.1, FLUX.3), built with
the real classes.

Text encoders keep the depth their pipelines read hidden states from and are otherwise a few channels wide.

The model descriptions (`common.models`) pick their family's components and transformer config; `common.tiny` writes
them as a checkpoint in the hub repo layout.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    AutoencoderKLQwenImage21,
    FlowMatchEulerDiscreteScheduler,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

_ASCII = string.ascii_letters + string.digits + string.punctuation
_QWEN_SYSTEM_PROMPT = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then explain"
    " how the user's text instruction should alter or modify the image. Generate a new image that meets the user's"
    " requirements while maintaining consistency with the original input where appropriate."
)
# Training text for every tiny tokenizer: every printable ASCII character as a word (no unknown tokens for ASCII
# prompts), a few edit prompts, and the Qwen chat template so that it tokenizes into whole words like the real
# tokenizer (its system prefix is exactly the pipelines' prompt_template_encode_start_idx = 64 tokens long).
_CORPUS = (
    " ".join(_ASCII),
    "Make the sky blue and add a small red dog.",
    "Turn the cat into a tiger sitting on a wooden chair.",
    "Remove the person in the background, keep the lighting.",
    "Picture 1: Picture 2: replace the text with 'hello world' in white letters 0123456789.",
    f"<|im_start|>system\n{_QWEN_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>edit<|im_end|>\n<|im_start|>assistant\n",
)
_QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_SPECIAL_TOKENS_RE = re.compile("|".join(map(re.escape, _QWEN_SPECIAL_TOKENS)))

FLUX_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": [4, 6, 6],
    "guidance_embeds": True,
}
QWEN_TRANSFORMER = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 3,
    "joint_attention_dim": 32,
    "guidance_embeds": False,
    "axes_dims_rope": [8, 4, 4],
    "zero_cond_t": False,
}
QWEN21_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "context_in_dim": 32,
    "mlp_ratio": 3,
    "axes_dims_rope": [4, 6, 6],
    "causal_condition": True,
}
# Scheduler configs of the real repos (black-forest-labs/FLUX.1-Kontext-dev, Qwen/Qwen-Image-Edit*).
_FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
_QWEN_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    """Build a component right after seeding torch, so each component is deterministic on its own."""
    torch.manual_seed(seed)
    return build()


def _corpus_words(tokenizer: Any, end_of_word_suffix: str = "") -> Counter[tuple[str, ...]]:
    """Count the corpus words as `tokenizer`'s own normalizer and pre-tokenizer split them, as symbol tuples."""
    backend = tokenizer.backend_tokenizer
    words: Counter[tuple[str, ...]] = Counter()
    for text in _CORPUS:
        for segment in _SPECIAL_TOKENS_RE.split(text):
            normalized = backend.normalizer.normalize_str(segment) if backend.normalizer else segment
            for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalized):
                words[(*word[:-1], word[-1] + end_of_word_suffix)] += 1
    return words


def _bpe(
    tokenizer: Any, special_tokens: Sequence[str], end_of_word_suffix: str = ""
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE on the corpus until every word is one token; return (vocab, merges).

    Hand-rolled rather than `tokenizers.trainers`, whose output depends on Rust hash-map order and so differs
    between processes; here the most frequent pair wins and ties go to the smallest pair.
    """
    words = _corpus_words(tokenizer, end_of_word_suffix)
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for pair in pairwise(word):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = Counter({_merge(word, best): n for word, n in words.items()})
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    suffixed = [char + end_of_word_suffix for char in alphabet] if end_of_word_suffix else []
    tokens = dict.fromkeys([*special_tokens, *sorted(alphabet), *sorted(suffixed), *(a + b for a, b in merges)])
    return {token: i for i, token in enumerate(tokens)}, merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Apply one BPE merge to a word."""
    out: list[str] = []
    for symbol in word:
        if out and (out[-1], symbol) == pair:
            out[-1] += symbol
        else:
            out.append(symbol)
    return tuple(out)


def _clip_tokenizer() -> CLIPTokenizer:
    """CLIP byte-level BPE tokenizer (bos/eos template, 77 tokens) trained on the corpus."""
    vocab, merges = _bpe(CLIPTokenizer(), ["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>")
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer() -> T5Tokenizer:
    """T5 unigram tokenizer (<pad>=0, </s>=1, <unk>=2, 512 tokens): corpus words plus single ASCII characters."""
    words = Counter({"".join(word): n for word, n in _corpus_words(T5Tokenizer(extra_ids=0)).items()})
    total = sum(words.values())
    pieces = [(word, math.log(n / total)) for word, n in sorted(words.items(), key=lambda item: (-item[1], item[0]))]
    chars = [(char, math.log(1 / total) - 1.0) for char in "▁" + _ASCII if char not in words]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces, *chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen2 byte-level BPE tokenizer with the chat and vision special tokens, trained on the corpus."""
    vocab, merges = _bpe(Qwen2Tokenizer(), _QWEN_SPECIAL_TOKENS)
    return Qwen2Tokenizer(
        vocab=vocab, merges=merges, model_max_length=32768, extra_special_tokens=list(_QWEN_SPECIAL_TOKENS[1:])
    )


def flux_components(seed: int) -> dict[str, Any]:
    """Every component of a FLUX.1 Kontext pipeline but the transformer (CLIP + T5 text encoders, 16-channel VAE)."""
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, like FLUX's t5-v1_1-xxl encoder
        tie_word_embeddings=False,
        decoder_start_token_id=tokenizer_2.pad_token_id,
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
    )
    vae_config = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 16, 16, 16],
        "layers_per_block": 1,
        "latent_channels": 16,
        "norm_num_groups": 4,
        "sample_size": 32,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**_FLUX_SCHEDULER),
        "vae": seeded(seed, lambda: AutoencoderKL(**vae_config)),
        "text_encoder": seeded(seed, lambda: CLIPTextModel(clip_config)),
        "tokenizer": tokenizer,
        "text_encoder_2": seeded(seed, lambda: T5EncoderModel(t5_config)),
        "tokenizer_2": tokenizer_2,
        "image_encoder": None,
        "feature_extractor": None,
    }


def qwen_components(seed: int) -> dict[str, Any]:
    """Every component of a Qwen-Image-Edit(-Plus) pipeline but the transformer (Qwen2.5-VL + processor, 3D VAE)."""
    tokenizer = _qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text_encoder_config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1000000.0},
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 32,
            "window_size": 112,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    vae_config = {
        "base_dim": 8,
        "z_dim": 16,
        "dim_mult": [1, 2, 2, 2],
        "num_res_blocks": 1,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
    }
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
    )
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**_QWEN_SCHEDULER),
        "vae": seeded(seed, lambda: AutoencoderKLQwenImage(**vae_config)),
        "text_encoder": seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(text_encoder_config)),
        "tokenizer": tokenizer,
        "processor": processor,
    }


# ---------------------------------------------------------------------------------------------------------------
# FLUX.2 ([klein]: Qwen3 text encoder; [dev]: Mistral3 text encoder + Pixtral processor)

_FLUX2_TEXT_WIDTH = 16
_FLUX2_LATENT_CHANNELS = 4  # patchified 2x2 into the transformer's 16 input channels
FLUX2_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 4 * _FLUX2_LATENT_CHANNELS,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 3 * _FLUX2_TEXT_WIDTH,  # the pipelines stack three hidden layers of the text encoder
    "timestep_guidance_channels": 32,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (4, 4, 4, 4),
    "rope_theta": 2000,
}
_FLUX2_VAE = {
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "latent_channels": _FLUX2_LATENT_CHANNELS,
    "norm_num_groups": 4,
    "sample_size": 32,
}
# The scheduler config of the black-forest-labs/FLUX.2 repos; the pipelines set mu themselves
# (`compute_empirical_mu`), so base/max shift are not read at inference.
_FLUX2_SCHEDULER = {
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


def _flux2_vae(seed: int) -> AutoencoderKLFlux2:
    """A tiny FLUX.2 VAE whose latent batch-norm statistics are not the identity, so the pipelines' normalisation
    of latents is exercised."""
    vae = seeded(seed, lambda: AutoencoderKLFlux2(**_FLUX2_VAE))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=generator) * 0.1)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=generator) + 0.5)
    return vae


def flux2_klein_components(seed: int) -> dict[str, Any]:
    """Every component of a Flux2KleinPipeline but the transformer: Qwen3 causal LM (28 layers, so hidden state 27,
    the deepest the pipeline reads, is not the last), 4-channel FLUX.2 VAE."""
    tokenizer = _qwen_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = _QWEN3_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=_FLUX2_TEXT_WIDTH,
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
        "scheduler": FlowMatchEulerDiscreteScheduler(**_FLUX2_SCHEDULER),
        "vae": _flux2_vae(seed),
        "text_encoder": seeded(seed, lambda: Qwen3ForCausalLM(config)),
        "tokenizer": tokenizer,
        "is_distilled": False,  # a "base" klein, the kind people train: a default pipeline call runs true CFG
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


def flux2_dev_components(seed: int) -> dict[str, Any]:
    """Every component of a Flux2Pipeline but the transformer: Mistral3 (31 text layers, the pipeline reads 10/20/30)
    with its Pixtral processor as `tokenizer`, 4-channel FLUX.2 VAE."""
    tokenizer = _mistral_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = Mistral3Config(
        text_config=MistralConfig(
            vocab_size=len(tokenizer),
            hidden_size=_FLUX2_TEXT_WIDTH,
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
        "scheduler": FlowMatchEulerDiscreteScheduler(**_FLUX2_SCHEDULER),
        "vae": _flux2_vae(seed),
        "text_encoder": seeded(seed, lambda: Mistral3ForConditionalGeneration(config)),
        "tokenizer": processor,
    }


# ---------------------------------------------------------------------------------------------------------------
# Qwen-Image 2.1 (Qwen3-VL text encoder + processor, 16x RGBA VAE)

# The chat template reduced to what QwenImage21Pipeline renders with it: the system message it tokenizes to count
# the tokens it drops (its prompts are raw template strings, tokenized by the processor).
_QWEN21_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for item in message['content'] %}{%- if item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen3-VL sees 16-pixel patches merged 2x2: one image slot per 32x32 pixels, i.e. per 2x2 tokens of the 16x VAE.
# The smallest edge bound lets tiny 32-pixel images through unresized, so slots and latents stay in step.
_QWEN3_VL_IMAGE_PROCESSOR = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2}
_QWEN3_VL_PIXELS = {"shortest_edge": 32 * 32, "longest_edge": 2048 * 2048}


def qwen21_components(seed: int) -> dict[str, Any]:
    """Every component of a QwenImage21Pipeline but the transformer (Qwen3-VL + processor, RGBA VAE, scheduler)."""
    tokenizer = _qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text_encoder_config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": QWEN21_TRANSFORMER["context_in_dim"],
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 5000000.0},
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": QWEN21_TRANSFORMER["context_in_dim"],
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    vae_config = {
        "base_dim": 8,
        "decoder_base_dim": 8,
        "z_dim": QWEN21_TRANSFORMER["in_channels"],
        "dim_mult": [1, 1, 1, 1, 1],
        "num_res_blocks": 1,
        "attn_scales": [],
        "temperal_downsample": [False, True, True, True],
        "latents_mean": [0.0] * QWEN21_TRANSFORMER["in_channels"],
        "latents_std": [1.0] * QWEN21_TRANSFORMER["in_channels"],
    }
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**_QWEN3_VL_IMAGE_PROCESSOR, size=_QWEN3_VL_PIXELS),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(),
        chat_template=_QWEN21_CHAT_TEMPLATE,
    )
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**_QWEN_SCHEDULER),
        "vae": seeded(seed, lambda: AutoencoderKLQwenImage21(**vae_config)),
        "text_encoder": seeded(seed, lambda: Qwen3VLForConditionalGeneration(text_encoder_config)),
        "processor": processor,
    }


# ---------------------------------------------------------------------------------------------------------------
# FLUX.3 ([klein]: Qwen3-VL text encoder, the FLUX.2 VAE)

_FLUX3_TEXT_WIDTH = 16
_FLUX3_TEXT_LAYERS = (4, 8, 12, 16, 20, 24, 28, 32)  # `Flux3TextEncoderStep`'s default `text_encoder_out_layers`
FLUX3_TRANSFORMER = {
    "in_channels": 4 * _FLUX2_LATENT_CHANNELS,
    "cond_in_channels": 4 * _FLUX2_LATENT_CHANNELS,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": len(_FLUX3_TEXT_LAYERS) * _FLUX3_TEXT_WIDTH,  # the stacked hidden layers
    "timestep_channels": 32,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (4, 4, 4, 4),
    "rope_theta": 10000,
}
# Qwen3-VL's chat template reduced to what `Flux3TextEncoderStep` renders: user turns of plain text and the
# generation prompt.
_FLUX3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_FLUX3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 6.93}  # `Flux3SetTimestepsStep`'s constant shift


def flux3_qwen3_vl(seed: int) -> tuple[Qwen3VLForConditionalGeneration, Qwen3VLProcessor]:
    """A tiny Qwen3-VL (33 text layers, so hidden state 32, the deepest FLUX.3 reads, is not the last) and its
    processor, as `Flux3TextEncoderStep` takes them (`text_encoder`, `tokenizer`)."""
    tokenizer = _qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": _FLUX3_TEXT_WIDTH,
            "intermediate_size": 32,
            "num_hidden_layers": 33,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "max_position_embeddings": 8192,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 5000000.0},
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": _FLUX3_TEXT_WIDTH,
            "deepstack_visual_indexes": [0],
            "num_position_embeddings": 16,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, merge_size=2),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(),
        chat_template=_FLUX3_CHAT_TEMPLATE,
    )
    return seeded(seed, lambda: Qwen3VLForConditionalGeneration(config)), processor


def flux3_klein_components(seed: int) -> dict[str, Any]:
    """Every loaded component of a `Flux3ModularPipeline` but the transformer: tiny Qwen3-VL + processor, the tiny
    FLUX.2 VAE (FLUX.3 uses `AutoencoderKLFlux2`), the constant-shift scheduler."""
    text_encoder, tokenizer = flux3_qwen3_vl(seed)
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**_FLUX3_SCHEDULER),
        "vae": _flux2_vae(seed),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
    }
