"""Shared mechanics of the image-edit LoRA trainers: mixed-resolution batches without bucketing."""
