"""train_qwen_edit.py end to end on the tiny kit (cached/uncached, resume, 2 processes, LoRA, NaN stop)."""

import trainer_harness as h


class TestQwenEdit(h.TrainerCases, h.EqualSizeCases):
    MODEL = KIT = "qwen_edit"
