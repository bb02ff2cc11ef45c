"""The model card `README.md` a run leaves in `--output_dir`, written with `huggingface_hub`'s `ModelCard`.

Metadata as the Hub reads it (base_model, library_name: diffusers, pipeline_tag, tags incl. `lora` and the model's
own, its licence, a widget of the last validation images); the text holds the base model and pipeline class,
caption hints, a copy-paste diffusers snippet, the training command and settings, and the data set's size and
resolution mix (target sizes from the rows' `img_shapes`).

Ours or the user's: a card this trainer writes carries `MARKER` as its first line after the metadata. A `README.md`
without it is the user's and is never overwritten (the card is then not written and a warning says so); one with
it is replaced by the next run into the folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
from collections import Counter
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData

from common.cli import public_config
from common.data import TOKEN_PIXELS
from common.lora import COMFYUI_FILE, LORA_FILE
from common.models.base import HubDescription, edit_snippet
from common.plots import CURVES_FILE
from common.run_guard import VALIDATION_DIR

if TYPE_CHECKING:
    from common.models import EditModel
    from common.training_data import TrainingData

CARD_FILE = "README.md"
MARKER = "<!-- written by the edit-LoRA trainer; a run into this folder rewrites it unless this line is removed -->"
SNIPPET_STEPS = 28
MAX_SIZE_ROWS = 12  # resolution table rows; rarer sizes are summed into one "other" row
MAX_CAPTIONS = 5
# Settings shown in the card's table, in this order (the full configuration follows in a collapsed block).
SUMMARY_FLAGS = (
    "max_train_steps",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "rank",
    "lora_alpha",
    "lora_target_modules",
    "timestep_sampling",
    "caption_dropout",
    "control_dropout",
    "guidance_scale",
    "resolution",
    "multi_resolutions",
    "target_area",
    "group_by_length",
    "gradient_checkpointing",
    "seed",
)


def _snapshot_repo(path: Path) -> str | None:
    """The Hub repository of a Hub-cache snapshot folder (".../models--org--name/snapshots/<rev>"), else None."""
    snapshot = re.search(r"models--([^/]+)--([^/]+)/snapshots/", path.resolve().as_posix() + "/")
    return f"{snapshot[1]}/{snapshot[2]}" if snapshot else None


def base_model_id(pretrained: str, official: str) -> str:
    """The Hub id trained on: the name given, the repository of a Hub-cache snapshot folder, else the official one."""
    path = Path(pretrained)
    if not path.exists():
        return pretrained
    return _snapshot_repo(path) or official


def latest_validation(output_dir: str | os.PathLike) -> tuple[int, list[Path]] | None:
    """(step, images) of the newest `validation/step-N/` folder, or None if the run sampled none."""
    found = []
    for folder in (Path(output_dir) / VALIDATION_DIR).glob("step-*"):
        if folder.name.removeprefix("step-").isdecimal():
            found.append((int(folder.name.removeprefix("step-")), folder))
    if not found:
        return None
    step, folder = max(found)
    return step, sorted(folder.glob("*.png"), key=lambda p: (len(p.stem), p.stem))


def resolution_mix(img_shapes: list[list[list[int]]]) -> list[tuple[str, int]]:
    """("W×H", samples) of the target sizes in pixels, most frequent first (rare ones summed as "other")."""
    counts = Counter((shapes[0][2] * TOKEN_PIXELS, shapes[0][1] * TOKEN_PIXELS) for shapes in img_shapes)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], -item[0][0] * item[0][1]))
    rows = [(f"{w}×{h}", n) for (w, h), n in ranked[:MAX_SIZE_ROWS]]
    rest = sum(n for _, n in ranked[MAX_SIZE_ROWS:])
    return rows + ([(f"{len(ranked) - MAX_SIZE_ROWS} other sizes", rest)] if rest else [])


def caption_hints(captions: list[str | None] | None) -> list[str]:
    """Markdown lines: a few training captions, and the words every caption shares (a trigger word shows here)."""
    texts = [c for c in captions or [] if c]
    if not texts:
        return ["The training captions are not recorded (the run read a cache without `--dataset`)."]
    examples = list(dict.fromkeys(texts))[:MAX_CAPTIONS]
    lines = ["Training captions look like:", "", *[f"- `{c}`" for c in examples]]
    shared = set.intersection(*(set(c.lower().split()) for c in texts))
    if shared:
        ordered = [w for w in dict.fromkeys(texts[0].lower().split()) if w in shared]
        lines += ["", f"Words in every caption: {', '.join(f'`{w}`' for w in ordered)}."]
    return lines


def snippet(pipeline_class: str, base_model: str, lora: str, prompt: str, steps: int = SNIPPET_STEPS) -> str:
    """Python that loads the base pipeline with this LoRA and edits one image."""
    load = f"pipe = {pipeline_class}.from_pretrained({base_model!r}, dtype=torch.bfloat16)"
    return edit_snippet(f"from diffusers import {pipeline_class}", load, lora, prompt, steps)


def command_line(args: argparse.Namespace, model: EditModel) -> str:
    """The launch command of the run (flags as given; secrets were dropped when they were recorded)."""
    return shlex.join(["accelerate", "launch", model.script, *getattr(args, "training_command", [])])


def _value(value: object) -> str:
    """A setting as the card's table shows it."""
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def model_card(
    args: argparse.Namespace,
    model: EditModel,
    data: TrainingData,
    num_processes: int,
    mixed_precision: str,
    repo_id: str | None = None,
) -> ModelCard:
    """The card of a finished run whose outputs are in `args.output_dir` (`repo_id`: where it will be pushed)."""
    output_dir = Path(args.output_dir)
    hub = model.hub or HubDescription(str(args.pretrained_model_name_or_path), ())
    base = base_model_id(str(args.pretrained_model_name_or_path), hub.repo_id)
    pipeline = model.pipeline_class.__name__
    validation = latest_validation(output_dir)
    prompts = list(args.validation_prompts or [])
    widget = None
    if validation is not None:
        step, images = validation
        relative = [image.relative_to(output_dir).as_posix() for image in images]
        widget = [{"text": prompts[k], "output": {"url": url}} for k, url in enumerate(relative) if k < len(prompts)]
    data_card = ModelCardData(
        base_model=base,
        library_name="diffusers",
        pipeline_tag="image-to-image",
        license=hub.license,
        license_name=hub.license_name,
        license_link=hub.license_link,
        tags=["lora", "diffusers", "diffusers-training", *hub.tags, "template:sd-lora"],
        widget=widget,
    )
    example = prompts[0] if prompts else next((c for c in data.captions or [] if c), "describe the edit")
    title = repo_id or output_dir.name
    global_batch = args.train_batch_size * num_processes * args.gradient_accumulation_steps
    pretrained = str(args.pretrained_model_name_or_path)
    local = Path(pretrained).exists() and _snapshot_repo(Path(pretrained)) is None  # a folder not from the Hub
    trained_on = f"the local checkpoint `{pretrained}`" if local else f"[{base}](https://huggingface.co/{base})"
    lines = [
        MARKER,
        f"# {title}",
        "",
        f"A LoRA for {trained_on} (`{pipeline}`), trained on {len(data.img_shapes)} edit pairs at their own "
        "resolutions, mixed in each batch.",
    ]
    if local:  # the Hub metadata needs a Hub id: the official model of this pipeline stands in for the folder
        lines += [
            "",
            f"The metadata and the snippet below name [{base}](https://huggingface.co/{base}), the official "
            f"`{pipeline}` model; load `{pretrained}` instead if that folder holds other weights.",
        ]
    elif base != pretrained:
        lines += ["", f"Trained from the Hub-cache snapshot `{pretrained}`."]
    lines += [
        "",
        "## Use it",
        "",
        "```python",
        (model.usage_snippet or partial(snippet, pipeline))(
            base, repo_id or str(output_dir.resolve()), example, SNIPPET_STEPS
        ),
        "```",
        "",
        f"`{LORA_FILE}` has each module's `lora_alpha / rank` scale folded into its B matrix and says "
        "`lora_alpha = rank`: diffusers, ComfyUI's LoRA loader and other clients apply the same weights"
        + (f"; `{COMFYUI_FILE}` holds the same LoRA with ComfyUI's key names." if args.export_comfyui else "."),
        "",
        "## Prompts",
        "",
        *caption_hints(data.captions),
    ]
    if validation is not None:
        step, images = validation
        lines += ["", f"## Validation images (step {step})", "", "| prompt | image |", "| --- | --- |"]
        for k, image in enumerate(images):
            prompt = (prompts[k] if k < len(prompts) else "").replace("|", "\\|")  # a "|" would end the cell
            lines.append(f"| {prompt} | ![{k}]({image.relative_to(output_dir).as_posix()}) |")
    references = Counter(len(shapes) - 1 for shapes in data.img_shapes)
    lines += [
        "",
        "## Training data",
        "",
        f"{len(data.img_shapes)} samples; reference images per sample: "
        + ", ".join(f"{n} in {count}" for n, count in sorted(references.items()))
        + ". Target sizes after resizing:",
        "",
        "| size (W×H) | samples | share |",
        "| --- | ---: | ---: |",
        *[f"| {size} | {n} | {n / len(data.img_shapes):.0%} |" for size, n in resolution_mix(data.img_shapes)],
        "",
        "## Training",
        "",
        "```bash",
        command_line(args, model),
        "```",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| global batch | {global_batch} (per process {args.train_batch_size} × processes {num_processes} × "
        f"accumulation {args.gradient_accumulation_steps}) |",
        f"| mixed precision | {mixed_precision} |",
        *[f"| {name} | {_value(getattr(args, name))} |" for name in SUMMARY_FLAGS if hasattr(args, name)],
        "",
        f"![training curves]({CURVES_FILE})",
        "",
        "<details><summary>Full configuration</summary>",
        "",
        "```json",
        json.dumps({k: v for k, v in public_config(args).items() if k != "training_command"}, indent=2, default=str),
        "```",
        "",
        "</details>",
    ]
    content = f"---\n{data_card.to_yaml()}\n---\n" + "\n".join(lines) + "\n"
    return ModelCard(content)


def write_model_card(output_dir: str | os.PathLike, card: ModelCard) -> Path | None:
    """Save `card` as output_dir/README.md unless a README.md there is the user's (module doc); None then."""
    path = Path(output_dir) / CARD_FILE
    if path.exists() and MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        return None
    tmp = path.with_name(f".{CARD_FILE}.{os.getpid()}.tmp")
    try:
        card.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
