"""Validation images while training: the validation edits sampled with the LoRA being trained, as the pipelines would.

Sample k is the edit `--validation_prompts[k]` of `--validation_images[k]`; comma-separated paths give models that
take several references (Qwen-Image-Edit-Plus: "Picture 1", "Picture 2", ...) all of them. Its inputs are prepared
and encoded once, exactly as a training row's (`common.data.prepare_sample` with the run's resolution policy,
`--control_resolution` included, then `common.encoders`), and its
output gets the size the policy gives its first control image: the image being edited keeps its aspect ratio and
the area a training target of that shape gets. (The stock pipelines choose otherwise by default: FLUX.1 Kontext
renders 1024x1024 squares and Edit-Plus follows its last image.) The text encoders are needed only for this, so
they are dropped afterwards unless the caller shares its own.

Sampling is the pipelines' own loop, run for all samples at once as one mixed-size batch through the model's
`predict` (the training forward): sigmas `linspace(1, 1/N, N)` through a copy of the model's scheduler set with
each sample's own dynamic shift (`EditModel.timestep_mu` of its target token count; Qwen's `shift_terminal` stretch
included), the timestep the pipelines feed (`t / 1000`), the scheduler's Euler step, then the model's unpacking and
VAE decoding (`EditModel.decode_latents`). Each step is one conditional forward with the training-time
conditioning: a guidance embedding (FLUX.1, FLUX.2 [dev]) gets `--guidance_scale`, and models with true CFG at
inference (Qwen, FLUX.2 [klein] base) run without it. Sample k starts from
the noise the pipeline draws with `generator=torch.Generator().manual_seed(seed + k)` (`EditModel.initial_noise`),
the same at every validation, so the images show the LoRA's progress and sample k can be reproduced with the stock
pipeline and the saved LoRA.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from torch import Tensor, nn

from common.attention import base_model
from common.batch import NoisyBatch, pack_latents
from common.cli import resolution_policy
from common.data import TOKEN_PIXELS, EditRow, PreparedSample, prepare_sample
from common.encoders import Encoders
from common.errors import UserError
from common.models import EditModel, get_model
from common.run_guard import VALIDATION_DIR
from common.sdpa import sdpa_kernels
from common.training_data import encoders_for


@dataclass
class ValidationSample:
    """One encoded validation edit: its prompt, output size and conditioning, on the sampling device."""

    prompt: str
    height: int  # output pixels
    width: int
    prompt_embeds: Tensor  # (T, D)
    pooled_prompt_embeds: Tensor | None  # (P,), models with a pooled text embedding only
    references: list[Tensor]  # packed reference tokens (M_k, C), in img_shapes order
    img_shapes: list[tuple[int, int, int]]  # packed grids, target first


def validation_rows(prompts: list[str], images: list[str], model: EditModel | str) -> list[EditRow]:
    """One EditRow per validation edit, its first control image standing in as the target that sizes the output."""
    model = get_model(model)
    rows = []
    for k, (prompt, entry) in enumerate(zip(prompts, images, strict=True)):
        paths = [p.strip() for p in entry.split(",") if p.strip()]
        if not paths:
            raise UserError(f"--validation_images entry {k} names no image")
        if reason := model.too_many_references(len(paths)):
            raise UserError(f"--validation_images entry {k}: {reason}")
        if missing := [p for p in paths if not Path(p).expanduser().is_file()]:
            raise UserError(f"--validation_images entry {k}: no such file {missing[0]}")
        sources = {"image": paths[0], **{f"control_{j}": p for j, p in enumerate(paths)}}
        sources["caption"] = f"--validation_prompts[{k}]"
        rows.append(EditRow(k, f"validation[{k}]", paths[0], tuple(paths), prompt.strip() or None, None, sources))
    return rows


class Validation:
    """The validation edits of a run, encoded once; `sample` renders them with the transformer being trained."""

    def __init__(
        self,
        args: argparse.Namespace,
        model: EditModel | str,
        device: torch.device,
        dtype: torch.dtype,
        encoders: Encoders | None = None,
    ) -> None:
        """Prepare and encode every validation edit (with `encoders` if given, else ones loaded here on device)."""
        model = get_model(model)
        if encoders is None:
            encoders = encoders_for(args, model, device, dtype)
        self.model, self.device, self.dtype = model, device, dtype
        self.output_dir = Path(args.output_dir) / VALIDATION_DIR
        policy = resolution_policy(args, model)
        rows = validation_rows(args.validation_prompts, args.validation_images, model)
        self.samples = [self._encode(encoders, prepare_sample(row, model, policy)) for row in rows]
        # What sampling needs besides the transformer; the text encoders are not kept.
        pipe = encoders.pipe
        self.vae, self.image_processor, self.vae_scale_factor = pipe.vae, pipe.image_processor, pipe.vae_scale_factor
        self.scheduler = pipe.scheduler

    def _encode(self, encoders: Encoders, prepared: PreparedSample) -> ValidationSample:
        """Prompt embeddings and packed reference latents of one prepared edit, on the sampling device and dtype."""
        text = encoders.encode_prompt(prepared.prompt, prepared.condition_images)
        pooled = text.get("pooled_prompt_embeds")
        latents = [encoders.encode_image(control) for control in prepared.controls]
        height, width = prepared.target.shape[1:]
        grids = [(height // TOKEN_PIXELS, width // TOKEN_PIXELS)]
        grids += [(c.shape[1] // 2, c.shape[2] // 2) for c in latents]
        return ValidationSample(
            prompt=prepared.prompt,
            height=height,
            width=width,
            prompt_embeds=text["prompt_embeds"].to(self.device, self.dtype),
            pooled_prompt_embeds=None if pooled is None else pooled.to(self.device, self.dtype),
            references=[pack_latents(c).to(self.device, self.dtype) for c in latents],
            img_shapes=[(1, h, w) for h, w in grids],
        )

    def initial_latents(self, k: int, channels: int, seed: int) -> Tensor:
        """Packed starting noise (N, 4 * channels) of sample k, as the pipeline draws it with seed `seed + k`."""
        sample = self.samples[k]
        generator = torch.Generator().manual_seed(seed + k)
        rows, cols = sample.height // TOKEN_PIXELS, sample.width // TOKEN_PIXELS
        return self.model.initial_noise(generator, channels, rows, cols, self.dtype).to(self.device)

    @torch.no_grad()
    def denoise(self, transformer: nn.Module, args: argparse.Namespace) -> list[Tensor]:
        """Final packed latents (N_k, C) of every sample, denoised together as one mixed-size batch."""
        steps = args.validation_inference_steps
        sigmas = np.linspace(1.0, 1 / steps, steps)
        channels = base_model(transformer).config.in_channels // 4
        latents, schedulers, attend = [], [], []
        for k, sample in enumerate(self.samples):
            x = self.initial_latents(k, channels, args.seed)
            scheduler = copy.deepcopy(self.scheduler)  # each sample's own shifted schedule, as its pipeline sets it
            scheduler.set_timesteps(
                sigmas=sigmas, device=self.device, mu=self.model.timestep_mu(x.shape[0], scheduler, steps)
            )
            scheduler.set_begin_index(0)
            latents.append(x)
            schedulers.append(scheduler)
            attend.append(x.shape[0] + sum(r.shape[0] for r in sample.references))
        pooled = [s.pooled_prompt_embeds for s in self.samples]
        pooled = None if pooled[0] is None else pooled
        was_training = transformer.training
        transformer.eval()
        try:
            for step in range(len(schedulers[0].timesteps)):
                timesteps = [scheduler.timesteps[step] for scheduler in schedulers]
                batch = NoisyBatch(
                    sample_ids=[f"validation[{k}]" for k in range(len(self.samples))],
                    noisy=[x.to(self.dtype) for x in latents],
                    references=[s.references for s in self.samples],
                    img_shapes=[s.img_shapes for s in self.samples],
                    prompt_embeds=[s.prompt_embeds for s in self.samples],
                    pooled_prompt_embeds=pooled,
                    sigmas=torch.stack(timesteps).to(self.dtype) / 1000,  # the pipelines' timestep / 1000
                    attend=attend,
                )
                predictions = self.model.predict(transformer, batch, args)
                latents = [
                    scheduler.step(prediction[None], t, x[None], return_dict=False)[0][0]
                    for scheduler, prediction, t, x in zip(schedulers, predictions, timesteps, latents, strict=True)
                ]
        finally:
            transformer.train(was_training)
        return latents

    @torch.no_grad()
    def decode(self, latents: list[Tensor]) -> list[PIL.Image.Image]:
        """Each sample's packed latents unpacked and decoded with its pipeline's own VAE steps."""
        images = []
        for x, sample in zip(latents, self.samples, strict=True):
            pixels = self.model.decode_latents(self.vae, x, sample.height, sample.width, self.vae_scale_factor)
            images.append(self.image_processor.postprocess(pixels, output_type="pil")[0])
        return images

    def sample(self, transformer: nn.Module, args: argparse.Namespace) -> list[PIL.Image.Image]:
        """The validation images as `transformer` renders them now (eval mode meanwhile, its mode restored after), every
        attention call, the VAE's included, with the --sdpa_kernels only."""
        with sdpa_kernels(args.sdpa_kernels):
            return self.decode(self.denoise(transformer, args))

    def save(self, images: list[PIL.Image.Image], step: int, accelerator: Accelerator) -> Path:
        """Write `validation/step-<step>/<k>.png` under the output folder and log to W&B / TensorBoard."""
        folder = self.output_dir / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(images):
            image.save(folder / f"{k}.png")
        for tracker in accelerator.trackers:
            if tracker.name == "wandb":
                import wandb

                captioned = [wandb.Image(image, caption=self.samples[k].prompt) for k, image in enumerate(images)]
                tracker.log({"validation": captioned}, step=step)
            elif tracker.name == "tensorboard":  # one entry per image: the sizes differ
                for k, image in enumerate(images):
                    tracker.log_images({f"validation/{k}": np.asarray(image)[None]}, step, dataformats="NHWC")
        return folder
