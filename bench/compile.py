"""Eager vs `--compile` (regional compilation, `common.compile`) side by side on one mixed run: s/step, real
tokens/s, compile time, and how many frames TorchDynamo compiles after warm-up. Not a test.

Two copies of the same random model with the same LoRA (bench/train_step.py's `build`), one with compiled blocks,
take turns on the same batches: the first `--steps` batches of `RandomBatchSampler` over train_step's synthetic
data set, so batch layouts (sizes, grids, text lengths) change every step. The recompile target: no frame compiled
after the warm-up steps (the first mixed batch compiles each block class's graphs; with dynamic shapes later
layouts reuse them).

    python -m bench.compile --tiny                                    # CPU fp32, tiny models, 50 steps each
    python -m bench.compile --device cuda --model flux_kontext        # full size, bf16, gradient checkpointing
"""

import argparse
import itertools
import statistics
import time

import torch

from bench.train_step import (
    MODELS,
    NAMES,
    TINY_SHRINK,
    Stopwatch,
    build,
    dataset,
    flux_batch,
    qwen_batch,
    train_step,
)
from common import flux, qwen
from common.attention import resolve_backend
from common.compile import compile_blocks, compiled_frames
from common.sampler import RandomBatchSampler
from common.sdpa import sdpa_kernels


def bench_model(model_name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """Eager and compiled copies of one model over the same mixed batches; prints one table and the frame counts."""
    models = {}
    for kind in ("eager", "compiled"):
        torch.manual_seed(args.seed)  # same weights and LoRA for both copies
        models[kind] = build(model_name, args.tiny, device, dtype)
        if not args.tiny:
            models[kind].enable_gradient_checkpointing()
    is_flux = model_name == "flux_kontext"
    install, make = (flux.install_mixed, flux_batch) if is_flux else (qwen.install_mixed, qwen_batch)
    for model in models.values():
        install(model, args.backend)
    torch._dynamo.reset()
    compile_blocks(models["compiled"])
    optimizers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()
    }
    samples = dataset(model_name, args.num_samples, TINY_SHRINK if args.tiny else 1, args.seed)
    sampler = RandomBatchSampler([s.image_tokens for s in samples], args.batch_size, seed=args.seed)
    layouts = [[samples[i] for i in b] for b in itertools.islice(sampler, args.steps)]
    watch = Stopwatch(device)
    seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
    frames, tokens = [], []
    for layout in layouts:
        batch = make(models["eager"], layout, device, dtype)
        for kind, model in models.items():
            watch.sync()
            start = time.perf_counter()
            train_step(model, optimizers[kind], batch)
            watch.sync()
            seconds[kind].append(time.perf_counter() - start)
        frames.append(compiled_frames())
        tokens.append(sum(batch.lengths))
    warm = args.warmup
    backend = resolve_backend(args.backend, device, dtype)
    print(
        f"\n{NAMES[model_name]} ({'tiny' if args.tiny else 'full size'}, {dtype} on {device}, attention {backend}): "
        f"{len(layouts)} mixed batches of {args.batch_size}, {min(tokens):,}..{max(tokens):,} real tokens per batch; "
        f"timed after {warm} warm-up steps"
    )
    print("| mode | first step s | s/step (median) | real tok/s | frames compiled after warm-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rate = {k: sum(tokens[warm:]) / sum(s[warm:]) for k, s in seconds.items()}
    for kind, s in seconds.items():
        after = frames[-1] - frames[warm - 1] if kind == "compiled" else 0
        print(f"| {kind} | {s[0]:.2f} | {statistics.median(s[warm:]):.4f} | {rate[kind]:,.0f} | {after} |")
    print(
        f"compiled / eager real tok/s: {rate['compiled'] / rate['eager']:.2f}x; frames compiled after each step: "
        f"{frames}"
    )
    del models, optimizers
    if device.type == "cuda":
        torch.cuda.empty_cache()


@sdpa_kernels()  # the trainers' default kernels (no cuDNN attention)
def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="both", choices=[*MODELS, "both"])
    parser.add_argument("--tiny", action="store_true", help="small models, float32 on CPU")
    parser.add_argument("--device", help="default: cpu with --tiny, else cuda")
    parser.add_argument("--backend", default="auto", help="attention backend of the mixed batches")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50, help="mixed batches, each run eager and compiled")
    parser.add_argument("--warmup", type=int, default=3, help="steps not timed and allowed to compile")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    dtype = torch.float32 if args.tiny else torch.bfloat16
    for model_name in MODELS if args.model == "both" else [args.model]:
        bench_model(model_name, args, device, dtype)


if __name__ == "__main__":
    main()
