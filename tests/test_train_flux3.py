"""train_flux3.py end to end on the tiny kit: a cached run whose batches mix 0, 1 and 2 references, the uncached run
equal to it, resumed from a checkpoint, offloaded, fp8 and bf16 runs, the LoRA loaded by the stock modular pipeline,
its model card's snippet run, its ComfyUI export read back by diffusers' own FLUX.3 (BFL layout) LoRA converter."""

import torch
import trainer_harness as h
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_flux3_lora_to_diffusers

from common.cache import load_cache
from common.lora import COMFYUI_FILE, LORA_FILE
from common.sampler import RandomBatchSampler


class TestFlux3Klein:
    MODEL = KIT = "flux3_klein"

    test_cached_mixed_run_end_to_end = h.TrainerCases.test_cached_mixed_run_end_to_end
    test_model_card_holds_the_run_and_its_snippet_runs = (
        h.TrainerCases.test_model_card_holds_the_run_and_its_snippet_runs
    )
    test_uncached_run_equals_cached_run = h.TrainerCases.test_uncached_run_equals_cached_run
    test_resumed_from_a_checkpoint_equals_the_uninterrupted_run = (
        h.TrainerCases.test_resumed_from_a_checkpoint_equals_the_uninterrupted_run
    )
    test_offloaded_blocks_train_the_same_lora = h.TrainerCases.test_offloaded_blocks_train_the_same_lora
    test_fp8_base_trains_a_lora_for_the_stock_pipeline = (
        h.TrainerCases.test_fp8_base_trains_a_lora_for_the_stock_pipeline
    )
    test_bf16_mixed_precision_run = h.TrainerCases.test_bf16_mixed_precision_run

    def test_batches_mix_reference_counts(self, kit, cached_run):
        """The demo rows hold 1, 2, 0 references in turn; the run's batches (seed 7, 3 samples) mix samples without
        references (no reference stream) with samples with one or two."""
        counts = [len(row["img_shapes"]) - 1 for row in load_cache(kit["cache"])]
        assert counts == [(1, 2, 0)[i % 3] for i in range(len(counts))]
        batches = [[counts[i] for i in batch] for batch in RandomBatchSampler(counts, 3, seed=7).global_batches()]
        assert any(0 in batch and max(batch) > 0 for batch in batches)

    def test_comfyui_export_reads_back_as_the_diffusers_lora(self, cached_run):
        out, _ = cached_run
        exported = h.lora(out / COMFYUI_FILE)
        assert all(k.startswith("diffusion_model.") for k in exported)
        assert any(".content_mode_blocks.image_cond." in k and ".q_proj." in k for k in exported)
        converted, saved = _convert_non_diffusers_flux3_lora_to_diffusers(exported), h.lora(out / LORA_FILE)
        assert converted.keys() == saved.keys()
        assert all(torch.equal(converted[k], saved[k]) for k in saved)
