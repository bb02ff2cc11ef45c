"""common.flow_matching: per-sample draws and the pipelines' own shifted schedule."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from common.flow_matching import noisy_and_target, sample_generator, sample_sigma, shift_mu


@pytest.fixture(params=["flux_kontext", "qwen_edit"])
def scheduler(request, tiny_checkpoint):
    return FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_checkpoint(request.param), subfolder="scheduler")


def test_generator_depends_on_seed_epoch_and_index_only():
    draw = lambda *key: torch.rand(3, generator=sample_generator(*key))  # noqa: E731
    assert torch.equal(draw(0, 1, 5), draw(0, 1, 5))
    assert not torch.equal(draw(0, 1, 5), draw(0, 1, 6))
    assert not torch.equal(draw(0, 1, 5), draw(0, 2, 5))
    assert not torch.equal(draw(0, 1, 5), draw(1, 1, 5))


@pytest.mark.parametrize("tokens", [256, 1024, 4096])
def test_shift_is_the_pipeline_schedule_for_the_sample_size(scheduler, tokens):
    """A uniform grid pushed through our shift equals the sigmas the scheduler sets for that many tokens.

    Qwen's `shift_terminal` stretch depends on the inference grid's last step, not on sigma, so it is left out.
    """
    grid = np.linspace(1.0, 1 / 20, 20)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift_terminal=None)
    scheduler.set_timesteps(sigmas=grid, mu=shift_mu(tokens, scheduler))
    ours = scheduler.time_shift(shift_mu(tokens, scheduler), 1.0, torch.tensor(grid))
    assert torch.allclose(ours.float(), scheduler.sigmas[:-1].float(), atol=1e-6)


def test_shift_moves_large_images_to_higher_noise(scheduler):
    small = [sample_sigma("shift", sample_generator(0, 0, i), 256, scheduler) for i in range(200)]
    large = [sample_sigma("shift", sample_generator(0, 0, i), 8192, scheduler) for i in range(200)]
    assert all(b > a for a, b in zip(small, large, strict=True))
    assert np.mean(large) - np.mean(small) > 0.03


@pytest.mark.parametrize("method", ["uniform", "logit_normal", "sigmoid", "shift"])
def test_sigmas_lie_inside_the_unit_interval(scheduler, method):
    sigmas = [sample_sigma(method, sample_generator(3, 0, i), 1024, scheduler) for i in range(100)]
    assert all(0.0 < s < 1.0 for s in sigmas)
    assert np.std(sigmas) > 0.05


def test_unknown_method_is_rejected(scheduler):
    with pytest.raises(ValueError, match="--timestep_sampling"):
        sample_sigma("cosine", sample_generator(0, 0, 0), 16, scheduler)


def test_noisy_and_target_are_the_rectified_flow():
    x0, noise = torch.randn(5, 4), torch.randn(5, 4)
    noisy, target = noisy_and_target(x0, noise, 0.25)
    assert torch.allclose(noisy, 0.75 * x0 + 0.25 * noise)
    assert torch.equal(target, noise - x0)
    # Integrating the true velocity from sigma back to 0 recovers x0.
    assert torch.allclose(noisy - 0.25 * target, x0, atol=1e-6)
