"""Rows for the cache tests, and a slow cache writer run as a subprocess that the resume test kills.

Usage: python tests/cache_writer_script.py CACHE_DIR NUM_ROWS SHARD_SIZE SECONDS_PER_ROW
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cache import CacheWriter  # noqa: E402

FINGERPRINT = {"model": "tiny/qwen-edit", "revision": "abc", "resolution": 512, "sources": {"train.jsonl": "9f2c"}}


def make_row(i: int) -> dict:
    """Sample i: mixed sizes, i % 3 controls of their own sizes, a mask on even rows, its own prompt length."""
    g = torch.Generator().manual_seed(i)
    h, w = 2 * (2 + i % 4), 2 * (3 + i % 3)
    controls = [torch.randn(4, 2 * (1 + (i + k) % 3), 2 * (2 + k), generator=g) for k in range(i % 3)]
    return {
        "target_latents": torch.randn(4, h, w, generator=g),
        "control_latents": controls,
        "prompt_embeds": torch.randn(3 + i % 5, 8, generator=g),
        "pooled_prompt_embeds": torch.randn(6, generator=g),
        "mask": (torch.rand(h // 2, w // 2, generator=g) > 0.5).float() if i % 2 == 0 else None,
        "img_shapes": [[1, h // 2, w // 2]] + [[1, c.shape[1] // 2, c.shape[2] // 2] for c in controls],
        "sample_id": f"s{i:03d}",
        "sources": {"target": f"img/{i}.png", "controls": [f"ctl/{i}_{k}.png" for k in range(i % 3)]},
    }


def main() -> None:
    """Write rows 0..NUM_ROWS-1 slowly into CACHE_DIR."""
    cache_dir, num_rows, shard_size, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    with CacheWriter(cache_dir, FINGERPRINT, shard_size=shard_size) as writer:
        for i in range(num_rows):
            time.sleep(delay)
            writer.add(i, make_row(i))


if __name__ == "__main__":
    main()
