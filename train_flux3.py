"""LoRA training for FLUX.3 [klein] on edit pairs with 0..n references of mixed sizes, without buckets.

    accelerate launch train_flux3.py --demo     # tiny random [klein] + synthetic data under ./demo

    accelerate launch precompute_cache.py --model flux3_klein \\
        --pretrained_model_name_or_path black-forest-labs/flux-3-image-klein-base --dataset ./pairs \\
        --cache_dir ./cache --multi_resolutions 512*512 768*768 1024*1024
    accelerate launch train_flux3.py --pretrained_model_name_or_path black-forest-labs/flux-3-image-klein-base \\
        --cache_dir ./cache --multi_resolutions 512*512 768*768 1024*1024 --output_dir ./flux3-lora \\
        --train_batch_size 4 --group_by_length --gradient_checkpointing --mixed_precision bf16

Train the undistilled base; the step-distilled checkpoint (a flow map) needs a target timestep this trainer does not
feed. Text, target and references are separate streams of the transformer; `common.flux3` pads each on its own and
gives every sample its own positions. The model is `common/models/flux3.py`; the loop is `common/training.py`.
"""

import argparse

from common.cli import parse_training_args
from common.demo import run
from common.errors import run_script
from common.models.flux3 import FLUX3_KLEIN

MODEL = FLUX3_KLEIN


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The shared trainer flags and the model's own (`EditModel.add_args`)."""
    return parse_training_args(MODEL, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    run_script(lambda: run(parse_args(), MODEL))
