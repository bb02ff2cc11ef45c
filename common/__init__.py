"""Shared mechanics of the image-edit LoRA trainers: mixed-resolution batches without bucketing."""

from common.errors import drop_irrelevant_library_warnings

drop_irrelevant_library_warnings()  # before any script or module of ours imports peft or diffusers
