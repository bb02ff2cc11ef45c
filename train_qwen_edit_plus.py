"""LoRA training for Qwen-Image-Edit-Plus (2509; also 2511-style `zero_cond_t` checkpoints), several references.

    accelerate launch train_qwen_edit_plus.py --demo     # tiny random model + synthetic data under ./demo

    accelerate launch precompute_cache.py --model qwen_edit_plus \\
        --pretrained_model_name_or_path Qwen/Qwen-Image-Edit-2509 --dataset ./pairs --cache_dir ./cache \\
        --multi_resolutions 512*512 768*768 1024*1024
    accelerate launch train_qwen_edit_plus.py --pretrained_model_name_or_path Qwen/Qwen-Image-Edit-2509 \\
        --cache_dir ./cache --multi_resolutions 512*512 768*768 1024*1024 --output_dir ./qwen-plus-lora \\
        --train_batch_size 4 --group_by_length --gradient_checkpointing --mixed_precision bf16

What differs from Qwen-Image-Edit is the pipeline: 0 to n control images per sample (the count may differ inside
a batch), each one a "Picture k:" entry of the prompt at the condition size and a reference at the VAE size.
The model is `common/models/qwen_edit.py`; the loop is `common/training.py`.
"""

import argparse

from common.cli import parse_training_args
from common.demo import run
from common.errors import run_script
from common.models.qwen_edit import QWEN_EDIT_PLUS

MODEL = QWEN_EDIT_PLUS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The shared trainer flags and the model's own (`EditModel.add_args`)."""
    return parse_training_args(MODEL, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    run_script(lambda: run(parse_args(), MODEL))
