"""Fixed batch size vs `--max_tokens_per_batch` batches, side by side in one run: real tokens per step (min /
median / max), s/step, real tokens/s, padding and peak memory of one LoRA training step. Not a test.

The data set, models and step are those of bench/train_step.py. The token budget is `--batch_size` times the data
set's mean real tokens (target + reference + text), so both kinds of batches do the same work on average; fixed
batches vary with the mix of sizes, budget batches stay close to the budget. Each case runs the same number of
steps over the first batches of its sampler, random order and `--group_by_length` order.

    python -m bench.token_budget                      # tiny models, CPU, float32
    python -m bench.token_budget --device cuda        # tiny models on the GPU, bf16
    python -m bench.token_budget --device cuda --full --model qwen_edit --steps 4
"""

import argparse
import itertools
import statistics

import torch

from bench.train_step import MODELS, NAMES, TINY_SHRINK, Result, build, dataset, flux_batch, qwen_batch, run_cases
from common import flux, qwen
from common.sampler import LengthGroupedBatchSampler, RandomBatchSampler, TokenBudgetBatchSampler


def bench_model(model_name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """Both kinds of batches for one model, random and grouped order; prints one table."""
    torch.manual_seed(args.seed)
    model = build(model_name, not args.full, device, dtype)
    if args.full:
        model.enable_gradient_checkpointing()
    is_flux = model_name == "flux_kontext"
    install, make = (flux.install_mixed, flux_batch) if is_flux else (qwen.install_mixed, qwen_batch)
    install(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    samples = dataset(model_name, args.num_samples, 1 if args.full else TINY_SHRINK, args.seed)
    lengths = [s.image_tokens for s in samples]
    tokens = [s.image_tokens + s.text_len for s in samples]
    budget = round(args.batch_size * statistics.mean(tokens))
    budget = max(budget, max(tokens))
    samplers = {
        ("batch size", "random"): RandomBatchSampler(lengths, args.batch_size, seed=args.seed),
        ("batch size", "grouped"): LengthGroupedBatchSampler(lengths, args.batch_size, seed=args.seed),
        ("token budget", "random"): TokenBudgetBatchSampler(lengths, budget, tokens=tokens, seed=args.seed),
        ("token budget", "grouped"): TokenBudgetBatchSampler(
            lengths, budget, tokens=tokens, group_by_length=True, seed=args.seed
        ),
    }
    count = args.warmup + args.steps
    results = []
    for (kind, order), sampler in samplers.items():
        batches = [make(model, [samples[i] for i in b], device, dtype) for b in itertools.islice(sampler, count)]
        padding = statistics.mean(b.padding for b in batches[args.warmup :])
        results.append(Result(f"{kind}, {order}", args.backend, batches, padding))
    print(
        f"\n{NAMES[model_name]} ({'full size' if args.full else 'tiny'}, {dtype} on {device}): {len(samples)} samples, "
        f"real tokens per sample {min(tokens)}..{max(tokens)} (mean {statistics.mean(tokens):.0f}); batch size "
        f"{args.batch_size} vs budget {budget} tokens; {args.steps} timed steps per case, backend {args.backend}"
    )
    run_cases(model, install, optimizer, results, args.warmup)
    print("| batches | samples/step | real tokens/step min / median / max | s/step | real tok/s | padding | peak mem |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        per_step = [sum(b.lengths) for b in r.batches[args.warmup :]]
        sizes = [len(b.lengths) for b in r.batches[args.warmup :]]
        memory = f"{r.peak_bytes / 2**30:.1f} GiB" if r.peak_bytes is not None else "n/a"
        print(
            f"| {r.case} | {min(sizes)}..{max(sizes)} | {min(per_step):,} / {statistics.median(per_step):,.0f} / "
            f"{max(per_step):,} | {statistics.median(r.seconds):.4f} | {r.token_rate:,.0f} | {r.padding:.1%} | "
            f"{memory} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="both", choices=[*MODELS, "both"])
    parser.add_argument("--full", action="store_true", help="full-size models (GPU), else the tiny ones")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--backend", default="auto", help="attention backend of the mixed batches")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    for model_name in MODELS if args.model == "both" else [args.model]:
        bench_model(model_name, args, device, dtype)


if __name__ == "__main__":
    main()
