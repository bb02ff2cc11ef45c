"""Precompute VAE latents and text embeddings of an edit dataset into an Arrow cache, so training never waits on
encoders. Each process of `accelerate launch` encodes rows p::N; a rerun resumes where a killed run stopped.

    accelerate launch precompute_cache.py --model qwen_edit_plus \\
        --pretrained_model_name_or_path Qwen/Qwen-Image-Edit-2509 --dataset ./pairs --cache_dir ./cache \\
        --multi_resolutions 512*512 768*768 1024*1024
"""

import argparse

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from common.cache import CacheWriter, finalize_cache, load_cache, save_tensors_atomic
from common.cli import add_data_args, add_model_args, add_output_args, check_ranges, checkpoint_model, resolution_policy
from common.data import prepare_sample, read_rows
from common.encoders import load_encoders
from common.errors import UserError, configure_logging, run_script
from common.models import MODELS, get_model
from common.sdpa import sdpa_kernels
from common.training_data import cache_report, cache_row, data_fingerprint, row_hashes, text_length
from common.validate import DataReport, check_target_only, validate_rows

EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags: the model, where the data comes from and how it is sized, where the cache goes."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=list(MODELS))
    add_model_args(parser)
    add_data_args(parser)
    parser.add_argument("--rebuild_cache", action="store_true", help="discard an existing cache and encode again")
    parser.add_argument("--max_sequence_length", type=int, default=None, help="text tokens (default: the model's)")
    parser.add_argument("--shard_size", type=int, default=32, help="rows per atomically written shard")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"], help="encoder dtype")
    parser.add_argument(
        "--offload_encoders",
        action="store_true",
        help="keep the encoders in CPU memory, onloading them block by block while encoding (for small GPUs)",
    )
    add_output_args(parser)
    args = parser.parse_args(argv)
    if not args.dataset or not args.cache_dir:
        raise UserError("--dataset and --cache_dir are both required")
    check_ranges(args)
    model = get_model(args.model)
    checkpoint_model(
        args.pretrained_model_name_or_path, args.revision, [model], f"precompute_cache.py --model {model.name}"
    )
    resolution_policy(args, args.model)
    return args


@sdpa_kernels()  # the trainers' default attention kernels (no cuDNN attention, README "Attention kernels")
def main(args: argparse.Namespace) -> None:
    """Validate this process's share of the rows, encode the good ones, then (main process) finalize and report."""
    configure_logging(args.quiet)
    accelerator = Accelerator()
    model = get_model(args.model)
    policy = resolution_policy(args, model)
    rows = read_rows(
        args.dataset,
        image_column=args.image_column,
        control_column=args.control_column,
        caption_column=args.caption_column,
        mask_column=args.mask_column,
    )
    check_target_only(rows, args.allow_target_only, f"dataset {args.dataset}")
    settings = data_fingerprint(args, model, encoder_dtype=args.mixed_precision)
    # Process 0 clears an old cache on --rebuild_cache before the others open theirs.
    with accelerator.main_process_first():
        writer = CacheWriter(
            args.cache_dir,
            settings,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            shard_size=args.shard_size,
            rebuild=args.rebuild_cache and accelerator.is_main_process,
            row_hashes=row_hashes(rows),
        )
    done = writer.done_indices()
    logger.info(f"{len(done)} of {len(rows)} rows are already in the cache", main_process_only=True)
    mine = [r for r in rows[accelerator.process_index :: accelerator.num_processes] if r.index not in done]
    # Every row is checked against the model before any encoder loads or anything is written; all processes see
    # every process's bad rows, so they stop (or skip) together.
    checked, report = validate_rows(mine, model, policy, skip_bad_samples=True)
    everyone = sum(gather_object([report]), DataReport())
    if everyone.skipped and not args.skip_bad_samples:
        raise UserError(f"{everyone.skipped[0][1]}; --skip_bad_samples skips bad rows and lists them")
    if not done:
        everyone.require_rows(f"dataset {args.dataset}")
    everyone.log_composited()
    bad = dict(report.skipped)
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    encoders = load_encoders(
        model,
        args.pretrained_model_name_or_path,
        device=accelerator.device,
        dtype=dtype,
        revision=args.revision,
        max_sequence_length=text_length(args, model),
        offload=args.offload_encoders,
    )
    encode = [row for row in mine if row.sample_id not in bad]
    logger.info(f"encoding {len(encode)} rows on this process", main_process_only=False)
    with writer:
        for row in tqdm(mine, desc="encoding", disable=not accelerator.is_local_main_process):
            if row.sample_id in bad:
                writer.skip(row.index, row.sample_id, bad[row.sample_id])
            else:
                writer.add(row.index, cache_row(encoders, prepare_sample(row, model, policy)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # Where text embeddings do not depend on the images, one empty-prompt embedding serves caption dropout.
        extra = {}
        if not model.prompt_sees_images:
            save_tensors_atomic(f"{args.cache_dir}/{EMPTY_PROMPT_FILE}", encoders.encode_prompt("", []))
            extra["empty_prompt"] = EMPTY_PROMPT_FILE
        finalize_cache(args.cache_dir, settings, len(rows), extra=extra)
        cache_report(args.cache_dir, load_cache(args.cache_dir)).log(f"cache written to {args.cache_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    run_script(lambda: main(parse_args()))
