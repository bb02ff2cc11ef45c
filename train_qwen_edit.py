"""LoRA training for Qwen-Image-Edit on edit pairs of mixed resolutions, without buckets.

    accelerate launch train_qwen_edit.py --demo     # tiny random model + synthetic data under ./demo

    accelerate launch precompute_cache.py --model qwen_edit --pretrained_model_name_or_path Qwen/Qwen-Image-Edit \\
        --dataset ./pairs --cache_dir ./cache --multi_resolutions 512*512 768*768 1024*1024
    accelerate launch train_qwen_edit.py --pretrained_model_name_or_path Qwen/Qwen-Image-Edit --cache_dir ./cache \\
        --multi_resolutions 512*512 768*768 1024*1024 --output_dir ./qwen-edit-lora --train_batch_size 4 \\
        --group_by_length --gradient_checkpointing --mixed_precision bf16 --max_train_steps 2000

The control image conditions both the Qwen2.5-VL prompt embedding (the pipeline's template) and the VAE reference
tokens appended after the target; `common.qwen.mixed_forward` gives every sample its own image and text positions.
The model is `common/models/qwen_edit.py`; the loop is `common/training.py`.
"""

import argparse

from common.cli import parse_training_args
from common.demo import run
from common.errors import run_script
from common.models.qwen_edit import QWEN_EDIT

MODEL = QWEN_EDIT


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The shared trainer flags and the model's own (`EditModel.add_args`)."""
    return parse_training_args(MODEL, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    run_script(lambda: run(parse_args(), MODEL))
