"""LoRA training for FLUX.1 Kontext on edit pairs of mixed resolutions, without buckets.

    accelerate launch train_flux_kontext.py --demo     # tiny random model + synthetic data under ./demo

    accelerate launch precompute_cache.py --model flux_kontext \\
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-Kontext-dev --dataset ./pairs --cache_dir ./cache \\
        --multi_resolutions 512*512 768*768 1024*1024
    accelerate launch train_flux_kontext.py --pretrained_model_name_or_path black-forest-labs/FLUX.1-Kontext-dev \\
        --cache_dir ./cache --multi_resolutions 512*512 768*768 1024*1024 --output_dir ./kontext-lora \\
        --train_batch_size 4 --group_by_length --gradient_checkpointing --mixed_precision bf16 --max_train_steps 2000

The model (sizes, encoding, token layout, prediction, LoRA targets, export) is `common/models/flux_kontext.py`;
the loop is `common/training.py`.
"""

import argparse

from common.cli import parse_training_args
from common.demo import run
from common.errors import run_script
from common.models.flux_kontext import FLUX_KONTEXT

MODEL = FLUX_KONTEXT


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The shared trainer flags and the model's own (`EditModel.add_args`)."""
    return parse_training_args(MODEL, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    run_script(lambda: run(parse_args(), MODEL))
