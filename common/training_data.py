"""The trainers' data: rows of a precomputed cache or encoded on the fly, in one item format either way.

With `--cache_dir` the rows come from the Arrow cache of `precompute_cache.py`, checked against the requested
settings (and, given `--dataset`, against the content of every source). Without it every row is validated once
(decoded, cropped, resized: bad rows raise or, with `--skip_bad_samples`, are skipped and listed) and then prepared
and encoded again on each access with the frozen encoders, exactly as the precompute would have, and passed through
the cache's row encoding, so an item is the same dict, dtypes included, whether it was cached or not:

    target_latents (C, h, w), control_latents [(C, h_k, w_k)], prompt_embeds (T, D), pooled_prompt_embeds (P,)
    (models with one), empty_prompt_embeds (T0, D) (models whose prompt sees the images), mask
    (h/2, w/2) float32 or None, img_shapes [[1, h/2, w/2], ...] (target first), sources, sample_id, index
    (source order) and version.

Uncached items run the encoders in the calling process: use the dataset with num_workers=0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from safetensors.torch import load_file

from common.cache import (
    INFO_FILE,
    CachedRows,
    CacheNotFinished,
    cache_info,
    cached_row_hashes,
    load_cache,
    row_img_shapes,
    stored_row,
    text_token_counts,
    token_counts,
    unflatten_row,
)
from common.cli import add_data_args, resolution_policy
from common.data import EditRow, PreparedSample, prepare_sample, read_rows, source_hash
from common.encoders import Encoders, encode_row, load_encoders
from common.errors import UserError
from common.models import EditModel, get_model
from common.resolution import ResolutionPolicy
from common.validate import CROP_REPORT_SHARE, DataReport, check_target_only, validate_rows

# Fingerprint settings left out at these values (added after caches existed; see `common.cache.load_cache`).
FINGERPRINT_DEFAULTS = {"control_resolution": "target"}


@dataclass
class TrainingData:
    """What a trainer iterates over, and what it needs besides the rows."""

    dataset: torch.utils.data.Dataset  # item i -> dict in the format of the module doc, cached or not
    lengths: list[int]  # image tokens per item (target + references), for the length-grouped sampler and logging
    # models whose prompt does not see the images: the embeddings of "" (caption dropout); else None (per row)
    empty_prompt: dict[str, torch.Tensor] | None
    cached: bool
    img_shapes: list[list[list[int]]] = field(default_factory=list)  # per item, target first (the card's size mix)
    captions: list[str | None] | None = None  # the rows' prompts where the rows were read (--dataset), for the card


class EncodedRows(torch.utils.data.Dataset):
    """Uncached rows: item i is row i prepared and encoded on access, in the format of `CachedRows` items."""

    def __init__(self, rows: list[EditRow], model: EditModel, policy: ResolutionPolicy, encoders: Encoders) -> None:
        """Keep the (validated) rows, which hold file references only, and the encoders to run on access."""
        self.rows, self.model, self.policy, self.encoders = rows, model, policy, encoders

    def __len__(self) -> int:
        """Number of usable rows."""
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        """Row i encoded now, stored and read back as the cache would (bfloat16 becomes float32 there too)."""
        row = self.rows[i]
        sample = prepare_sample(row, self.model, self.policy)
        return unflatten_row(stored_row(row.index, cache_row(self.encoders, sample)))


def cache_row(encoders: Encoders, sample: PreparedSample) -> dict:
    """The row precompute_cache.py stores for a prepared sample (and the uncached data returns): the encoders'
    outputs plus `cropped`, the largest share of one of its images the crop removed (for the data summary)."""
    return {**encode_row(encoders, sample), "cropped": sample.cropped}


def _read(args: argparse.Namespace) -> list[EditRow]:
    """Rows of --dataset, with the column flags; rows without control among rows with one need --allow_target_only."""
    rows = read_rows(
        args.dataset,
        image_column=args.image_column,
        control_column=args.control_column,
        caption_column=args.caption_column,
        mask_column=args.mask_column,
    )
    check_target_only(rows, args.allow_target_only, f"dataset {args.dataset}")
    return rows


def text_length(args: argparse.Namespace, model: EditModel) -> int | None:
    """The text length the flags ask for (--max_sequence_length, default the model's); None for models without one."""
    if model.max_sequence_length is None:
        return None
    return getattr(args, "max_sequence_length", None) or model.max_sequence_length


def data_fingerprint(args: argparse.Namespace, model: EditModel | str, encoder_dtype: str | None = None) -> dict:
    """The settings every cached row of `model` depends on, by meaning: paths resolved, sizes parsed and reduced to
    the mode that applies (so `--multi_resolutions 512*512 768x768` equals `589824 262144`).

    `args` holds the flags of `common.cli.add_model_args` / `add_data_args` (and optionally --max_sequence_length);
    `encoder_dtype` (precompute's --mixed_precision) is stored by the precompute; a trainer compares the settings it
    knows. The rows' content is tracked per row (`row_hashes`), so data edits re-encode only the rows edited. The
    default `--control_resolution target` is left out, so caches written before that flag existed stay valid.
    """
    model = get_model(model)
    policy = resolution_policy(args, model)
    fixed = policy.fixed_size is not None
    path = Path(str(args.pretrained_model_name_or_path)).expanduser()
    settings = {
        "model": model.data_name,
        "pretrained_model_name_or_path": str(path.resolve()) if path.exists() else str(path),
        "revision": args.revision,
        "resolution": list(policy.fixed_size) if fixed else None,
        "multi_resolutions": sorted(set(policy.multi_resolutions)) if policy.is_multi_resolution else None,
        "target_area": None if fixed or policy.is_multi_resolution else policy.target_area,
        "max_aspect_ratio": None if fixed else policy.max_aspect_ratio,
        "max_sequence_length": text_length(args, model),
    }
    control_resolution = getattr(args, "control_resolution", FINGERPRINT_DEFAULTS["control_resolution"])
    if control_resolution != FINGERPRINT_DEFAULTS["control_resolution"]:
        settings["control_resolution"] = control_resolution
    if encoder_dtype is not None:
        settings["encoder_dtype"] = encoder_dtype
    return settings


def row_hashes(rows: Sequence[EditRow]) -> list[str | None]:
    """Content hash of each row (sample id, caption, bytes of every image); None when a file cannot be read (the
    row is then bad and validation names the file)."""
    hashes: list[str | None] = []
    for row in rows:
        try:
            parts = [row.sample_id, row.prompt or ""]
            parts += [source_hash(s) if s else "" for s in (row.target, *row.controls, row.mask)]
        except OSError:
            hashes.append(None)
            continue
        hashes.append(hashlib.sha256(json.dumps(parts).encode()).hexdigest())
    return hashes


def precompute_command(args: argparse.Namespace, model: EditModel | str) -> str:
    """The precompute_cache.py command line that builds the cache these flags ask for."""
    model = get_model(model)
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_data_args(parser)
    defaults = vars(parser.parse_args([]))
    words = ["accelerate", "launch", "precompute_cache.py", "--model", model.name]
    words += ["--pretrained_model_name_or_path", str(args.pretrained_model_name_or_path)]
    if args.revision:
        words += ["--revision", args.revision]
    words += ["--dataset", args.dataset or "DATASET"]
    for name, default in defaults.items():
        value = getattr(args, name, default)
        if name == "dataset" or value == default:
            continue
        if value is True:
            words.append(f"--{name}")
        else:
            words += [f"--{name}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    length = text_length(args, model)
    if length != model.max_sequence_length:
        words += ["--max_sequence_length", str(length)]
    return shlex.join(words)


def _open_cached(args: argparse.Namespace, model: EditModel) -> TrainingData:
    """The cache at --cache_dir, checked against the settings, and row by row against --dataset when given."""
    try:
        dataset = load_cache(args.cache_dir, data_fingerprint(args, model), subset=True, defaults=FINGERPRINT_DEFAULTS)
    except (FileNotFoundError, CacheNotFinished) as error:
        message = f"{error}\nbuild it with precompute_cache.py:\n  {precompute_command(args, model)}"
        raise type(error)(message) from error
    if args.dataset:
        rows = _read(args)
        cached = cached_row_hashes(args.cache_dir)
        changed = [r.sample_id for r, h in zip(rows, row_hashes(rows), strict=True) if cached.get(r.index) != h]
        if changed or len(cached) != len(rows):
            raise UserError(
                f"cache at {args.cache_dir} does not match --dataset {args.dataset}: {len(changed)} row(s) changed, "
                f"{len(rows)} rows now vs {len(cached)} cached (first changed: {changed[:3]}); rerun the precompute "
                f"with the same flags, it encodes only those rows: {precompute_command(args, model)}"
            )
    empty_prompt = None
    if not model.prompt_sees_images:
        name = cache_info(args.cache_dir)["extra"].get("empty_prompt")
        if name is None:
            raise UserError(f"cache at {args.cache_dir} holds no empty-prompt embedding: rebuild it (--rebuild_cache)")
        empty_prompt = load_file(Path(args.cache_dir) / name)
    cache_report(args.cache_dir, dataset).log(f"cache {args.cache_dir}")
    captions = [row.prompt for row in rows] if args.dataset else None
    return TrainingData(
        CachedRows(dataset), token_counts(dataset), empty_prompt, True, row_img_shapes(dataset), captions
    )


def cache_report(cache_dir: str, dataset: datasets.Dataset) -> DataReport:
    """The data summary of a cache, from its info file and small columns (no tensor is read)."""
    info = cache_info(cache_dir) if (Path(cache_dir) / INFO_FILE).exists() else {}
    skipped = [(s["sample_id"], s["reason"]) for s in info.get("skipped", [])]
    names = ["sample_id", "img_shapes"] + (["cropped"] if "cropped" in dataset.column_names else [])
    columns = dataset.select_columns(names).to_dict()
    ids = columns["sample_id"]
    cropped = zip(ids, columns.get("cropped", [0.0] * len(dataset)), strict=True)
    return DataReport(
        rows=len(dataset) + len(skipped),
        skipped=skipped,
        without_control=[s for s, shapes in zip(ids, columns["img_shapes"], strict=True) if len(shapes) == 1],
        cropped=[(s, share) for s, share in cropped if share > CROP_REPORT_SHARE],
    )


def encoders_for(args: argparse.Namespace, model: EditModel, device: torch.device, dtype: torch.dtype) -> Encoders:
    """The frozen encoders of the checkpoint the flags name (for on-the-fly data and for validation); offloaded to CPU
    memory between uses unless --encoders_on_device, so they never sit on the GPU beside the training state."""
    return load_encoders(
        model,
        args.pretrained_model_name_or_path,
        device=device,
        dtype=dtype,
        revision=args.revision,
        max_sequence_length=text_length(args, model),
        offload=not getattr(args, "encoders_on_device", False),
    )


def _open_uncached(
    args: argparse.Namespace, model: EditModel, device: torch.device, dtype: torch.dtype
) -> TrainingData:
    """Rows of --dataset, validated now (before any encoder loads) and encoded on access on device/dtype."""
    policy = resolution_policy(args, model)
    checked, report = validate_rows(_read(args), model, policy, skip_bad_samples=args.skip_bad_samples)
    report.log(f"dataset {args.dataset}")
    report.require_rows(f"dataset {args.dataset}")
    encoders = encoders_for(args, model, device, dtype)
    empty_prompt = None if model.prompt_sees_images else encoders.encode_prompt("")
    rows = [c.row for c in checked]
    dataset = EncodedRows(rows, model, policy, encoders)
    shapes = [c.img_shapes for c in checked]
    return TrainingData(dataset, [c.tokens for c in checked], empty_prompt, False, shapes, [r.prompt for r in rows])


def real_token_counts(args: argparse.Namespace, model: EditModel, data: TrainingData) -> list[int]:
    """Real tokens of each item as the transformer sees them (target + references + text), for token budgets."""
    if data.cached:
        text = text_token_counts(data.dataset.dataset)
    elif model.max_sequence_length is not None:  # fixed-length text (T5-style): always the flags' text length
        text = [text_length(args, model)] * len(data.lengths)
    else:
        raise UserError(
            "--max_tokens_per_batch needs each prompt's token count, which for this model is known only once encoded:"
            " cache the data set first with precompute_cache.py and pass --cache_dir"
        )
    return [n + t for n, t in zip(data.lengths, text, strict=True)]


def open_training_data(
    args: argparse.Namespace, model: EditModel | str, device: torch.device, dtype: torch.dtype
) -> TrainingData:
    """The rows `args` describe: the cache at --cache_dir if given, else --dataset encoded on the fly on device/dtype.

    `args` holds the flags of `common.cli.add_model_args` and `add_data_args`, and optionally --max_sequence_length.
    """
    model = get_model(model)
    if args.cache_dir:
        return _open_cached(args, model)
    if not args.dataset:
        raise UserError("give --dataset (encoded while training) or --cache_dir (a cache from precompute_cache.py)")
    return _open_uncached(args, model, device, dtype)
