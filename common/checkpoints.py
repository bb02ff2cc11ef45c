"""Training checkpoints: `accelerator.save_state` into `checkpoint-<step>`, written atomically and rotated.

A checkpoint is written to a hidden temporary folder and renamed once every process has finished writing, so
`--resume_from_checkpoint latest` never picks a checkpoint cut short by a crash or SIGKILL.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


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


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | os.PathLike, step: int, total_limit: int | None
) -> Path:
    """Save the full training state after `step` (every process calls this); keep at most `total_limit` of them."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
