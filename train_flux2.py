"""LoRA training for FLUX.2 [klein] and [dev] on edit pairs with 0..n references of mixed sizes, without buckets.

    accelerate launch train_flux2.py --demo     # tiny random [klein] + synthetic data under ./demo

    accelerate launch precompute_cache.py --model flux2_klein \\
        --pretrained_model_name_or_path black-forest-labs/FLUX.2-klein-base-4B --dataset ./pairs --cache_dir ./cache \\
        --multi_resolutions 512*512 768*768 1024*1024
    accelerate launch train_flux2.py --pretrained_model_name_or_path black-forest-labs/FLUX.2-klein-base-4B \\
        --cache_dir ./cache --multi_resolutions 512*512 768*768 1024*1024 --output_dir ./klein-lora \\
        --train_batch_size 4 --group_by_length --gradient_checkpointing --mixed_precision bf16

    [dev]: the same with `--model flux2_dev` and black-forest-labs/FLUX.2-dev (`--guidance_scale`, default 4.0).

The checkpoint's `model_index.json` names its pipeline, which picks the model: Flux2KleinPipeline -> [klein],
Flux2Pipeline -> [dev]. The models are `common/models/flux2.py`; the loop is `common/training.py`.
"""

import argparse

from common.cli import checkpoint_model, known_training_args, parse_training_args
from common.demo import run
from common.errors import run_script
from common.models import EditModel
from common.models.flux2 import FLUX2_DEV, FLUX2_KLEIN

MODELS = (FLUX2_KLEIN, FLUX2_DEV)


def model_for(argv: list[str] | None = None) -> EditModel:
    """The FLUX.2 model of the checkpoint the flags name, by its pipeline class; [klein] for a --demo without one."""
    known = known_training_args(argv)  # the checkpoint may come from the record of the run resumed
    if known.pretrained_model_name_or_path is None:
        return FLUX2_KLEIN
    return checkpoint_model(known.pretrained_model_name_or_path, known.revision, MODELS, "train_flux2.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The shared trainer flags and the checkpoint's model's own (`EditModel.add_args`)."""
    return parse_training_args(model_for(argv), __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    run_script(lambda: run(parse_args(), model_for()))
