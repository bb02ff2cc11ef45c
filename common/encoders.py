"""Encoding of one prepared sample through the model's stock diffusers pipeline, exactly as at inference.

The pipeline is loaded without its transformer and its own methods do the work (the model description's
`encode_prompt` / `encode_image` call `encode_prompt` and `_encode_vae_image`), so the conditioning a LoRA is
trained on is the conditioning the stock pipeline feeds it. Where the prompt embedding depends on the images
(`EditModel.prompt_sees_images`), a cache of it must be keyed by sample, never by prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import PIL.Image
import torch
from diffusers import DiffusionPipeline

from common.batch import latent_shape_to_tokens
from common.models import EditModel, get_model

if TYPE_CHECKING:
    from common.data import PreparedSample


class SampleLike(Protocol):
    """The fields of `common.data.PreparedSample` that encoding reads."""

    prompt: str
    target: torch.Tensor
    controls: list[torch.Tensor]
    condition_images: list[PIL.Image.Image]


class Encoders:
    """Frozen text encoders and VAE of one model, run through its stock pipeline (loaded without the transformer)."""

    def __init__(
        self,
        model: EditModel | str,
        pipe: DiffusionPipeline,
        *,
        max_sequence_length: int | None = None,
        device: torch.device | None = None,
    ) -> None:
        """Wrap `pipe`; `max_sequence_length` is the text length (default: the model's; ignored where it has none);
        `device`: where the encoders compute when their weights live elsewhere (offloaded), else where they are."""
        self.model = get_model(model)
        self.execution_device = device
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length or self.model.max_sequence_length
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        """Device the encoders run on."""
        return self.execution_device or self.pipe.vae.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype the encoders run in."""
        return self.pipe.vae.dtype

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Normalised VAE latents (C, h, w) on CPU of one (3, H, W) image in [-1, 1], via `_encode_vae_image`."""
        multiple = self.pipe.vae_scale_factor * 2
        if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] % multiple or image.shape[2] % multiple:
            raise ValueError(f"expected a (3, H, W) image with H, W multiples of {multiple}, got {tuple(image.shape)}")
        # The pipelines' image processor hands the VAE a (1, H, W, 3) numpy batch permuted to (1, 3, H, W); convolution
        # kernels round differently by memory layout (strides of size-1 dims included), so lay it out the same way.
        x = image.to(device=self.device, dtype=self.dtype).permute(1, 2, 0)[None].contiguous().permute(0, 3, 1, 2)
        return self.model.encode_image(self.pipe, x).cpu().contiguous()

    @torch.no_grad()
    def encode_prompt(self, prompt: str, condition_images: Sequence[PIL.Image.Image] = ()) -> dict[str, torch.Tensor]:
        """Prompt embeddings on CPU: "prompt_embeds" (T, D), and "pooled_prompt_embeds" (P,) where the model has one."""
        return self.model.encode_prompt(
            self.pipe, prompt, list(condition_images), self.max_sequence_length, self.device
        )

    def encode(self, sample: SampleLike) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Encode one sample: prompt embeddings (+ pooled), "target_latents" and "control_latents", on CPU."""
        if self.model.condition_size is not None and len(sample.condition_images) != len(sample.controls):
            raise ValueError(
                f"{self.model.name}: {len(sample.condition_images)} condition images for {len(sample.controls)} "
                "controls"
            )
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {}
        out.update(self.encode_prompt(sample.prompt, sample.condition_images))
        out["target_latents"] = self.encode_image(sample.target)
        out["control_latents"] = [self.encode_image(control) for control in sample.controls]
        return out


def encode_row(encoders: Encoders, prepared: PreparedSample) -> dict[str, Any]:
    """One training row of a prepared sample, as precompute_cache.py stores it and uncached training yields it.

    `encoders.encode` keys, plus "sample_id", "mask", "img_shapes" (packed token grid [1, h, w] of the target, then
    of each control) and "sources"; models whose prompt embedding sees the images add "empty_prompt_embeds", the
    caption-dropout embedding of the row's condition images (the others store one per cache).
    """
    row: dict[str, Any] = dict(encoders.encode(prepared))
    if encoders.model.prompt_sees_images:
        row["empty_prompt_embeds"] = encoders.encode_prompt("", prepared.condition_images)["prompt_embeds"]
    latents = [row["target_latents"], *row["control_latents"]]
    row["sample_id"] = prepared.sample_id
    row["mask"] = prepared.mask
    row["img_shapes"] = [[1, *latent_shape_to_tokens(lat.shape)] for lat in latents]
    row["sources"] = prepared.sources
    return row


def load_encoders(
    model: EditModel | str,
    pretrained_model_name_or_path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    max_sequence_length: int | None = None,
    offload: bool = False,
) -> Encoders:
    """Load `model`'s stock pipeline without its transformer and wrap its encoders; with `offload` their weights stay
    in CPU memory and go to `device` block by block only while encoding (`common.base_weights.offload_pipeline`)."""
    model = get_model(model)
    pipe = model.load_pipeline(pretrained_model_name_or_path, dtype, revision, transformer=False)
    pipe.set_progress_bar_config(disable=True)
    if offload:
        from common.base_weights import offload_pipeline

        offload_pipeline(pipe, device)
        return Encoders(model, pipe, max_sequence_length=max_sequence_length, device=torch.device(device))
    return Encoders(model, pipe.to(device), max_sequence_length=max_sequence_length)
