"""Peak memory of one LoRA training step (forward, backward, AdamW step) per memory option. Not a test.

Configurations: FLUX.1 Kontext (19 double + 38 single blocks, T5 length 512, one 1024x1024 reference) and
Qwen-Image-Edit-2509 (60 blocks; one reference, and two for Edit-Plus's multi-reference case; text 250 / 450 tokens:
the prompt plus the Qwen2.5-VL tokens of the 384x384 condition images), target 1024x1024 = 64x64 packed tokens,
each reference the same; batch 1 and 4; gradient checkpointing on and off; LoRA rank 16 on the trainers' default
targets, LoRA weights and AdamW states float32, base bfloat16 under bf16 autocast (the trainers'
`--mixed_precision bf16`). Random weights (memory does not depend on their values). Each case loads the base through
the trainers' own path (`common.base_weights.load_transformer` + `add_lora` + `place_base_weights`): on CPU from a
small checkpoint written once, on CUDA from a folder holding only the config, whose random weights
`bench.random_weights` builds on the GPU at load (no 24-41 GB checkpoint written per process).

On CUDA (`--device cuda`): every option runs at full size and the cell is torch.cuda.max_memory_allocated. Measure
ONE option per process (`--options fp8`): memory of an earlier model was seen not to come back within one process.
On CPU the peak is estimated as the sum of
  static   the base weights as the option stores them on the device, the LoRA's float32 weights, gradients and two
           AdamW states (16 bytes/parameter), and the model inputs: counted from the parameters;
  dynamic  activations and temporaries, measured with torch's MemTracker (every tensor an op returns) on bf16 models
           of the real structure and head size (128) with 1 and 2 heads, under bf16 autocast with CUDA's float32 ops
           (CPU autocast keeps layer_norm in bf16, CUDA runs it in float32), at two small token counts, and
           extrapolated to 24 heads and the real tokens and blocks: every activation is (tokens x heads x 128) or
           (tokens x heads) or per token alone, and every LoRA weight is rank x (in + out), so in each phase
               dynamic = sum over j in (model, block kinds) of n_j * (p_j + q_j*H + r_j*T + s_j*H*T)
           (H heads, T = B*L real tokens in the batch, n_j blocks of kind j, n_model = 1), fitted exactly from
           (1 + kinds) block configurations x 2 head counts x 2 token counts. The phases: the end of the forward
           (every checkpointed input plus autocast's bf16 copy of every LoRA weight), and, per block kind, the
           backward of the last block of that kind (every saved input still alive, that block recomputed); a
           held-out run (more blocks, 3 heads, batch 2) checks the fit;
  CUDA     what MemTracker cannot see because no op returns it: the flash-attention backward's float32 dq accumulator
           (B, L rounded up to 128, H, 128) and softmax_d (B, H, L rounded), and the cuBLAS/cuBLASLt workspace (32 MiB
           on Hopper, allocated through the caching allocator).
peak = static + max(forward, backward of each kind + flash backward, AdamW step temporaries) + cuBLAS workspace.
AdamW is the foreach implementation (CUDA's default): its step holds one float32 temporary per LoRA parameter.
Options derived from the static part (the dynamic part is the same):
  fp8:      block linear weights 1 byte + a float32 scale per output row, and the largest one dequantized while it
            computes (a float32 and a bf16 copy, `common.base_weights._frozen_weight`), in forward and backward
  offload:  of the blocks' frozen linear weights, only the running block and the prefetched one on the device
  nf4/int8: block linear weights 0.516 bytes/param (4 bits + double-quantized absmax per 64) / 1 byte/param; not
            counting bitsandbytes' dequantization buffers

    python -m bench.memory                       # CPU estimate, every case; prints the table
    python -m bench.memory --device cuda --cases 0 --options fp8 --batch_sizes 1 --checkpointing on   # one cell
`rows(argv)` returns the table as dicts; `main(argv)` prints it and returns the exit status.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType, _ModState

from bench.random_weights import random_weights
from common.base_weights import blocks, load_transformer, place_base_weights
from common.flux import image_ids
from common.lora import add_lora
from common.models import get_model

OPTIONS = ("auto", "fp8", "nf4", "int8", "auto+offload", "fp8+offload")
GIB = 2**30
NF4_BYTES, INT8_BYTES = 0.516, 1.0
HEADS, HEAD_DIM = 24, 128  # FLUX.1 and Qwen-Image alike
FIT_TEXT = 16  # text tokens of the CPU fit runs
FIT_HEADS = (1, 2)  # head counts of the CPU fit runs
CUBLAS_WORKSPACE = 32 * 2**20  # torch's default on Hopper (4096 KiB x 8), one per handle and stream
FLASH_ROUND = 128  # flash attention's backward rounds the sequence length up to this


@dataclass(frozen=True)
class Case:
    """One row group of the table: a model, its block counts and the tokens of one sample."""

    name: str
    model: str  # flux_kontext or qwen_edit_plus
    blocks: tuple[int, ...]  # real counts: FLUX (double, single), Qwen (blocks,)
    text: int
    references: int

    @property
    def tokens(self) -> int:
        """Real tokens of one sample: text, the 64x64 target and each 64x64 reference."""
        return self.text + 64 * 64 * (1 + self.references)


CASES = (
    Case("FLUX.1 Kontext", "flux_kontext", (19, 38), 512, 1),
    Case("Qwen-Image-Edit-2509, 1 ref", "qwen_edit_plus", (60,), 250, 1),
    Case("Qwen-Image-Edit-2509, 2 refs", "qwen_edit_plus", (60,), 450, 2),
)


def real_transformer(
    model: str, num_blocks: int | tuple[int, ...], dtype: torch.dtype = torch.float32, heads: int = HEADS
) -> nn.Module:
    """The real FLUX.1 Kontext / Qwen-Image transformer config (`heads` x 128, real text widths) with fewer blocks:
    `num_blocks` per kind (an int gives that many of each)."""
    counts = (num_blocks,) * (2 if model == "flux_kontext" else 1) if isinstance(num_blocks, int) else num_blocks
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype` directly: a float32 copy of the full Qwen would be 82 GB
    try:
        if model == "flux_kontext":
            return FluxTransformer2DModel(
                guidance_embeds=True, num_layers=counts[0], num_single_layers=counts[1], num_attention_heads=heads
            )
        return QwenImageTransformer2DModel(num_layers=counts[0], num_attention_heads=heads)
    finally:
        torch.set_default_dtype(default)


def model_inputs(
    model: str,
    batch_size: int,
    references: int,
    generator: torch.Generator,
    grid: int = 64,
    text: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Stock-forward inputs of an equal-size batch: a grid x grid target and `references` references like it."""
    text = text or (512 if model == "flux_kontext" else 250)
    tokens = grid * grid * (1 + references)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    timestep = torch.full((batch_size,), 0.5, device=device, dtype=dtype)
    if model == "flux_kontext":
        ids = torch.cat([image_ids(grid, grid, index=int(k > 0)) for k in range(1 + references)])
        return dict(
            hidden_states=randn(batch_size, tokens, 64),
            encoder_hidden_states=randn(batch_size, text, 4096),
            pooled_projections=randn(batch_size, 768),
            timestep=timestep,
            img_ids=ids.to(device),
            txt_ids=torch.zeros(text, 3, device=device),
            guidance=torch.ones(batch_size, device=device, dtype=dtype),
        )
    return dict(
        hidden_states=randn(batch_size, tokens, 64),
        encoder_hidden_states=randn(batch_size, text, 3584),
        timestep=timestep,
        img_shapes=[[(1, grid, grid)] * (1 + references)] * batch_size,
    )


def lora_targets(model: str) -> list[str]:
    """The trainer's default LoRA targets."""
    return list(get_model(model).lora_targets)


def cuda_autocast_norms(transformer: nn.Module) -> None:
    """Make CPU autocast run the model's layer and group norms in float32, as CUDA autocast does (its float32 list,
    aten/src/ATen/autocast_mode.cpp; CPU autocast keeps them in bf16): every norm output the CPU step stores for
    backward then has CUDA's size. Their other float32-list ops (pow, rsqrt, exp) already get float32 inputs."""

    def to_float32(module: nn.Module, args: tuple) -> tuple | None:
        if not torch.is_autocast_enabled("cpu"):
            return None
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    for module in transformer.modules():
        if isinstance(module, nn.LayerNorm | nn.GroupNorm):
            module.register_forward_pre_hook(to_float32)


def _train_step(
    model: str,
    checkpoint: Path,
    option: str,
    checkpointing: bool,
    inputs: dict,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], None]]:
    """Load `option`'s base the trainers' way, add the LoRA; returns (model, AdamW, one training step)."""
    precision, _, offload = option.partition("+")
    args = argparse.Namespace(
        base_precision=precision,
        offload_blocks=bool(offload),
        pretrained_model_name_or_path=str(checkpoint),
        revision=None,
    )
    cls = FluxTransformer2DModel if model == "flux_kontext" else QwenImageTransformer2DModel
    transformer = load_transformer(cls, args, device, dtype)
    params = add_lora(transformer, 16, 16, lora_targets(model))
    place_base_weights(transformer, args, device)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)  # CUDA's default implementation, on CPU too
    if device.type == "cpu":
        cuda_autocast_norms(transformer)

    def step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=dtype != torch.float32):
            out = transformer(**inputs, return_dict=False)[0]
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return transformer, optimizer, step


def step_peak(
    model: str,
    checkpoint: Path,
    option: str,
    checkpointing: bool,
    inputs: dict,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[int, float]:
    """(Peak CUDA allocator bytes of a steady-state LoRA step (the second: AdamW states exist from the first on),
    seconds of the third step) with `option`, base weights in `dtype`, with bf16 autocast unless that is float32. An
    earlier model's memory is collected first (diffusers' hooks form reference cycles that only the garbage collector
    frees)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    _, _, step = _train_step(model, checkpoint, option, checkpointing, inputs, device, dtype)
    step()
    step()
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    torch.cuda.synchronize(device)
    return peak, time.perf_counter() - start


def dynamic_peaks(
    model: str, checkpoint: Path, checkpointing: bool, inputs: dict, dtype: torch.dtype = torch.bfloat16
) -> dict[str, int]:
    """Peak activation + temporary bytes of one CPU step of `auto` (MemTracker), per phase (`_Tracker`)."""
    transformer, optimizer, step = _train_step(
        model, checkpoint, "auto", checkpointing, inputs, torch.device("cpu"), dtype
    )
    tracker = _Tracker(transformer)
    tracker.track_external(transformer, optimizer, *[v for v in inputs.values() if torch.is_tensor(v)])
    with tracker:
        step()
    return dict(tracker.dynamic)


def block_kinds(transformer: nn.Module) -> list[tuple[str, int]]:
    """(name, count) of each list of repeated blocks, in forward order (FLUX: double, single; Qwen: one)."""
    return [(name, len(child)) for name, child in transformer.named_children() if isinstance(child, nn.ModuleList)]


class _Tracker(MemTracker):
    """torch's MemTracker with gradient hooks only on trainable parameters (it cannot hook frozen base weights),
    recording in `dynamic` the peak activation + temporary bytes from the model's last block's forward to the end
    of the forward ("forward"), and from the start of the backward of the last block of each kind (named as its
    list) to the next such start: the phases `dynamic_peaks` fits."""

    def __init__(self, transformer: nn.Module) -> None:
        """Watch the last block of each of `transformer`'s block lists."""
        super().__init__()
        self.watch = {f".{name}.{count - 1}": name for name, count in block_kinds(transformer)}
        self.last = list(self.watch)[-1]  # the model's last block
        self.dynamic: dict[str, int] = {}
        self._entered: set[str] = set()
        self._phase: str | None = None

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        tracked = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        for param in module.parameters() if install_grad_hooks else ():
            if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:

                def as_gradient(grad: torch.Tensor) -> None:
                    self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(as_gradient),
                    param.register_post_accumulate_grad_hook(lambda p: as_gradient(p.grad)),
                )
        return tracked

    def _update_peak_stats(self, peak_state: _ModState) -> None:
        # Only `dynamic`: MemTracker's own per-module peak snapshots cost most of a CPU step's time.
        if self._in_opt:
            return
        parents = self._mod_tracker.parents
        if peak_state == _ModState.PEAK_FW:  # from the last block's forward on
            self._phase = self._phase or ("forward" if any(p.endswith(self.last) for p in parents) else None)
        else:  # ModTracker keeps a finished block among the parents: the phase is the newest watched block's
            entered = {name for suffix, name in self.watch.items() if any(p.endswith(suffix) for p in parents)}
            for name in entered - self._entered:
                self._phase = name
            self._entered = entered
        for snap in self._curr_mem_snap.values() if self._phase else ():
            dynamic = snap[_MemRefType.ACT] + snap[_MemRefType.TEMP]
            self.dynamic[self._phase] = max(self.dynamic.get(self._phase, 0), dynamic)


@dataclass(frozen=True)
class Sizes:
    """Parameter counts of a model configuration that the estimate needs."""

    base: int  # every frozen parameter
    lora: int  # LoRA parameters (rank 16, the trainer's targets)
    linear: int  # linear weights inside the blocks (what fp8 / offloading / bitsandbytes store differently)
    rows: int  # output rows of those weights (fp8 keeps one float32 scale per row)
    block: int  # linear weights of the largest block
    block_rows: int  # their output rows
    layer: int  # the largest linear weight


def sizes(model: str, counts: tuple[int, ...], heads: int = HEADS) -> Sizes:
    """Count parameters on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        transformer = real_transformer(model, counts, heads=heads)
        lora = add_lora(transformer, 16, 16, lora_targets(model))
    per_block = [
        [m.weight.shape for m in block.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad]
        for block in blocks(transformer)
    ]
    numel = [[rows * cols for rows, cols in shapes] for shapes in per_block]
    largest = max(range(len(numel)), key=lambda i: sum(numel[i]))
    return Sizes(
        base=sum(p.numel() for p in transformer.parameters() if not p.requires_grad),
        lora=sum(p.numel() for p in lora),
        linear=sum(map(sum, numel)),
        rows=sum(rows for shapes in per_block for rows, _ in shapes),
        block=sum(numel[largest]),
        block_rows=sum(rows for rows, _ in per_block[largest]),
        layer=max(map(max, numel)),
    )


def static_bytes(option: str, size: Sizes) -> float:
    """Bytes that do not grow with tokens: the base weights as `option` keeps them on the device (bf16 outside the
    blocks' linear layers) and the LoRA's float32 weights, gradients and two AdamW states."""
    precision, _, offload = option.partition("+")
    per_param = {"auto": 2.0, "fp8": 1.0, "nf4": NF4_BYTES, "int8": INT8_BYTES}[precision]
    linear, rows = (2 * size.block, 2 * size.block_rows) if offload else (size.linear, size.rows)
    scales = 4 * rows if precision == "fp8" else 0
    return (size.base - size.linear) * 2 + linear * per_param + scales + 16 * size.lora


def flash_backward_bytes(batch: int, tokens: int, heads: int = HEADS) -> float:
    """CUDA flash attention's backward workspaces (no op returns them, so MemTracker cannot see them): the float32
    dq accumulator (B, L rounded up to 128, H, 128) and softmax_d (B, H, L rounded)."""
    rounded = math.ceil(tokens / FLASH_ROUND) * FLASH_ROUND
    return 4 * batch * rounded * heads * (HEAD_DIM + 1)


def fit_row(counts: tuple[int, ...], heads: int, tokens: float) -> list[float]:
    """The fit's regressors: n_j * (1, H, T, H*T) for the model (n = 1) and each block kind (module doc)."""
    return [float(n) * x for n in (1, *counts) for x in (1, heads, tokens, heads * tokens)]


def predict(fit: list[float], counts: tuple[int, ...], heads: int, tokens: float) -> float:
    """Fitted dynamic bytes of a phase."""
    return sum(c * x for c, x in zip(fit, fit_row(counts, heads, tokens), strict=True))


def estimate(option: str, size: Sizes, dynamic: dict[str, float], batch: int, tokens: int, input_bytes: float) -> float:
    """CUDA peak bytes of `option` (module doc) from the dynamic peaks of `auto` at full size; `tokens` per sample."""
    precision = option.partition("+")[0]
    dequant = 6 * size.layer if precision == "fp8" else 0  # float32 + bf16 copy of the largest weight, in use
    flash = flash_backward_bytes(batch, tokens)
    phases = [dynamic["forward"] + dequant] + [v + dequant + flash for k, v in dynamic.items() if k != "forward"]
    phases.append(4 * size.lora)  # AdamW's step: one float32 temporary per LoRA parameter
    return static_bytes(option, size) + input_bytes + max(phases) + CUBLAS_WORKSPACE


def input_bytes(case: Case, batch: int) -> float:
    """bf16 model inputs of a batch: packed latents (64 channels per token) and text embeddings."""
    text_width = 4096 if case.model == "flux_kontext" else 3584
    return 2 * batch * (64 * (case.tokens - case.text) + text_width * case.text)


def _fit_configs(model: str) -> list[tuple[int, ...]]:
    """Block configurations that separate the per-kind costs: two of each kind, then one more of each kind. Two, so
    that the watched last block's input needs a gradient, as at full size (the first block's does not: no LoRA
    before it), and its recomputation stores what it stores there."""
    kinds = 2 if model == "flux_kontext" else 1
    return [(2,) * kinds] + [tuple(2 + int(k == j) for k in range(kinds)) for j in range(kinds)]


def _checkpoint(model: str, counts: tuple[int, ...], heads: int, root: Path) -> Path:
    """A bf16 random checkpoint of `counts` blocks and `heads` heads under root, written once."""
    folder = root / f"{model}-{'-'.join(map(str, counts))}-{heads}"
    if not folder.exists():
        real_transformer(model, counts, torch.bfloat16, heads).save_pretrained(folder / "transformer")
    return folder


def cpu_dynamic(
    model: str, counts: tuple[int, ...], heads: int, checkpointing: bool, batch: int, grid: int, root: Path
) -> tuple[int, dict[str, int]]:
    """(tokens B*L, dynamic peaks per phase) of a CPU step with FIT_TEXT text tokens and one reference."""
    inputs = model_inputs(model, batch, 1, torch.Generator().manual_seed(0), grid, FIT_TEXT, dtype=torch.bfloat16)
    peaks = dynamic_peaks(model, _checkpoint(model, counts, heads, root), checkpointing, inputs)
    gc.collect()
    return batch * (FIT_TEXT + 2 * grid * grid), peaks


def cpu_fit(model: str, checkpointing: bool, grids: tuple[int, int], root: Path) -> dict[str, list[float]]:
    """Per phase, the coefficients of `fit_row` fitted exactly on small bf16 CPU runs (module doc)."""
    rows, peaks = [], []
    for counts, heads, grid in itertools.product(_fit_configs(model), FIT_HEADS, grids):
        tokens, dynamic = cpu_dynamic(model, counts, heads, checkpointing, 1, grid, root)
        rows.append(fit_row(counts, heads, tokens))
        peaks.append(dynamic)
        print(f"  {model} blocks {counts} heads {heads} tokens {tokens} checkpointing {checkpointing}: "
              + ", ".join(f"{k} {v / 2**20:.2f}" for k, v in dynamic.items()) + " MiB", flush=True)  # fmt: skip
    a = torch.tensor(rows, dtype=torch.float64)
    return {
        phase: torch.linalg.solve(a, torch.tensor([p[phase] for p in peaks], dtype=torch.float64)).tolist()
        for phase in peaks[0]
    }


def _cuda_rows(
    cases: list[Case], batches: list[int], options: list[str], checkpointing: list[bool], root: Path
) -> list[dict]:
    """The options measured at full size on the GPU, with the step time beside each peak."""
    device = torch.device("cuda")
    out = []
    for case in cases:
        checkpoint = root / case.model
        if not checkpoint.exists():  # its config only: `random_weights` builds the weights on the GPU at load
            with init_empty_weights():
                real_transformer(case.model, case.blocks, torch.bfloat16).save_config(checkpoint / "transformer")
        for ckpt, batch, option in itertools.product(checkpointing, batches, options):
            inputs = model_inputs(
                case.model, batch, case.references, torch.Generator().manual_seed(0), text=case.text, device=device,
                dtype=torch.bfloat16,
            )  # fmt: skip
            try:
                with random_weights():
                    peak, seconds = step_peak(case.model, checkpoint, option, ckpt, inputs, device)
            except torch.OutOfMemoryError:
                peak, seconds = math.inf, math.nan
            out.append(dict(case=case.name, checkpointing=ckpt, batch=batch, option=option, gib=peak / GIB,
                            seconds=seconds, how="measured"))  # fmt: skip
    return out


def _cpu_check(root: Path, grid: int, fit: dict[str, list[float]]) -> None:
    """Held-out check on FLUX (3, 3) blocks, 3 heads, batch 2, checkpointing: each phase's fit."""
    counts, heads = (3, 3), 3
    tokens, dynamic = cpu_dynamic("flux_kontext", counts, heads, True, 2, grid, root)
    for phase, measured in dynamic.items():
        fitted = predict(fit[phase], counts, heads, tokens)
        print(f"fit check (FLUX, blocks {counts}, {heads} heads, batch 2, checkpointing), {phase}: measured "
              f"{measured / 2**20:.2f} MiB, fit {fitted / 2**20:.2f} MiB")  # fmt: skip


def _cpu_rows(cases: list[Case], batches: list[int], options: list[str], checkpointing: list[bool], root: Path,
              grids: tuple[int, int]) -> list[dict]:  # fmt: skip
    """Every option estimated from the fitted dynamic peaks of `auto` (module doc)."""
    out, fits = [], {}
    for case, ckpt in itertools.product(cases, checkpointing):
        if (case.model, ckpt) not in fits:
            fits[case.model, ckpt] = cpu_fit(case.model, ckpt, grids, root)
            if case.model == "flux_kontext" and ckpt:
                _cpu_check(root, grids[0], fits[case.model, ckpt])
        size = sizes(case.model, case.blocks)
        for batch in batches:
            dynamic = {
                phase: predict(fit, case.blocks, HEADS, batch * case.tokens)
                for phase, fit in fits[case.model, ckpt].items()
            }
            for option in options:
                peak = estimate(option, size, dynamic, batch, case.tokens, input_bytes(case, batch))
                out.append(dict(case=case.name, checkpointing=ckpt, batch=batch, option=option,
                                gib=peak / GIB, how="estimated"))  # fmt: skip
    return out


def rows(argv: list[str] | None = None) -> list[dict]:
    """The table as dicts: case, checkpointing, batch, option, gib (peak GiB; inf = out of memory), how."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cases", nargs="+", type=int, default=list(range(len(CASES))), help="indices into CASES")
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS,
                        help="on CUDA, measure one option per process")  # fmt: skip
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--checkpointing", default="both", choices=["on", "off", "both"],
                        help="gradient checkpointing; on CUDA, measure one setting per process")  # fmt: skip
    parser.add_argument("--grids", nargs=2, type=int, default=[8, 12], help="CPU fit: target grid sizes")
    args = parser.parse_args(argv)
    cases = [CASES[i] for i in args.cases]
    checkpointing = {"on": [True], "off": [False], "both": [True, False]}[args.checkpointing]
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        if args.device == "cuda":
            return _cuda_rows(cases, args.batch_sizes, args.options, checkpointing, Path(tmp))
        return _cpu_rows(cases, args.batch_sizes, args.options, checkpointing, Path(tmp), tuple(args.grids))


def _cell(row: dict) -> str:
    """A table cell: GiB, then `*` for an estimate or the measured seconds per step."""
    if row["how"] == "estimated":
        return f"{row['gib']:.1f}*"
    return f"{row['gib']:.1f} ({row['seconds']:.2f} s)"


def main(argv: list[str] | None = None) -> int:
    """Print the table (GiB per option, one line per case / checkpointing / batch); exit status 0."""
    table = rows(argv)
    options = list(dict.fromkeys(r["option"] for r in table))
    print("| case | grad. ckpt | batch | " + " | ".join(options) + " |")
    print("|---|---|---:|" + "---:|" * len(options))
    for (case, checkpointing, batch), group in itertools.groupby(
        table, lambda r: (r["case"], r["checkpointing"], r["batch"])
    ):
        cells = {r["option"]: r for r in group}
        values = [_cell(cells[o]) for o in options]
        print(f"| {case} | {'on' if checkpointing else 'off'} | {batch} | " + " | ".join(values) + " |")
    print("GiB = 2^30 bytes. * estimated on CPU (bench/memory.py module doc); other cells measured on the GPU, with the"
          " time of a steady-state step.")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
