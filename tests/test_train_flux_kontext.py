"""train_flux_kontext.py end to end on the tiny kit (cached/uncached, resume, 2 processes, LoRA, NaN stop)."""

import trainer_harness as h


class TestKontext(h.TrainerCases, h.EqualSizeCases):
    MODEL = KIT = "flux_kontext"
