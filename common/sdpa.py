"""`--sdpa_kernels`: which kernels PyTorch's scaled-dot-product attention may pick, for every attention call we make.

torch 2.11 tries cuDNN attention first on Hopper GPUs, and at full size (FLUX.1 Kontext: 8,704 joint tokens, 24 heads
of 128, bf16) it dies with an illegal memory access, in the stock diffusers forward too; flash attention runs the
same step (README "Attention kernels"). So cuDNN attention is excluded by default, on every device. The choice is
PyTorch's process-wide SDPA flags (`torch.nn.attention.sdpa_kernel`), so holding it around a training step covers
the backward and the forward that gradient checkpointing recomputes inside it, and around sampling every
transformer and VAE attention call.
"""

import argparse
import inspect
from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# Flag names -> PyTorch's backends; `enabled_sdpa_kernels` reads the flags back under the same names.
SDPA_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
DEFAULT_SDPA_KERNELS = ("flash", "efficient", "math")
_FLAGS = {
    "flash": torch.backends.cuda.flash_sdp_enabled,
    "efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
    "cudnn": torch.backends.cuda.cudnn_sdp_enabled,
    "math": torch.backends.cuda.math_sdp_enabled,
}
# `set_priority` (the list's order is the order of preference) is newer than the context manager itself.
_HAS_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters


def parse_sdpa_kernels(value: str) -> tuple[str, ...]:
    """--sdpa_kernels: comma-separated kernel names, in order of preference, e.g. "flash,efficient,math"."""
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names or not set(names) <= SDPA_KERNELS.keys():
        raise argparse.ArgumentTypeError(f"expected names out of {','.join(SDPA_KERNELS)}, got {value!r}")
    return names


def add_sdpa_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--sdpa_kernels, shared by every trainer."""
    parser.add_argument(
        "--sdpa_kernels",
        type=parse_sdpa_kernels,
        default=DEFAULT_SDPA_KERNELS,
        help="PyTorch attention kernels allowed, in order of preference, out of flash,efficient,cudnn,math "
        f"(default {','.join(DEFAULT_SDPA_KERNELS)}: cuDNN attention crashes at full size on torch 2.11, Hopper)",
    )


def sdpa_kernels(names: Sequence[str] = DEFAULT_SDPA_KERNELS) -> AbstractContextManager:
    """Context (or decorator) in which SDPA may use only the kernels `names`, preferring them in that order."""
    backends = [SDPA_KERNELS[name] for name in names]
    return sdpa_kernel(backends, set_priority=True) if _HAS_PRIORITY else sdpa_kernel(backends)


def without_cudnn() -> AbstractContextManager:
    """Context in which SDPA may use the kernels enabled now except cuDNN attention (math if that leaves none), for
    calls with a mask: on an H200 with torch 2.11 its backward gave the masked-out (padded) positions NaN or nonzero
    gradients where every other kernel gives exactly 0."""
    names = [name for name in enabled_sdpa_kernels() if name != "cudnn"] or ["math"]
    return sdpa_kernel([SDPA_KERNELS[name] for name in names])  # flags only: the preference order is kept


def enabled_sdpa_kernels() -> list[str]:
    """Names of the SDPA kernels enabled right now (PyTorch's process-wide flags)."""
    return [name for name, enabled in _FLAGS.items() if enabled()]
