"""Training checkpoints: `accelerator.save_state` into `checkpoint-<step>`, written atomically and rotated.

A checkpoint is written to a hidden temporary folder and renamed once every process has finished writing, so
`--resume_from_checkpoint latest` never picks a checkpoint cut short by a crash or SIGKILL. Ctrl-C removes the
temporary folder at once; one a SIGKILL left is removed when the next run into the folder starts.

Loading a checkpoint never unpickles: the LoRA is safetensors (the trainer's load hook), the loop's own state (step,
sampler position, LR schedule) is JSON, and accelerate's optimizer and RNG files are read with `weights_only=True`,
which reconstructs tensors and plain containers only. Nothing is registered with `register_for_checkpointing`,
whose `custom_checkpoint_*.pkl` files accelerate loads with `weights_only=False`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object

from common.errors import UserError

_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
RUN_FILE = "run.json"  # the run record of common.run_guard, also kept in each checkpoint
STATE_FILE = "training_state.json"  # the loop's own state (step, sampler position, LR schedule)
PICKLED_STATE = re.compile(r"custom_checkpoint_\d+\.pkl")  # what `register_for_checkpointing` writes
logger = get_logger(__name__)


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints in `output_dir`, oldest step first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def step_of(checkpoint: str | os.PathLike) -> int:
    """The optimizer step a checkpoint folder was written after."""
    match = _CHECKPOINT_RE.fullmatch(Path(checkpoint).name)
    if match is None:
        raise ValueError(f"{checkpoint} is not a checkpoint-<step> folder")
    return int(match.group(1))


def resolve_resume(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names: None, "latest" (None if there is none yet) or a path."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        path = Path(output_dir) / resume_from_checkpoint
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint}: no such checkpoint folder")
    return path


def remove_partial_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the `.checkpoint-N.tmp` folders a killed run left in `output_dir` (never resumable: unfinished);
    returns them."""
    folder = Path(output_dir)
    partial = sorted(folder.glob(".checkpoint-*.tmp")) if folder.is_dir() else []
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    total_limit: int | None,
    run: dict | None = None,
    state: dict | None = None,
) -> Path | None:
    """Save the full training state after `step` (every process calls this); keep at most `total_limit` of them.

    `run` (the run record of `common.run_guard`) is stored in the checkpoint as run.json, `state` (plain values: the
    loop's position and LR schedule) as training_state.json. A write that fails on any process (disk full,
    permission: OSError, or torch's RuntimeError from a failed write) leaves the earlier checkpoints as they were,
    removes the partial one, logs why and returns None, so training goes on.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    error = None
    try:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process and run is not None:
            (tmp / RUN_FILE).write_text(json.dumps(run, indent=2))
        if accelerator.is_main_process and state is not None:
            (tmp / STATE_FILE).write_text(json.dumps(state))
    except (OSError, RuntimeError) as caught:
        error = caught
    except KeyboardInterrupt:  # Ctrl-C stops the run (common.training): leave no partial checkpoint behind
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    errors = [e for e in gather_object([None if error is None else f"{type(error).__name__}: {error}"]) if e]
    if not errors and accelerator.is_main_process:
        try:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as caught:
            errors.append(f"{type(caught).__name__}: {caught}")
    if errors:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = [p.name for p in checkpoints(output_dir)]
            logger.warning(
                f"could not write checkpoint-{step} ({errors[0]}); "
                f"{'earlier checkpoints ' + ', '.join(kept) + ' are' if kept else 'no earlier checkpoint is'} "
                "untouched; training continues",
                main_process_only=True,
            )
        accelerator.wait_for_everyone()
        return None
    if accelerator.is_main_process and total_limit is not None:
        for old in checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def check_loadable(checkpoint: str | os.PathLike) -> None:
    """UserError for a checkpoint holding pickled objects (`register_for_checkpointing`'s files) or no
    training_state.json: checked before anything loads."""
    folder = Path(checkpoint)
    if pickled := sorted(p.name for p in folder.iterdir() if PICKLED_STATE.fullmatch(p.name)):
        raise UserError(
            f"--resume_from_checkpoint {folder}: it holds pickled state ({', '.join(pickled)}), which could run code "
            "when loaded; this trainer never writes or loads such files (a checkpoint of an earlier version or of "
            "someone else). Start a new run, or resume one of this version's checkpoints"
        )
    if not (folder / STATE_FILE).is_file():
        raise UserError(f"--resume_from_checkpoint {folder}: no {STATE_FILE}; it is not a checkpoint of this trainer")


def load_checkpoint(accelerator: Accelerator, checkpoint: str | os.PathLike) -> dict:
    """Restore the LoRA (load hook), optimizer and RNG states of `checkpoint` without unpickling (module doc); returns
    its training_state.json. UserError for a checkpoint `check_loadable` refuses or a state file holding objects."""
    folder = Path(checkpoint)
    check_loadable(folder)
    try:
        accelerator.load_state(str(folder), load_kwargs={"weights_only": True})
    except pickle.UnpicklingError as error:
        raise UserError(
            f"--resume_from_checkpoint {folder}: a state file holds objects other than tensors and plain values, so it "
            f"is not loaded ({' '.join(str(error).split())[:200]})"
        ) from error
    return json.loads((folder / STATE_FILE).read_text())
