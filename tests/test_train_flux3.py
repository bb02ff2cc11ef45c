"""train_flux3.py end to end on the tiny kit: a cached run with 0, 1 and 2 references per sample in one batch, the
uncached run equal to it, the LoRA loaded by the stock modular pipeline."""

import trainer_harness as h


class TestFlux3Klein:
    MODEL = KIT = "flux3_klein"

    test_cached_mixed_run_end_to_end = h.TrainerCases.test_cached_mixed_run_end_to_end
    test_uncached_run_equals_cached_run = h.TrainerCases.test_uncached_run_equals_cached_run
