"""Share of padding in padded batches: random batch order vs `LengthGroupedBatchSampler` by window size. Not a test.

A synthetic set of target images (sides 384..2048 px, aspect within 1:3..3:1, seeded) is sized per image with
common.resolution (multi_resolutions 512*512 768*768 1024*1024, each model's multiple and rounding); a sample's
token count is (h / 16) * (w / 16). Reported: mean padding ratio over the batches of one epoch (seed 0, epoch 0)
and over seeds x epochs.

    python -m bench.padding_ratio
    python -m bench.padding_ratio --num_samples 4096 --batch_size 8
"""

import argparse
import random
import statistics

from common.models import get_model
from common.sampler import LengthGroupedBatchSampler, RandomBatchSampler

MULTI_RESOLUTIONS = ("512*512", "768*768", "1024*1024")
WINDOWS = (1, 2, 4, 8, 16, 32, 64)  # window_batches; 1 sorts within a batch only, i.e. random order


def synthetic_sizes(num_samples: int, seed: int) -> list[tuple[int, int]]:
    """(width, height) pairs drawn uniformly in 384..2048 px, redrawn until the aspect ratio is within 1:3..3:1."""
    rng = random.Random(seed)
    sizes: list[tuple[int, int]] = []
    while len(sizes) < num_samples:
        w, h = rng.randint(384, 2048), rng.randint(384, 2048)
        if max(w, h) <= 3 * min(w, h):
            sizes.append((w, h))
    return sizes


def token_counts(sizes: list[tuple[int, int]], model: str) -> list[int]:
    """Target image tokens of each sample as sized for `model`: (h / 16) * (w / 16)."""
    policy = get_model(model).policy(multi_resolutions=MULTI_RESOLUTIONS)
    return [(w // 16) * (h // 16) for w, h in (policy.plan(*size).size for size in sizes)]


def mean_ratio(sampler: RandomBatchSampler, seeds: int, epochs: int) -> float:
    """Mean over seeds x epochs of the sampler's per-epoch mean padding ratio."""
    ratios = []
    for seed in range(seeds):
        sampler.seed = seed
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            ratios.append(sampler.padding_ratio())
    return statistics.mean(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--data_seed", type=int, default=0)
    args = parser.parse_args()

    sizes = synthetic_sizes(args.num_samples, args.data_seed)
    print(f"{args.num_samples} samples, batch_size {args.batch_size}, multi_resolutions {' '.join(MULTI_RESOLUTIONS)}")
    print(f"mean padding ratio: one epoch (seed 0, epoch 0) / mean over {args.seeds} seeds x {args.epochs} epochs\n")
    print("| model (multiple) | order | window_batches | window (samples) | 1 epoch | mean |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for model in ("qwen_edit", "flux_kontext"):
        lengths = token_counts(sizes, model)
        label = f"{model} ({get_model(model).multiple})"
        rows: list[tuple[str, str, str, RandomBatchSampler]] = [
            ("random", "-", "-", RandomBatchSampler(lengths, args.batch_size))
        ]
        for window in WINDOWS:
            sampler = LengthGroupedBatchSampler(lengths, args.batch_size, window_batches=window)
            name = "grouped (default)" if window == 64 else "grouped"
            rows.append((name, str(window), str(min(window * args.batch_size, len(lengths))), sampler))
        for name, window, window_samples, sampler in rows:
            one, mean = sampler.padding_ratio(), mean_ratio(sampler, args.seeds, args.epochs)
            print(f"| {label} | {name} | {window} | {window_samples} | {one:.2%} | {mean:.2%} |")


if __name__ == "__main__":
    main()
