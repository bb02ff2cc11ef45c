"""LoRA training for Qwen-Image-Edit on edit pairs of mixed resolutions, without buckets.

    accelerate launch train_qwen_edit.py --demo     # tiny random model + synthetic data under ./demo

    accelerate launch precompute_cache.py --model qwen_edit --pretrained_model_name_or_path Qwen/Qwen-Image-Edit \\
        --dataset ./pairs --cache_dir ./cache --multi_resolutions 512*512 768*768 1024*1024
    accelerate launch train_qwen_edit.py --pretrained_model_name_or_path Qwen/Qwen-Image-Edit --cache_dir ./cache \\
        --multi_resolutions 512*512 768*768 1024*1024 --output_dir ./qwen-edit-lora --train_batch_size 4 \\
        --group_by_length --gradient_checkpointing --mixed_precision bf16 --max_train_steps 2000

The control image conditions both the Qwen2.5-VL prompt embedding (the pipeline's template) and the VAE reference
tokens appended after the target; `common.qwen.mixed_forward` gives every sample its own image and text positions.
"""

from diffusers import QwenImageEditPipeline

from common.demo import run
from common.errors import run_script
from common.qwen_edit import parse_args, recipe

MODEL = "qwen_edit"

RECIPE = recipe(MODEL, QwenImageEditPipeline)

if __name__ == "__main__":
    run_script(lambda: run(parse_args(__doc__.split("\n\n")[0]), RECIPE))
