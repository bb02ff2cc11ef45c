"""Model-specific encoding of one prepared sample through the stock diffusers pipelines, exactly as at inference.

The pipeline is loaded without its transformer and its own methods do the work (`encode_prompt`,
`_encode_vae_image`), so the conditioning a LoRA is trained on is the conditioning the stock pipeline feeds it:

- FLUX.1 Kontext: T5 embeddings padded to `max_sequence_length` (the pipeline attends to the padding too), CLIP
  pooled embedding, VAE latents `(argmax - shift_factor) * scaling_factor`.
- Qwen-Image-Edit(-Plus): the Qwen2.5-VL embedding of the prompt *with the sample's condition images* through the
  pipeline's chat template, prefix dropped (`prompt_template_encode_start_idx`), unpadded; 3D-VAE latents
  normalised by `latents_mean` / `latents_std`, frame dim dropped. The embedding depends on the images, so a cache
  of it must be keyed by sample, never by prompt.
- Qwen rows without a control image (the sample carries only its target): no stock pipeline can run without an image
  (both `__call__`s read `image.size`), and Qwen-Image-Edit's template holds an `<|image_pad|>` that its processor
  refuses to leave empty; the only stock code that encodes a prompt without an image is Edit-Plus's
  `encode_prompt(prompt, image=None)` (its template with no "Picture k" entries, i.e. Edit's template without the
  vision block), so both Qwen models encode such prompts that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import PIL.Image
import torch
from diffusers import DiffusionPipeline, FluxKontextPipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline

if TYPE_CHECKING:
    from common.data import PreparedSample

PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "flux_kontext": FluxKontextPipeline,
    "qwen_edit": QwenImageEditPipeline,
    "qwen_edit_plus": QwenImageEditPlusPipeline,
    "qwen_edit_2511": QwenImageEditPlusPipeline,
}
MODELS = tuple(PIPELINES)
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # FluxKontextPipeline's default T5 length


class SampleLike(Protocol):
    """The fields of `common.data.PreparedSample` that encoding reads."""

    prompt: str
    target: torch.Tensor
    controls: list[torch.Tensor]
    condition_images: list[PIL.Image.Image]


def _check_model(model: str) -> None:
    """Raise ValueError for an unsupported model name."""
    if model not in PIPELINES:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")


def latent_shape_to_tokens(model: str, c_h_w: Sequence[int]) -> tuple[int, int]:
    """Packed token grid (rows, cols) of a (C, h, w) latent: 2x2 latent patches for every supported model."""
    _check_model(model)
    _, h, w = c_h_w
    if h % 2 or w % 2:
        raise ValueError(f"latent size {h}x{w} is not even, so it cannot be packed 2x2")
    return h // 2, w // 2


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Pack (C, h, w) latents into (h/2 * w/2, 4C) tokens in the layout of the pipelines' `_pack_latents`."""
    c, h, w = latents.shape
    return latents.view(c, h // 2, 2, w // 2, 2).permute(1, 3, 0, 2, 4).reshape((h // 2) * (w // 2), c * 4)


class Encoders:
    """Frozen text encoders and VAE of one model, run through its stock pipeline (loaded without the transformer)."""

    def __init__(
        self,
        model: str,
        pipe: DiffusionPipeline,
        *,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        device: torch.device | None = None,
    ) -> None:
        """Wrap `pipe`; `max_sequence_length` is the FLUX T5 length (the Qwen pipelines never truncate); `device`:
        where the encoders compute when their weights live elsewhere (offloaded), else where they are."""
        _check_model(model)
        self.model = model
        self.execution_device = device
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval().requires_grad_(False)
        # Prompts without images go through Edit-Plus's encode_prompt(image=None) (module doc), sharing the modules.
        self._text_only_pipe = QwenImageEditPlusPipeline(**pipe.components) if model == "qwen_edit" else pipe

    @property
    def is_flux(self) -> bool:
        """Whether this is FLUX.1 Kontext (else a Qwen-Image-Edit variant)."""
        return self.model == "flux_kontext"

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
        if self.is_flux:
            latents = self.pipe._encode_vae_image(x, generator=None)[0]
        else:
            latents = self.pipe._encode_vae_image(x[:, :, None], generator=None)[0, :, 0]
        return latents.cpu().contiguous()

    @torch.no_grad()
    def encode_prompt(self, prompt: str, condition_images: Sequence[PIL.Image.Image] = ()) -> dict[str, torch.Tensor]:
        """Prompt embeddings on CPU: "prompt_embeds" (T, D), and for FLUX "pooled_prompt_embeds" (P,)."""
        if self.is_flux:
            if condition_images:
                raise ValueError("FLUX.1 Kontext's text encoders see no images; condition_images must be empty")
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompt, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
            )
            return {"prompt_embeds": embeds[0].cpu().contiguous(), "pooled_prompt_embeds": pooled[0].cpu().contiguous()}
        images = list(condition_images)
        if self.model == "qwen_edit" and len(images) > 1:
            raise ValueError(f"Qwen-Image-Edit's template holds at most one image, got {len(images)}")
        if not images:  # a row without control (module doc)
            pipe, image = self._text_only_pipe, None
        else:  # Edit's pipeline passes its single resized PIL image, Edit-Plus's the list
            pipe, image = self.pipe, images[0] if self.model == "qwen_edit" else images
        embeds, mask = pipe.encode_prompt(prompt, image=image, device=self.device)
        embeds = embeds[0] if mask is None else embeds[0, mask[0].bool()]
        return {"prompt_embeds": embeds.cpu().contiguous()}

    def encode(self, sample: SampleLike) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Encode one sample: prompt embeddings (+ FLUX pooled), "target_latents" and "control_latents", on CPU."""
        if not self.is_flux and len(sample.condition_images) != len(sample.controls):
            raise ValueError(
                f"{self.model}: {len(sample.condition_images)} condition images for {len(sample.controls)} controls"
            )
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {}
        out.update(self.encode_prompt(sample.prompt, sample.condition_images))
        out["target_latents"] = self.encode_image(sample.target)
        out["control_latents"] = [self.encode_image(control) for control in sample.controls]
        return out


def encode_row(encoders: Encoders, prepared: PreparedSample) -> dict[str, Any]:
    """One training row of a prepared sample, as precompute_cache.py stores it and uncached training yields it.

    `encoders.encode` keys, plus "sample_id", "mask", "img_shapes" (packed token grid [1, h, w] of the target, then
    of each control) and "sources"; Qwen rows add "empty_prompt_embeds", the caption-dropout embedding, which
    depends on the row's condition images (FLUX's does not: it is stored once per cache).
    """
    row: dict[str, Any] = dict(encoders.encode(prepared))
    if not encoders.is_flux:
        row["empty_prompt_embeds"] = encoders.encode_prompt("", prepared.condition_images)["prompt_embeds"]
    latents = [row["target_latents"], *row["control_latents"]]
    row["sample_id"] = prepared.sample_id
    row["mask"] = prepared.mask
    row["img_shapes"] = [[1, *latent_shape_to_tokens(encoders.model, lat.shape)] for lat in latents]
    row["sources"] = prepared.sources
    return row


def load_encoders(
    model: str,
    pretrained_model_name_or_path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    offload: bool = False,
) -> Encoders:
    """Load `model`'s stock pipeline without its transformer and wrap its encoders; with `offload` their weights stay
    in CPU memory and go to `device` block by block only while encoding (`common.base_weights.offload_pipeline`)."""
    _check_model(model)
    pipe = PIPELINES[model].from_pretrained(
        pretrained_model_name_or_path, transformer=None, dtype=dtype, revision=revision
    )
    pipe.set_progress_bar_config(disable=True)
    if offload:
        from common.base_weights import offload_pipeline

        offload_pipeline(pipe, device)
        return Encoders(model, pipe, max_sequence_length=max_sequence_length, device=torch.device(device))
    return Encoders(model, pipe.to(device), max_sequence_length=max_sequence_length)
