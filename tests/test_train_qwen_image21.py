"""train_qwen_image21.py end to end on the tiny kit, with 0, 1 and 2 condition images per sample in one batch.

The harness's cached run exports ComfyUI keys, which Qwen-Image 2.1 refuses (no known key layout), so this class
runs the same checks on its own cached run without that flag."""

import pytest
import trainer_harness as h

import train_qwen_image21
from common.errors import UserError
from common.lora import COMFYUI_FILE, LORA_FILE
from common.run_guard import VALIDATION_DIR


class TestQwenImage21:
    MODEL = KIT = "qwen_image21"

    @pytest.fixture(scope="class")
    def cached_run(self, kit):
        """A short cached run with control dropout, validated at its last step: (output folder, LoRA file)."""
        out = kit["root"] / "cached"
        validation = [
            "--validation_steps", "4", "--validation_prompts", h.VALIDATION_PROMPT, "--validation_images",
            str(kit["root"] / "data" / "001_control_0.png") + "," + str(kit["root"] / "data" / "001_control_1.png"),
            "--validation_inference_steps", "2", "--control_dropout", "0.5",
        ]  # fmt: skip
        argv = [*kit["flags"], "--cache_dir", str(kit["cache"]), *h.train_flags(out, *validation)]
        return out, h.train_inprocess(self.MODEL, argv)

    def test_cached_mixed_run_end_to_end(self, kit, cached_run):
        """Mixed batches train; the LoRA loads into the stock pipeline with load_lora_weights and changes its
        transformer; the checkpoint holds the folded LoRA; the validation edit (2 condition images) is written."""
        out, lora_file = cached_run
        assert lora_file == out / LORA_FILE and not (out / COMFYUI_FILE).exists()
        h.check_run(out, steps=4, mixed=True)
        h.check_lora_changes_pipeline_output(self.MODEL, kit["checkpoint"], out)
        h.check_folded_lora(out / LORA_FILE, out / "checkpoint-4")
        assert (out / VALIDATION_DIR / "step-4" / "0.png").is_file()

    def test_uncached_run_equals_cached_run(self, kit, cached_run, tmp_path):
        argv = [*kit["flags"], *h.train_flags(tmp_path, "--control_dropout", "0.5")]
        cached, uncached = h.lora(cached_run[1]), h.lora(h.train_inprocess(self.MODEL, argv))
        assert cached.keys() == uncached.keys()
        assert all(h.torch.equal(cached[k], uncached[k]) for k in cached)

    test_bf16_mixed_precision_run = h.TrainerCases.test_bf16_mixed_precision_run
    test_model_card_holds_the_run_and_its_snippet_runs = (
        h.TrainerCases.test_model_card_holds_the_run_and_its_snippet_runs
    )
    test_resumed_from_a_checkpoint_equals_the_uninterrupted_run = (
        h.TrainerCases.test_resumed_from_a_checkpoint_equals_the_uninterrupted_run
    )


def test_comfyui_export_is_refused(tiny_checkpoint):
    argv = ["--pretrained_model_name_or_path", str(tiny_checkpoint("qwen_image21")), "--dataset", "d"]
    assert not train_qwen_image21.parse_args(argv).export_comfyui
    with pytest.raises(UserError, match="--export_comfyui: ComfyUI's LoRA key names for Qwen-Image 2.1"):
        train_qwen_image21.parse_args([*argv, "--export_comfyui"])
