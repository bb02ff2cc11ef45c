"""Peak memory of one LoRA training step (forward, backward, AdamW step) per memory option. Not a test.

Configurations: FLUX.1 Kontext (19 double + 38 single blocks, T5 length 512, one 1024x1024 reference) and
Qwen-Image-Edit-2509 (60 blocks; one reference, and two for Edit-Plus's multi-reference case; text 250 / 450 tokens:
the prompt plus the Qwen2.5-VL tokens of the 384x384 condition images), target 1024x1024 = 64x64 packed tokens,
each reference the same; batch 1 and 4; gradient checkpointing on and off; LoRA rank 16 on the trainers' default
targets, LoRA weights and AdamW states float32, base bfloat16 (the trainers' `--mixed_precision bf16`). Random
weights (memory does not depend on their values). Each case loads the base through the trainers' own path
(`common.base_weights.load_transformer` + `add_lora` + `place_base_weights`) from a checkpoint written once.

On CUDA (`--device cuda`): every option runs at full size and the cell is torch.cuda.max_memory_allocated.
On CPU: the same step runs for a model of the real width with a few blocks at small token counts, measured with
torch's MemTracker (every tensor storage, as the CUDA allocator sees tensors). CPU bfloat16 matmuls are far too slow
on this kind of machine, so the CPU runs are float32 throughout and converted: bf16 peak = base weights / 2 + LoRA
(weights, gradients, 2 AdamW states: float32 in both) + (the rest: activations, temporaries) / 2, as autocast keeps
activations in bf16. The full size is then extrapolated:

    peak(n, B*L) = c0 + c1*(B*L) + sum_k n_k * (a_k + b_k*(B*L))

n_k = blocks of kind k (FLUX: double, single; Qwen: one kind), L = real tokens per sample (text + target +
references), fitted exactly from runs at 2 token counts x (1 + kinds) block configurations (per real token:
text and image tokens pass the same widths). Activation memory is linear in B*L because attention runs a
memory-efficient kernel (CPU flash / CUDA flash, cuDNN, varlen), never a dense score matrix. A held-out run (one
more block of each kind, batch 2) checks the fit, and an fp8 run checks the fp8 formula. Per-token activation
memory comes from these small runs (B*L <= 144 tokens) because batch 4 at 1024^2 (35k tokens) at full width is
far beyond a 2-core CPU. Options other than auto, derived from it (fp8 also runs on CPU; the others need CUDA):
  fp8:      peak - the blocks' linear weights / 2 + the largest linear layer dequantized (fp32 + bf16 copy)
  offload:  peak - the blocks' frozen linear weights + 2 blocks' worth (the running block and the prefetched one)
            + the largest linear weight (fetched again in backward)
  nf4/int8: peak - the blocks' linear weights x (1 - bytes/param / 2); nf4 0.516 bytes/param (4 bits + double-
            quantized absmax per 64), int8 1 byte/param; not counting bitsandbytes' dequantization buffers

    python -m bench.memory                       # CPU, ~10 min on 2 cores; prints the table
    python -m bench.memory --device cuda         # full size, every option measured
`rows(argv)` returns the table as dicts (for bench/gpu_check.py); `main(argv)` prints it.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker

from common.base_weights import blocks, load_transformer, place_base_weights
from common.flux import image_ids
from common.lora import add_lora
from common.models import get_model

OPTIONS = ("auto", "fp8", "nf4", "int8", "auto+offload", "fp8+offload")
GIB = 2**30
NF4_BYTES, INT8_BYTES = 0.516, 1.0
FIT_TEXT = 16  # text tokens of the CPU fit runs


@dataclass(frozen=True)
class Case:
    """One row group of the table: a model, its block counts and the tokens of one sample."""

    name: str
    model: str  # flux_kontext or qwen_edit_plus
    blocks: tuple[int, ...]  # real counts: FLUX (double, single), Qwen (blocks,)
    text: int
    references: int


CASES = (
    Case("FLUX.1 Kontext", "flux_kontext", (19, 38), 512, 1),
    Case("Qwen-Image-Edit-2509, 1 ref", "qwen_edit_plus", (60,), 250, 1),
    Case("Qwen-Image-Edit-2509, 2 refs", "qwen_edit_plus", (60,), 450, 2),
)


def real_transformer(model: str, num_blocks: int | tuple[int, ...], dtype: torch.dtype = torch.float32) -> nn.Module:
    """The real FLUX.1 Kontext / Qwen-Image transformer config (24 heads x 128, real text widths) with fewer blocks:
    `num_blocks` per kind (an int gives that many of each)."""
    counts = (num_blocks,) * (2 if model == "flux_kontext" else 1) if isinstance(num_blocks, int) else num_blocks
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype` directly: a float32 copy of the full Qwen would be 82 GB
    try:
        if model == "flux_kontext":
            return FluxTransformer2DModel(guidance_embeds=True, num_layers=counts[0], num_single_layers=counts[1])
        return QwenImageTransformer2DModel(num_layers=counts[0])
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


def step_peak(
    model: str,
    checkpoint: Path,
    option: str,
    checkpointing: bool,
    inputs: dict,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Peak bytes of one LoRA step with `option`, loaded the trainers' way (CUDA allocator, MemTracker on CPU);
    base weights in `dtype`, with bf16 autocast unless that is float32."""
    precision, _, offload = option.partition("+")
    args = argparse.Namespace(
        base_precision=precision,
        offload_blocks=bool(offload),
        pretrained_model_name_or_path=str(checkpoint),
        revision=None,
    )
    cls = FluxTransformer2DModel if model == "flux_kontext" else QwenImageTransformer2DModel
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    transformer = load_transformer(cls, args, device, dtype)
    params = add_lora(transformer, 16, 16, lora_targets(model))
    place_base_weights(transformer, args, device)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=dtype != torch.float32):
            out = transformer(**inputs, return_dict=False)[0]
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW states exist from the first step on; the second step is the steady state
    if device.type == "cuda":
        step()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        tracker = _Tracker()
        tracker.track_external(transformer, optimizer, *[v for v in inputs.values() if torch.is_tensor(v)])
        with tracker:
            step()
        peak = max(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())
    return peak


class _Tracker(MemTracker):
    """torch's MemTracker without its per-parameter gradient hooks, which it cannot put on frozen base weights
    (gradients are still counted: they are outputs of tracked backward ops)."""

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        return super()._track_module_params_and_buffers(module, install_grad_hooks=False)


@dataclass(frozen=True)
class Sizes:
    """Parameter counts of a model configuration that the derived options need."""

    base: int  # every frozen parameter
    lora: int  # LoRA parameters (rank 16, the trainer's targets)
    linear: int  # linear weights inside the blocks (what fp8 / offloading / bitsandbytes store differently)
    block: int  # linear weights of the largest block
    layer: int  # the largest linear weight


def sizes(model: str, counts: tuple[int, ...]) -> Sizes:
    """Count parameters on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        transformer = real_transformer(model, counts)
        lora = add_lora(transformer, 16, 16, lora_targets(model))
    per_block = [
        [m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad]
        for block in blocks(transformer)
    ]
    return Sizes(
        base=sum(p.numel() for p in transformer.parameters() if not p.requires_grad),
        lora=sum(p.numel() for p in lora),
        linear=sum(map(sum, per_block)),
        block=max(map(sum, per_block)),
        layer=max(map(max, per_block)),
    )


def derived(option: str, auto: float, size: Sizes, unit: int = 2) -> float:
    """Peak bytes of `option` from the auto peak with base weights of `unit` bytes (formulas in the module doc)."""
    if option in ("nf4", "int8"):
        return auto - size.linear * (unit - (NF4_BYTES if option == "nf4" else INT8_BYTES))
    fp8 = auto - size.linear * (unit - 1) + size.layer * (4 + (unit if unit < 4 else 0))
    if option == "fp8":
        return fp8
    if option == "auto+offload":
        return auto - size.linear * unit + (2 * size.block + size.layer) * unit
    return fp8 - size.linear + 2 * size.block + size.layer  # fp8+offload: 1 byte per onloaded weight


def to_bf16(peak_fp32: float, size: Sizes) -> float:
    """bf16-training bytes of a float32 CPU peak (module doc): base halves, LoRA state stays, the rest halves."""
    lora_state = 4 * 4 * size.lora  # float32 weights, gradients, 2 AdamW states
    return size.base * 2 + lora_state + (peak_fp32 - size.base * 4 - lora_state) / 2


def _fit_configs(model: str) -> list[tuple[int, ...]]:
    """Block configurations that separate the per-kind costs: all ones, then one more of each kind."""
    kinds = 2 if model == "flux_kontext" else 1
    return [(1,) * kinds] + [tuple(1 + int(k == j) for k in range(kinds)) for j in range(kinds)]


def _checkpoint(model: str, counts: tuple[int, ...], root: Path) -> Path:
    """A float32 random checkpoint of `counts` blocks under root, written once."""
    folder = root / f"{model}-{'-'.join(map(str, counts))}"
    if not folder.exists():
        real_transformer(model, counts).save_pretrained(folder / "transformer")
    return folder


def cpu_peak(model: str, counts: tuple[int, ...], option: str, checkpointing: bool, batch: int, grid: int,
             root: Path) -> tuple[float, float]:  # fmt: skip
    """(tokens B*L, bf16-equivalent peak bytes) of a float32 CPU step with FIT_TEXT text tokens and one reference."""
    inputs = model_inputs(model, batch, 1, torch.Generator().manual_seed(0), grid, FIT_TEXT)
    peak = step_peak(model, _checkpoint(model, counts, root), option, checkpointing, inputs, torch.device("cpu"),
                     torch.float32)  # fmt: skip
    gc.collect()
    return batch * (FIT_TEXT + 2 * grid * grid), peak


def cpu_fit(model: str, checkpointing: bool, grids: tuple[int, int], root: Path) -> list[float]:
    """Coefficients [c0, a_1.., c1, b_1..] of the bf16 peak model, from small float32 CPU runs of `auto`."""
    rows, peaks = [], []
    for counts, grid in itertools.product(_fit_configs(model), grids):
        tokens, peak = cpu_peak(model, counts, "auto", checkpointing, 1, grid, root)
        peaks.append(to_bf16(peak, sizes(model, counts)))
        rows.append([1.0, *map(float, counts), tokens, *(float(n) * tokens for n in counts)])
        print(f"  {model} blocks {counts} tokens {tokens} checkpointing {checkpointing}: {peak / GIB:.3f} GiB fp32",
              flush=True)  # fmt: skip
    a, b = torch.tensor(rows, dtype=torch.float64), torch.tensor(peaks, dtype=torch.float64)
    return torch.linalg.solve(a, b).tolist()


def predict(fit: list[float], counts: tuple[int, ...], tokens: float) -> float:
    """peak(n, B*L) of the fitted model."""
    kinds = len(counts)
    fixed, per_token = fit[: 1 + kinds], fit[1 + kinds :]
    blocks_part = sum(n * (a + b * tokens) for n, a, b in zip(counts, fixed[1:], per_token[1:], strict=True))
    return fixed[0] + per_token[0] * tokens + blocks_part


def _cuda_rows(cases: list[Case], batches: list[int], root: Path) -> list[dict]:
    """Every option measured at full size on the GPU."""
    device = torch.device("cuda")
    out = []
    for case in cases:
        checkpoint = root / case.model
        if not checkpoint.exists():
            for other in root.iterdir():  # one full-size checkpoint on disk at a time (FLUX 24 GB, Qwen 41 GB)
                shutil.rmtree(other)
            real_transformer(case.model, case.blocks, torch.bfloat16).save_pretrained(checkpoint / "transformer")
        for checkpointing, batch, option in itertools.product((True, False), batches, OPTIONS):
            inputs = model_inputs(
                case.model, batch, case.references, torch.Generator().manual_seed(0), text=case.text, device=device,
                dtype=torch.bfloat16,
            )  # fmt: skip
            try:
                peak = step_peak(case.model, checkpoint, option, checkpointing, inputs, device) / GIB
            except torch.OutOfMemoryError:
                peak = math.inf
            out.append(dict(case=case.name, checkpointing=checkpointing, batch=batch, option=option, gib=peak,
                            how="measured"))  # fmt: skip
    return out


def _cpu_checks(root: Path, grids: tuple[int, int], fit: list[float]) -> None:
    """Held-out checks on FLUX (2, 2) blocks, batch 2, checkpointing: the fit, and the fp8 formula (float32 units)."""
    counts, size = (2, 2), sizes("flux_kontext", (2, 2))
    tokens, auto = cpu_peak("flux_kontext", counts, "auto", True, 2, grids[0], root)
    predicted = predict(fit, counts, tokens)
    print(f"fit check (FLUX, blocks {counts}, batch 2, checkpointing): measured {to_bf16(auto, size) / GIB:.3f} GiB, "
          f"fit {predicted / GIB:.3f} GiB")  # fmt: skip
    _, fp8 = cpu_peak("flux_kontext", counts, "fp8", True, 2, grids[0], root)
    print(f"fp8 check (same run, float32 units): measured {fp8 / GIB:.3f} GiB, formula "
          f"{derived('fp8', auto, size, unit=4) / GIB:.3f} GiB")  # fmt: skip


def _cpu_rows(cases: list[Case], batches: list[int], root: Path, grids: tuple[int, int]) -> list[dict]:
    """auto fitted from small CPU runs and extrapolated; the other options derived from it."""
    out, fits = [], {}
    for case, checkpointing in itertools.product(cases, (True, False)):
        if (case.model, checkpointing) not in fits:
            fits[case.model, checkpointing] = cpu_fit(case.model, checkpointing, grids, root)
            if case.model == "flux_kontext" and checkpointing:
                _cpu_checks(root, grids, fits[case.model, checkpointing])
        size = sizes(case.model, case.blocks)
        tokens = case.text + 64 * 64 * (1 + case.references)
        for batch in batches:
            auto = predict(fits[case.model, checkpointing], case.blocks, batch * tokens)
            for option in OPTIONS:
                peak = auto if option == "auto" else derived(option, auto, size)
                out.append(dict(case=case.name, checkpointing=checkpointing, batch=batch, option=option,
                                gib=peak / GIB, how="CPU fit" if option == "auto" else "derived"))  # fmt: skip
    return out


def rows(argv: list[str] | None = None) -> list[dict]:
    """The table as dicts: case, checkpointing, batch, option, gib (peak GiB; inf = out of memory), how."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cases", nargs="+", type=int, default=list(range(len(CASES))), help="indices into CASES")
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--grids", nargs=2, type=int, default=[4, 8], help="CPU fit: target grid sizes")
    args = parser.parse_args(argv)
    cases = [CASES[i] for i in args.cases]
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        if args.device == "cuda":
            return _cuda_rows(cases, args.batch_sizes, Path(tmp))
        return _cpu_rows(cases, args.batch_sizes, Path(tmp), tuple(args.grids))


def main(argv: list[str] | None = None) -> list[dict]:
    """Print the table (GiB per option, one line per case / checkpointing / batch); returns its rows."""
    table = rows(argv)
    print("| case | grad. ckpt | batch | " + " | ".join(OPTIONS) + " |")
    print("|---|---|---:|" + "---:|" * len(OPTIONS))
    for (case, checkpointing, batch), group in itertools.groupby(
        table, lambda r: (r["case"], r["checkpointing"], r["batch"])
    ):
        cells = {r["option"]: r for r in group}
        values = [f"{cells[o]['gib']:.1f}" + ("*" if cells[o]["how"] == "derived" else "") for o in OPTIONS]
        print(f"| {case} | {'on' if checkpointing else 'off'} | {batch} | " + " | ".join(values) + " |")
    print(
        "GiB = 2^30 bytes. * derived from the auto peak (module doc). CPU cells: peak(n, B*L) = c0 + c1*B*L + "
        "sum_k n_k*(a_k + b_k*B*L), fitted on real-width models with 1-2 blocks per kind, in bf16 bytes."
    )
    return table


if __name__ == "__main__":
    main()
