"""train_flux_kontext.py end to end on the tiny kit (cached/uncached, resume after SIGKILL, LoRA, NaN stop)."""

import math

import trainer_harness as h


class TestKontext(h.TrainerCases, h.EqualSizeCases):
    MODEL = KIT = "flux_kontext"

    def test_resume_with_fp8_and_offloaded_blocks_is_bitwise_equal(self, kit, tmp_path):
        """The suite's one real SIGKILL: killed after its first checkpoint, the run resumes to the same LoRA."""
        h.check_resume_after_sigkill(self.MODEL, kit, tmp_path, "--base_precision", "fp8", "--offload_blocks")

    def test_accumulation_equals_a_larger_batch(self, kit, tmp_path):
        argv = [*kit["flags"], "--cache_dir", str(kit["cache"])]
        h.train_inprocess(self.MODEL, [*h.train_flags(tmp_path / "big"), *argv, "--train_batch_size", "4"])
        accumulated = ["--train_batch_size", "2", "--gradient_accumulation_steps", "2"]
        h.train_inprocess(self.MODEL, [*h.train_flags(tmp_path / "acc"), *argv, *accumulated])
        h.check_same_lora(tmp_path / "big" / h.LORA_FILE, tmp_path / "acc" / h.LORA_FILE)
        big, acc = h.metrics(tmp_path / "big"), h.metrics(tmp_path / "acc")
        assert all(abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"] for a, b in zip(acc, big, strict=True))

    def test_other_training_options_run(self, kit, tmp_path):
        options = [
            "--group_by_length", "--gradient_checkpointing", "--timestep_sampling", "logit_normal",
            "--caption_dropout", "0.5", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2",
            "--checkpoints_total_limit", "1", "--attention_backend", "masked", "--guidance_scale", "2.5",
        ]  # fmt: skip
        h.train_inprocess(
            self.MODEL, [*kit["flags"], "--cache_dir", str(kit["cache"]), *h.train_flags(tmp_path), *options]
        )
        records = h.metrics(tmp_path)
        assert [r["lr"] for r in records[:2]] == [5e-4, 1e-3]  # linear warm-up over 2 steps, then cosine decay
        assert records[3]["lr"] < records[2]["lr"]
        assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-4"]

    def test_token_budget_batches_with_grouping_and_accumulation(self, kit, tmp_path):
        """--max_tokens_per_batch 700: each micro-batch holds at most 700 real tokens (tiny samples: 160 to 320 with
        text), so a step of 2 accumulated micro-batches at most 1,400, and more than one micro-batch's worth."""
        budget = ["--max_tokens_per_batch", "700", "--group_by_length", "--gradient_accumulation_steps", "2"]
        h.train_inprocess(
            self.MODEL, [*kit["flags"], "--cache_dir", str(kit["cache"]), *h.train_flags(tmp_path), *budget]
        )
        records = h.metrics(tmp_path)
        assert [r["step"] for r in records] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in records)
        assert all(700 < r["tokens"] <= 1400 for r in records), [r["tokens"] for r in records]
