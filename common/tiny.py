"""Tiny random checkpoints of the registered edit models, built with the real classes in the hub repo layout.

They let tests and benchmarks load and run the stock diffusers pipelines (and our trainer) offline on CPU; writing one
takes well under a second. What each model's checkpoint holds comes from its description (`common.models`).
"""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import Any

import torch

from common.models import MODELS, EditModel, get_model
from common.tiny_components import seeded


def tiny_transformer_config(model: EditModel | str) -> dict[str, Any]:
    """Return the tiny transformer config of `model`, so tests and benchmarks can build or resize it."""
    model = get_model(model)
    if model.tiny_transformer_config is None:
        raise ValueError(f"{model.name} has no tiny checkpoint")
    return dict(model.tiny_transformer_config)


def tiny_transformer(model: EditModel | str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """Build only the tiny transformer of `model` with the real class (overrides let benchmarks enlarge it)."""
    model = get_model(model)
    config = {**tiny_transformer_config(model), **overrides}
    return seeded(seed, lambda: model.transformer_class(**config))


def write_tiny(model: EditModel | str, out_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Write a tiny random checkpoint of `model` in the hub repo layout under out_dir; return out_dir."""
    model = get_model(model)
    if model.tiny_components is None:
        raise ValueError(f"{model.name} has no tiny checkpoint")
    out = pathlib.Path(out_dir)
    model.write_pipeline(model.tiny_components(seed), tiny_transformer(model, seed), out)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: write a tiny checkpoint and print where it went."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=list(MODELS))
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny(args.model, args.out_dir, args.seed))


if __name__ == "__main__":
    main()
