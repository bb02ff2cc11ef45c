"""train_qwen_edit_plus.py end to end on the tiny kit, with 0, 1 and 2 references per sample in one batch,
for a 2509-style checkpoint and a 2511-style (`zero_cond_t`) one (2 processes: trainer_harness.ProcessCases)."""

import trainer_harness as h


class TestQwenEditPlus(h.TrainerCases):
    MODEL = KIT = "qwen_edit_plus"


class TestQwenEdit2511(h.TrainerCases):
    MODEL, KIT = "qwen_edit_plus", "qwen_edit_2511"
