"""`--push_to_hub`, as in the diffusers examples: the repository is created (or found) before training, so a missing
network or token stops the run at once with one line, and the shareable outputs are uploaded at the end.

Uploaded: the LoRA (and its ComfyUI copy), the model card, the training curves and the last validation images;
checkpoints, metrics and configuration files stay local.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from huggingface_hub import create_repo, upload_folder
from huggingface_hub.constants import is_offline_mode

from common.errors import UserError
from common.lora import COMFYUI_FILE, LORA_FILE
from common.model_card import CARD_FILE, latest_validation
from common.plots import CURVES_FILE


class HubUnavailable(UserError):
    """The Hub cannot be reached or written to; the message is one line for the user."""


def create_hub_repo(args: argparse.Namespace) -> str:
    """Create (or find) the repository `--hub_model_id` (default: the output folder's name); returns its full id."""
    name = args.hub_model_id or Path(args.output_dir).resolve().name
    if is_offline_mode():
        raise HubUnavailable(f"--push_to_hub: HF_HUB_OFFLINE is set, so {name!r} cannot be created or uploaded to")
    try:
        return create_repo(repo_id=name, exist_ok=True, token=args.hub_token).repo_id
    except Exception as error:  # any failure here means nothing could be pushed: say why in one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise HubUnavailable(
            f"--push_to_hub: cannot create or reach the Hub repository {name!r} ({type(error).__name__}: {reason}); "
            "check the network, the token (`hf auth login` or --hub_token) and --hub_model_id"
        ) from error


def shared_files(output_dir: str | os.PathLike) -> list[str]:
    """Paths, relative to `output_dir`, of the outputs a push uploads (those that exist)."""
    output_dir = Path(output_dir)
    files = [name for name in (LORA_FILE, COMFYUI_FILE, CARD_FILE, CURVES_FILE) if (output_dir / name).is_file()]
    validation = latest_validation(output_dir)
    if validation is not None:
        files += [image.relative_to(output_dir).as_posix() for image in validation[1]]
    return files


def push_outputs(output_dir: str | os.PathLike, repo_id: str, token: str | None) -> str:
    """Upload `shared_files` in one commit; returns the commit's URL."""
    files = shared_files(output_dir)
    try:
        commit = upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            allow_patterns=files,
            commit_message="LoRA, model card and images",
            token=token,
        )
    except Exception as error:
        raise HubUnavailable(
            f"--push_to_hub: uploading to {repo_id!r} failed ({type(error).__name__}); the outputs are in "
            f"{output_dir}: upload them later with `hf upload {repo_id} {output_dir}`"
        ) from error
    return commit.commit_url
