"""One output folder, one run: nothing a run wrote is overwritten by another, and `latest` resumes only its own run.

A run is identified by a random run id, written to `output_dir/run.json` when it starts and into every checkpoint,
plus the settings a resumed run must share with it to continue the same training (model and base checkpoint,
LoRA shape, seed, batch layout, process count, data source), and all its flags. A resumed run takes every flag the
user does not type again from that record, so `--output_dir DIR --resume_from_checkpoint latest` continues the run
as it was; flags typed again may change everything but the identity settings. A fresh run into a folder holding
another run's results (checkpoints, LoRA files, metrics, validation images) is refused before anything is loaded or
written.
"""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path

from accelerate.logging import get_logger

from common.checkpoints import RUN_FILE, check_loadable, checkpoints, resolve_resume
from common.errors import UserError
from common.lora import COMFYUI_FILE, LORA_FILE

METRICS_FILE = "metrics.jsonl"
VALIDATION_DIR = "validation"
# Flags a resumed run must share with the checkpoint it resumes (the model, the LoRA's shape and the sample order).
IDENTITY_FLAGS = (
    "pretrained_model_name_or_path",
    "revision",
    "rank",
    "lora_alpha",
    "lora_target_modules",
    "seed",
    "train_batch_size",
    "gradient_accumulation_steps",
    "group_by_length",
    "dataset",
    "cache_dir",
)
PATH_FLAGS = ("pretrained_model_name_or_path", "dataset", "cache_dir")
# Flags that say how to run this time, never taken from the record of the run resumed.
NOT_RESUMED = ("output_dir", "resume_from_checkpoint", "quiet", "demo", "training_command")
logger = get_logger(__name__)


def run_identity(args: argparse.Namespace, model: str, num_processes: int) -> dict:
    """The settings that make a checkpoint resumable by this run (see the module doc); local paths resolved, so
    another spelling of the same folder is the same run."""
    identity = {"model": model, "num_processes": num_processes}
    for flag in IDENTITY_FLAGS:
        value = getattr(args, flag, None)
        if flag in PATH_FLAGS and value and Path(value).expanduser().exists():
            value = str(Path(value).expanduser().resolve())
        identity[flag] = value
    return json.loads(json.dumps(identity, default=str))


def read_run(folder: str | Path) -> dict | None:
    """The run record ({"run_id", "identity"}) stored in an output folder or checkpoint, or None."""
    path = Path(folder) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def earlier_results(output_dir: str | Path) -> list[str]:
    """Names of what a run leaves in `output_dir` (checkpoints, LoRA files, metrics, validation images)."""
    folder = Path(output_dir)
    found = [p.name for p in checkpoints(folder)]
    found += [name for name in (LORA_FILE, COMFYUI_FILE) if (folder / name).exists()]
    metrics = folder / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size:
        found.append(METRICS_FILE)
    if (folder / VALIDATION_DIR).is_dir():
        found.append(VALIDATION_DIR)
    return found


def _differences(stored: dict, current: dict) -> list[str]:
    """'flag: checkpoint X, now Y' for every identity setting that differs."""
    return [
        f"{key}: checkpoint {stored.get(key)!r}, now {current.get(key)!r}"
        for key in sorted(stored.keys() | current.keys())
        if stored.get(key) != current.get(key)
    ]


def _latest_of_run(output_dir: Path) -> Path | None:
    """Newest checkpoint in `output_dir` written by the run that owns the folder (its run.json), if any."""
    owner = read_run(output_dir)
    if owner is None:
        return None
    own = [c for c in checkpoints(output_dir) if (read_run(c) or {}).get("run_id") == owner["run_id"]]
    return own[-1] if own else None


def resume_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint --resume_from_checkpoint names: "latest" is the newest of the run that owns `output_dir` (None
    when it has none); UserError for a path that does not exist."""
    if resume_from_checkpoint == "latest":
        return _latest_of_run(Path(output_dir))
    try:
        return resolve_resume(output_dir, resume_from_checkpoint)
    except FileNotFoundError as error:
        raise UserError(str(error)) from error


def resume_recorded_flags(args: argparse.Namespace, given: set[str]) -> list[str]:
    """Set each flag of `args` not in `given` (the flags the user typed) from the record of the checkpoint
    --resume_from_checkpoint names, identity settings as recorded (paths resolved); returns the flags set."""
    checkpoint = (
        resume_checkpoint(args.output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    )
    record = read_run(checkpoint) if checkpoint is not None else None
    if record is None:
        return []
    recorded = {**record.get("flags", {}), **{k: v for k, v in record["identity"].items() if k in IDENTITY_FLAGS}}
    taken = [flag for flag in recorded if flag in vars(args) and flag not in given and flag not in NOT_RESUMED]
    for flag in taken:
        setattr(args, flag, recorded[flag])
    return taken


def start_run(args: argparse.Namespace, identity: dict, flags: dict | None = None) -> tuple[Path | None, dict]:
    """(checkpoint to resume or None, this run's record with `flags`); UserError before anything is touched when the
    folder holds another run's results or the checkpoint belongs to another run or a run with other settings."""
    output_dir = Path(args.output_dir)
    resume = resume_checkpoint(output_dir, args.resume_from_checkpoint)
    record = {"identity": identity, "flags": json.loads(json.dumps(flags or {}, default=str))}
    if resume is None:
        if found := earlier_results(output_dir):
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise UserError(
                f"--output_dir {output_dir} already holds the results of another run ({shown}); nothing was "
                "overwritten. Continue that run with --resume_from_checkpoint latest (it keeps its own settings), "
                "or write this one to a new --output_dir"
            )
        if args.resume_from_checkpoint == "latest":
            logger.info(f"no checkpoint in {output_dir}; starting from step 0", main_process_only=True)
        return None, {"run_id": uuid.uuid4().hex, **record}
    stored = read_run(resume)
    if stored is None:
        raise UserError(
            f"--resume_from_checkpoint {resume}: no run record ({RUN_FILE}), so nothing says which run and settings "
            "it belongs to; it is not resumed (start a new run in another --output_dir)"
        )
    if differences := _differences(stored["identity"], identity):
        raise UserError(
            f"{resume} belongs to a run with other settings ({'; '.join(differences)}): leave those flags out to "
            "take the run's own, or start a new run in another --output_dir"
        )
    check_loadable(resume)
    return resume, {"run_id": stored["run_id"], **record}


def write_run(output_dir: str | Path, run: dict) -> None:
    """Record the run that owns `output_dir` (main process, once the start checks passed)."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_FILE).write_text(json.dumps(run, indent=2))
