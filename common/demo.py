"""`--demo`: a tiny random checkpoint and a synthetic mixed-resolution edit set under ./demo, cached and trained.

Everything is real except the weights: the checkpoint is written by `common.tiny` in the hub layout and loaded
with `from_pretrained`, the data goes through `precompute_cache.py`, and training is the normal loop with
`--multi_resolutions`, so the demo exercises the path a user's run takes, on CPU in about a minute.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from accelerate import PartialState
from PIL import Image, ImageDraw

from common.model_card import CARD_FILE
from common.models import EditModel, get_model
from common.plots import CURVES_FILE
from common.run_guard import earlier_results
from common.tiny import write_tiny
from common.training import METRICS_FILE, train

DEMO_DIR = Path("demo")
# (width, height) of the targets: several sizes and aspect ratios, so batches mix resolutions.
SIZES = [(256, 256), (320, 192), (192, 320), (384, 256), (256, 384), (192, 192), (448, 192), (224, 288)]
# Text length of the demo's prompts ("make the first shape red") for models that pad prompts to a fixed length.
DEMO_TEXT_LENGTH = 32
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 200, 40)}
# Launcher variables removed from the cache step's environment, so it runs as a plain single process.
_DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def _scene(size: tuple[int, int], colour: tuple[int, int, int], seed: int) -> Image.Image:
    """A grey canvas with a few shapes; the first shape (the one edits recolour) gets `colour`."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    width, height = size
    for k in range(3):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        box = (int(x0), int(y0), int(x0 + width // 3), int(y0 + height // 3))
        fill = colour if k == 0 else tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if k % 2 else draw.rectangle)(box, fill=fill)
    return image


def write_dataset(folder: Path, model: EditModel | str, rows: int = 32) -> None:
    """Edit pairs "make the first shape <colour>": stem.png (after), stem_control[_k].png (before), stem.txt; row i
    has the model's `demo_controls_per_row[i % len]` controls."""
    controls_per_row = get_model(model).demo_controls_per_row
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for i in range(rows):
        size = SIZES[i % len(SIZES)]
        after = names[i % len(names)]
        before = names[(i + 1) % len(names)]
        _scene(size, COLOURS[after], seed=i).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"make the first shape {after}")
        count = controls_per_row[i % len(controls_per_row)]
        for k in range(count):
            suffix = "_control" if count == 1 else f"_control_{k}"
            # Extra references have other sizes than the target, as users' reference sets do.
            ref_size = size if k == 0 else SIZES[(i + 3) % len(SIZES)]
            _scene(ref_size, COLOURS[before], seed=i if k == 0 else 1000 + i).save(folder / f"{i:03d}{suffix}.png")


def fresh_output_dir(parent: Path, name: str) -> Path:
    """parent/name, or parent/name-2, -3, ... when earlier demo runs left their results there (never overwritten)."""
    folder, n = parent / name, 2
    while earlier_results(folder):
        folder, n = parent / f"{name}-{n}", n + 1
    if folder.name != name:
        print(f"demo: {parent / name} holds an earlier demo run; this one writes to {folder}")
    return folder


def prepare_demo(args: argparse.Namespace, model: EditModel) -> None:
    """Write the tiny checkpoint, data and cache (once, on the main process) and point `args` at them."""
    root = DEMO_DIR.resolve()
    os.environ.setdefault("WANDB_MODE", "offline")
    args.pretrained_model_name_or_path = str(root / "model" / model.name)
    args.dataset = str(root / "data" / model.name)
    args.cache_dir = str(root / "cache" / model.name)
    args.output_dir = str(fresh_output_dir(root / "output", model.name))
    args.multi_resolutions = ["128*128", "192*192", "256*256"]
    # --group_by_length, as the padding warning recommends for mixed sizes: padding stays under 16% (random order:
    # up to 56%); 5 samples a batch, as the demo's sizes repeat in fours, so grouped batches still mix sizes.
    args.max_train_steps, args.checkpointing_steps, args.train_batch_size = 30, 10, 5
    args.group_by_length = True
    args.allow_target_only = True  # demo rows of FLUX.2 and Edit-Plus mix 0..n controls on purpose
    args.learning_rate, args.rank, args.lora_alpha = 1e-3, 4, 4.0
    args.control_dropout = args.control_dropout or 0.1
    text_flags = []
    if model.max_sequence_length is not None:  # prompts padded to a length: the demo's few words need no 512
        args.max_sequence_length = DEMO_TEXT_LENGTH
        text_flags = [f"--max_sequence_length={DEMO_TEXT_LENGTH}"]
    with PartialState().main_process_first():
        if PartialState().is_main_process:
            checkpoint = Path(args.pretrained_model_name_or_path)
            if not any((checkpoint / index).exists() for index in ("model_index.json", "modular_model_index.json")):
                write_tiny(model, args.pretrained_model_name_or_path)
            if not Path(args.dataset).exists():
                write_dataset(Path(args.dataset), model)
            env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV}
            command = [
                sys.executable,
                str(Path(__file__).resolve().parent.parent / "precompute_cache.py"),
                f"--model={model.name}",
                f"--pretrained_model_name_or_path={args.pretrained_model_name_or_path}",
                f"--dataset={args.dataset}",
                f"--cache_dir={args.cache_dir}",
                "--allow_target_only",
                *text_flags,
                "--multi_resolutions",
                *args.multi_resolutions,
            ]
            subprocess.run(command, check=True, env=env)


def report_demo(args: argparse.Namespace, lora_file: Path) -> None:
    """Say where the run's outputs are (main process); the training loop wrote them."""
    if not PartialState().is_main_process:
        return
    output_dir = Path(args.output_dir)
    print(
        f"demo finished:\n  LoRA weights: {lora_file}\n  training curves: {output_dir / CURVES_FILE}\n"
        f"  model card: {output_dir / CARD_FILE}\n  metrics: {output_dir / METRICS_FILE}"
    )


def run(args: argparse.Namespace, model: EditModel) -> Path:
    """A trainer's main: train as the flags say; with --demo, build the demo inputs first."""
    if args.demo:
        prepare_demo(args, model)
    lora_file = train(args, model)
    if args.demo:
        report_demo(args, lora_file)
    return lora_file
