"""`EditModel`: everything that differs between the supported edit models, in one frozen description per model.

The shared code (data preparation, encoding, cache, training loop, validation, export, demo, tiny checkpoints) takes
an `EditModel` and asks it; it never tests a model's name. A new model is a new module under `common/models/` that
builds one of these from its family's mixed forward (`common.flux`, `common.qwen`, ...), registered in
`common.models`, plus a thin `train_*.py`. If it needs an `if` anywhere else, this class is missing a field.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from torch import Tensor, nn

from common.batch import NoisyBatch, pack_latents
from common.flow_matching import shift_mu
from common.resolution import ResizePlan, ResolutionPolicy, Rounding

# (pipeline loaded without its transformer, prompt, the sample's condition images, text length or None, device the
# encoders compute on, which is not where their weights live while offloaded) -> CPU
# {"prompt_embeds": (T, D)[, "pooled_prompt_embeds": (P,)]}
PromptEncoder = Callable[[DiffusionPipeline, str, list[PIL.Image.Image], int | None, torch.device], dict[str, Tensor]]
# (pipeline, (1, 3, H, W) image in [-1, 1] laid out as the pipeline's image processor hands it over) -> (C, h, w)
ImageEncoder = Callable[[DiffusionPipeline, Tensor], Tensor]
# (VAE, packed latents (N, C), height, width, vae_scale_factor) -> (1, 3, H, W) pixels in [-1, 1]
LatentDecoder = Callable[[nn.Module, Tensor, int, int, int], Tensor]
# (transformer, batch, parsed flags) -> velocity prediction (N_i, C) on each sample's target tokens
Predict = Callable[[nn.Module, NoisyBatch, argparse.Namespace], list[Tensor]]
# (generator, latent channels, token rows, token cols, dtype) -> packed starting noise (rows * cols, 4 * channels)
NoiseSampler = Callable[[torch.Generator, int, int, int, torch.dtype], Tensor]
# (checkpoint, dtype, revision, with the transformer) -> the stock pipeline with its components loaded
PipelineLoader = Callable[[str, torch.dtype, str | None, bool], Any]
# (every component but the transformer, the transformer, folder) -> None: a checkpoint in the hub repo layout
PipelineWriter = Callable[[dict[str, Any], nn.Module, Path], None]
# (base model id, LoRA path or repo, prompt, inference steps) -> Python that edits "input.png" with the LoRA
UsageSnippet = Callable[[str, str, str, int], str]
# {diffusers module name: (A, B)} with the scale folded into B -> {ComfyUI module name: (A, B)}
ComfyUIKeys = Callable[[dict[str, tuple[Tensor, Tensor]]], dict[str, tuple[Tensor, Tensor]]]


def edit_snippet(imports: str, load: str, lora: str, prompt: str, steps: int, result: str = ").images[0]") -> str:
    """Python for a model card: `imports`, then `load` (which builds `pipe`), the LoRA loaded into it, and one edit of
    "input.png" whose image `result` (the call's closing) takes from the pipeline's output."""
    return f"""import torch
{imports}
from diffusers.utils import load_image

{load}
pipe.load_lora_weights({lora!r})
pipe.to("cuda" if torch.cuda.is_available() else "cpu")

image = load_image("input.png")  # the image to edit
edited = pipe(
    image=image,
    prompt={prompt!r},
    num_inference_steps={steps},
    generator=torch.Generator().manual_seed(0),
{result}
edited.save("edited.png")"""


def no_flags(parser: argparse.ArgumentParser) -> None:
    """A model without trainer flags of its own."""


def no_unused_modules(transformer: nn.Module) -> list[str]:
    """Every LoRA target of the model reaches the loss."""
    return []


def same_keys(pairs: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
    """ComfyUI uses the diffusers module names of this model."""
    return pairs


def scheduler_shift_mu(
    image_seq_len: int, scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int | None = None
) -> float:
    """The FLUX.1 / Qwen-Image pipelines' `calculate_shift` with the scheduler's config (independent of steps)."""
    return shift_mu(image_seq_len, scheduler)


def unpacked_noise(generator: torch.Generator, channels: int, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """Noise drawn as the FLUX.1 / Qwen-Image pipelines draw it, (C, 2 rows, 2 cols) latents, then packed 2x2."""
    return pack_latents(torch.randn((channels, 2 * rows, 2 * cols), generator=generator, dtype=dtype))


@dataclass(frozen=True)
class HubDescription:
    """What the Hub should know about a model: its official repository, tags and licence (for the model card)."""

    repo_id: str
    tags: tuple[str, ...]
    license: str | None = None
    license_name: str | None = None  # for licences the Hub does not name ("other")
    license_link: str | None = None


@dataclass(frozen=True, eq=False)
class EditModel:
    """One edit model as the trainer sees it; see the module doc. Functions are plain callables so a model module
    (or a test) can build a variant with `dataclasses.replace`."""

    name: str  # the --model name of precompute_cache.py and the registry key
    title: str  # how messages name it, e.g. "FLUX.1 Kontext"
    pipeline_class: type  # the stock (or modular) pipeline: encoders, LoRA save/load format, validation decode
    transformer_class: type[nn.Module]

    # Sizes: the pixel multiple and rounding of the pipeline's `calculate_dimensions`-style sizing.
    multiple: int
    rounding: Rounding
    max_references: int | None  # control images per sample; None: any number
    # (w, h) of a reference of w x h pixels as the stock pipeline's __call__ sizes it at inference, or a ResizePlan
    # (crop box within it, size) where the pipeline crops (`--control_resolution pipeline`)
    inference_reference_size: Callable[[int, int], tuple[int, int] | ResizePlan]
    # ((w, h) of the cropped control, (w, h) of its VAE input) -> (w, h) of the image the text encoder sees;
    # None: the text encoder sees no image
    condition_size: Callable[[tuple[int, int], tuple[int, int]], tuple[int, int]] | None

    # Encoding through the stock pipeline (loaded without its transformer).
    encode_prompt: PromptEncoder
    encode_image: ImageEncoder
    decode_latents: LatentDecoder
    # True: the prompt embedding depends on the sample's images, so the empty prompt (caption dropout) is encoded
    # per row; False: one empty-prompt embedding serves the whole cache
    prompt_sees_images: bool
    max_sequence_length: int | None  # default text length (T5-style truncation/padding); None: never truncated

    # Training.
    lora_targets: tuple[str, ...]  # default --lora_target_modules
    install_mixed: Callable[[nn.Module, str], None]  # per-sample processors/rope on the stock transformer
    predict: Predict
    unused_modules: Callable[[nn.Module], list[str]] = no_unused_modules  # outputs that never reach the loss
    add_args: Callable[[argparse.ArgumentParser], None] = no_flags  # the trainer's model-specific flags
    # (target tokens, scheduler, inference steps or None while training) -> mu of the pipeline's dynamic shift,
    # for `--timestep_sampling shift` and validation (FLUX.2's empirical mu depends on the step count)
    timestep_mu: Callable[[int, FlowMatchEulerDiscreteScheduler, int | None], float] = scheduler_shift_mu
    initial_noise: NoiseSampler = unpacked_noise  # validation's starting latents, as the pipeline draws them

    # Export, tiny checkpoint and demo.
    comfyui_keys: ComfyUIKeys | None = same_keys  # None: ComfyUI's names unknown, --export_comfyui is refused
    tiny_transformer_config: Mapping[str, Any] | None = None
    tiny_components: Callable[[int], dict[str, Any]] | None = None  # seed -> every component but the transformer
    demo_controls_per_row: tuple[int, ...] = (1,)  # controls of demo row i: entry i % len
    hub: HubDescription | None = None  # the model card's base model, tags and licence
    script: str = "train.py"  # the trainer script of this model, as the model card's command names it
    # A model whose data this one encodes identically (same pipeline, same sizes), so its caches serve both.
    shares_data_with: str | None = None
    # Loading and writing the pipeline where `pipeline_class.from_pretrained` / `save_pretrained` of a pipeline built
    # from its components do not (modular pipelines load their components explicitly); None: those stock calls.
    pipeline_loader: PipelineLoader | None = None
    pipeline_writer: PipelineWriter | None = None
    usage_snippet: UsageSnippet | None = None  # the model card's code where `pipeline_class` is not a classic pipeline
    # Some LoRA targets reach the loss only in some batches (FLUX.3's reference blocks, in batches without
    # references), so DDP must look for unused parameters every step.
    ddp_find_unused_parameters: bool = False

    @property
    def data_name(self) -> str:
        """How cache fingerprints name this model's data."""
        return self.shares_data_with or self.name

    def load_pipeline(
        self, path: str, dtype: torch.dtype = torch.float32, revision: str | None = None, transformer: bool = True
    ) -> Any:
        """The stock pipeline of the checkpoint at `path`, with its transformer or without it (the encoders only)."""
        if self.pipeline_loader is not None:
            return self.pipeline_loader(path, dtype, revision, transformer)
        kwargs = {} if transformer else {"transformer": None}
        return self.pipeline_class.from_pretrained(path, dtype=dtype, revision=revision, **kwargs)

    def write_pipeline(self, components: dict[str, Any], transformer: nn.Module, out: Path) -> None:
        """Write a checkpoint of these components in the hub repo layout (the tiny checkpoints)."""
        if self.pipeline_writer is not None:
            self.pipeline_writer(components, transformer, out)
            return
        self.pipeline_class(**components, transformer=transformer).save_pretrained(out, safe_serialization=True)

    def policy(self, **kwargs: Any) -> ResolutionPolicy:
        """A ResolutionPolicy with this model's multiple and rounding (kwargs: the policy's other fields)."""
        return ResolutionPolicy(multiple=self.multiple, rounding=self.rounding, **kwargs)

    def too_many_references(self, count: int) -> str | None:
        """Why `count` control images are too many for this model, or None."""
        if self.max_references is None or count <= self.max_references:
            return None
        allowed = "one control image" if self.max_references == 1 else f"at most {self.max_references} control images"
        return f"{self.title} takes {allowed}, got {count}"
