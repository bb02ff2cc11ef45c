"""Rectified-flow training targets as the FLUX / Qwen-Image pipelines integrate them, drawn per sample.

Every random draw of a sample (caption/control dropout coins, sigma, noise) comes from a generator seeded by
(seed, epoch, dataset index), so a sample gets the same draws whichever rank, batch or resumed run trains it:
that is what makes multi-GPU runs equal single-GPU ones and resumed runs equal uninterrupted ones.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling
from torch import Tensor

TIMESTEP_SAMPLING = ("uniform", "logit_normal", "sigmoid", "shift")


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """CPU generator for one sample's draws in one epoch, independent of rank and batch composition."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def shift_mu(image_seq_len: int, scheduler: FlowMatchEulerDiscreteScheduler) -> float:
    """mu of the dynamic shift for a sample of `image_seq_len` target tokens, with the pipelines' own arguments."""
    config = scheduler.config
    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


def sample_sigma(
    method: str,
    generator: torch.Generator,
    image_seq_len: int,
    scheduler: FlowMatchEulerDiscreteScheduler,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    sigmoid_scale: float = 1.0,
    mu: Callable[[int, FlowMatchEulerDiscreteScheduler], float] | None = None,
) -> float:
    """One sample's noise level sigma in (0, 1).

    uniform: U(0, 1). logit_normal: sigmoid(N(logit_mean, logit_std)) (SD3). sigmoid: sigmoid(scale * N(0, 1)).
    shift: sigmoid(N(0, 1)) moved by the scheduler's own time shift with mu from this sample's target token count,
    so a large image trains at the noise levels the pipeline will sample it at (`mu`: the model's own rule, default
    `shift_mu`). (Qwen's `shift_terminal` only
    stretches the inference grid to end at a given sigma; it is not a map of sigma and is not applied here.)
    """
    if method in ("uniform", "logit_normal"):
        u = compute_density_for_timestep_sampling(
            method, 1, logit_mean=logit_mean, logit_std=logit_std, generator=generator
        )
    elif method == "sigmoid":
        u = torch.sigmoid(sigmoid_scale * torch.randn(1, generator=generator))
    elif method == "shift":
        u = torch.sigmoid(torch.randn(1, generator=generator))
        u = scheduler.time_shift((mu or shift_mu)(image_seq_len, scheduler), 1.0, u)
    else:
        raise ValueError(f"--timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {method!r}")
    # Keep away from the ends: sigma = 0 has nothing to denoise, sigma = 1 no signal; both are degenerate targets.
    return float(u.clamp(1e-4, 1 - 1e-4))


def noisy_and_target(x0: Tensor, noise: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """Flow matching: noisy = (1 - sigma) x0 + sigma * noise; the model predicts the velocity noise - x0."""
    if not 0.0 <= sigma <= 1.0 or math.isnan(sigma):
        raise ValueError(f"sigma must lie in [0, 1], got {sigma}")
    return (1.0 - sigma) * x0 + sigma * noise, noise - x0
