"""train_flux2.py end to end on the tiny kits: [klein] through every trainer case, with 0, 1, 2 and 3 references
per sample in one batch; [dev] (Mistral text encoder, guidance embedding) through cached and uncached runs."""

import pytest
import trainer_harness as h

import train_flux2
from common.cache import load_cache
from common.sampler import RandomBatchSampler


class TestFlux2Klein(h.TrainerCases, h.ProcessCases):
    MODEL = KIT = "flux2_klein"

    def test_batches_mix_reference_counts(self, kit, cached_run):
        """The demo rows hold 1, 2, 3, 0 references in turn; the run's batches (seed 7, 3 samples) train all of them,
        batches mixing samples without and with references."""
        rows = load_cache(kit["cache"])
        counts = [len(row["img_shapes"]) - 1 for row in rows]
        assert counts == [(1, 2, 3, 0)[i % 4] for i in range(len(rows))]
        batches = [[counts[i] for i in batch] for batch in RandomBatchSampler(counts, 3, seed=7).global_batches()]
        assert {c for batch in batches for c in batch} == {0, 1, 2, 3}
        assert any(0 in batch and max(batch) > 0 for batch in batches)
        h.check_run(cached_run[0], steps=4, mixed=True)

    def test_other_training_options_run(self, kit, tmp_path):
        options = [
            "--group_by_length", "--gradient_checkpointing", "--caption_dropout", "0.5", "--control_dropout", "0.5",
            "--attention_backend", "masked", "--mask_loss_weight", "2.0", "--timestep_sampling", "logit_normal",
        ]  # fmt: skip
        h.train_inprocess(
            self.MODEL, [*kit["flags"], "--cache_dir", str(kit["cache"]), *h.train_flags(tmp_path), *options]
        )
        h.check_run(tmp_path, steps=4, mixed=True)


class TestFlux2Dev:
    MODEL = KIT = "flux2_dev"

    test_cached_mixed_run_end_to_end = h.TrainerCases.test_cached_mixed_run_end_to_end
    test_uncached_run_equals_cached_run = h.TrainerCases.test_uncached_run_equals_cached_run


def test_the_checkpoint_names_the_model(tiny_checkpoint):
    for name in ("flux2_klein", "flux2_dev"):
        argv = ["--pretrained_model_name_or_path", str(tiny_checkpoint(name)), "--dataset", "d"]
        assert train_flux2.model_for(argv).name == name
        assert ("guidance_scale" in vars(train_flux2.parse_args(argv))) == (name == "flux2_dev")
    assert train_flux2.model_for(["--demo"]).name == "flux2_klein"
    kontext = str(tiny_checkpoint("flux_kontext"))
    with pytest.raises(ValueError, match=r"--pretrained_model_name_or_path .* names 'FluxKontextPipeline'"):
        train_flux2.model_for(["--pretrained_model_name_or_path", kontext])
