"""LoRA training for Qwen-Image 2.1 edits: 0..n condition images per sample, seen by its Qwen3-VL prompt encoder.

    accelerate launch train_qwen_image21.py --demo     # tiny random model + synthetic data under ./demo

    accelerate launch precompute_cache.py --model qwen_image21 \\
        --pretrained_model_name_or_path Qwen/Qwen-Image-2.1 --dataset ./pairs --cache_dir ./cache \\
        --multi_resolutions 512*512 768*768 1024*1024
    accelerate launch train_qwen_image21.py --pretrained_model_name_or_path Qwen/Qwen-Image-2.1 \\
        --cache_dir ./cache --multi_resolutions 512*512 768*768 1024*1024 --output_dir ./qwen21-lora \\
        --train_batch_size 4 --group_by_length --gradient_checkpointing --mixed_precision bf16

Each sample is one block-causal joint sequence (prompt with its condition images at their VL slots, then the
target); samples of different layouts share a batch. The model is `common/models/qwen_image21.py`, its mixed
forward `common/qwen21.py`; the loop is `common/training.py`.
"""

import argparse

from common.cli import parse_training_args
from common.demo import run
from common.errors import run_script
from common.models.qwen_image21 import QWEN_IMAGE21

MODEL = QWEN_IMAGE21


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The shared trainer flags and the model's own (`EditModel.add_args`)."""
    return parse_training_args(MODEL, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    run_script(lambda: run(parse_args(), MODEL))
