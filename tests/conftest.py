"""Test-wide settings: no network, W&B offline, deterministic CPU math."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402
import torch  # noqa: E402

from common.tiny import write_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a tiny random checkpoint in the hub layout of MODEL, written once per session."""
    written = {}

    def get(model: str):
        if model not in written:
            written[model] = write_tiny(model, tmp_path_factory.mktemp(model))
        return written[model]

    return get


def randomize_lora(module: torch.nn.Module, seed: int = 0) -> None:
    """Give LoRA B matrices random values (PEFT starts them at zero, which would make A's gradients vanish)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def lora_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the LoRA parameter gradients, by name."""
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()
