"""train_qwen_edit.py end to end on the tiny kit (cached/uncached, resume, LoRA, NaN stop, equal sizes); 2 processes
run for FLUX.2 [klein] (trainer_harness.ProcessCases)."""

import trainer_harness as h


class TestQwenEdit(h.TrainerCases, h.EqualSizeCases):
    MODEL = KIT = "qwen_edit"
