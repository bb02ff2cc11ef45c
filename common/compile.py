"""`--compile`: regional compilation of the transformer blocks, as diffusers' `compile_repeated_blocks`.

Each block class the model lists in `_repeated_blocks` (FLUX: double- and single-stream blocks; Qwen-Image: its
block) is compiled in place, so one graph serves all blocks of a class and compiling takes a few graphs instead of
the whole model. Shapes are dynamic from the first call (`dynamic=True`): mixed batches change the batch size,
sequence and text lengths every step and must reuse the graphs instead of recompiling per layout. What depends on
the batch's Python lengths stays eager: the per-sample rotary tables and `MixedAttention` are built outside the
blocks, and `common.attention.mixed_attention` is excluded with `torch.compiler.disable` (a graph break before and
after attention).
"""

import torch
from accelerate.logging import get_logger
from torch import nn

from common.attention import base_model

logger = get_logger(__name__)


def compile_blocks(transformer: nn.Module) -> None:
    """Compile every repeated block of `transformer` (it may be wrapped by PEFT/DDP) with dynamic shapes, in place.

    Turns off Inductor's coalescing analysis of tilings for this process (graphs compile at the first forward): its
    own config says it does not apply to dynamic shapes, yet it runs on them, and on full-size FLUX.1 Kontext with
    torch 2.11 it asserted in `tiling_utils.get_pw_red_splits` during Triton codegen. Without it Inductor tiles
    with its older heuristic."""
    from torch._inductor import config as inductor_config

    triton_config = inductor_config.triton
    if hasattr(triton_config, "coalesce_tiling_analysis"):  # torch >= 2.8; older versions have no such analysis
        triton_config.coalesce_tiling_analysis = False
    base_model(transformer).compile_repeated_blocks(dynamic=True)


def compiled_frames() -> int:
    """Frames TorchDynamo has compiled in this process so far (first compiles and recompiles)."""
    return torch._dynamo.utils.counters["frames"]["ok"]


class CompileWatch:
    """Logs the training steps during which TorchDynamo compiled, with their time: the first steps and each new
    batch layout compile (minutes on CPU, against seconds per eager step), and users should see where time went."""

    def __init__(self) -> None:
        """Start counting from the frames compiled so far."""
        self.frames = compiled_frames()
        self.seconds = 0.0

    def after_step(self, step: int, seconds: float) -> None:
        """Log step `step` (which took `seconds`) if it compiled new graphs."""
        frames = compiled_frames()
        if frames > self.frames:
            self.seconds += seconds
            logger.info(
                f"--compile: step {step} compiled {frames - self.frames} new graph(s) and took {seconds:.1f} s "
                f"({self.seconds:.1f} s in compiling steps so far); steps with layouts compiled before reuse the "
                "graphs",
                main_process_only=True,
            )
            self.frames = frames
