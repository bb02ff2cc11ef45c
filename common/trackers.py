"""The run's trackers: W&B credentials checked before anything loads, and W&B's files kept under --output_dir."""

from __future__ import annotations

import os
from pathlib import Path

from common.errors import UserError

# wandb's modes that need no credentials (WANDB_MODE or `wandb offline`'s settings file).
WANDB_LOCAL_MODES = ("offline", "dryrun", "disabled")


def check_wandb_login(report_to: str) -> None:
    """With --report_to wandb, a UserError giving the ways out unless W&B finds credentials (WANDB_API_KEY, netrc,
    its settings) or runs without them (WANDB_MODE offline/disabled); W&B would otherwise stop the run after the
    weights have loaded."""
    if report_to != "wandb":
        return
    from wandb.errors import AuthenticationError
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    settings = wandb_setup.singleton().settings
    if settings.mode in WANDB_LOCAL_MODES:
        return
    try:
        auth = wbauth.authenticate_session(
            host=settings.base_url, source="--report_to wandb", prompt=False, update_session=False
        )
    except AuthenticationError as error:
        raise UserError(f"--report_to wandb: {error}") from error
    if auth is None:
        raise UserError(
            "--report_to wandb (the default): no W&B API key is configured; run `wandb login`, or set "
            "WANDB_MODE=offline to log locally, or pass --report_to none (or tensorboard)"
        )


def tracker_init_kwargs(output_dir: str | Path) -> dict[str, dict]:
    """`init_trackers` keyword arguments that put W&B's run files under `output_dir`, not the current folder (a
    WANDB_DIR the user set still wins). Always passed explicitly: W&B reads its environment once per process, when
    its session starts (the login check may have started it), so a WANDB_DIR set later would be ignored."""
    return {"wandb": {"dir": os.environ.get("WANDB_DIR") or str(output_dir)}}
