"""common.hub: --push_to_hub stops before anything loads when the Hub is unreachable; what a push uploads."""

import argparse
import subprocess
import sys

import huggingface_hub
import pytest
from PIL import Image
from trainer_harness import ENV, ROOT

from common.hub import HubUnavailable, create_hub_repo, shared_files


def test_push_to_hub_offline_fails_in_one_line_before_training(tmp_path):
    out = tmp_path / "out"
    # Model (a hub name, so the flag check lets it pass) and cache do not exist: had anything been loaded first, the
    # error would name them instead.
    argv = [
        "--pretrained_model_name_or_path", "nobody/no-model", "--cache_dir", str(tmp_path / "no-cache"),
        "--output_dir", str(out), "--report_to", "none", "--push_to_hub", "--hub_model_id", "me/lora",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_qwen_edit.py"), *argv],
        cwd=tmp_path,
        env={**ENV, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == "error: --push_to_hub: HF_HUB_OFFLINE is set, so 'me/lora' cannot be created or uploaded to"
    assert not out.exists(), "no output (config, metrics, checkpoint) may be written before the Hub check"


def test_unreachable_hub_is_one_line_naming_the_repo_and_cause(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", "http://127.0.0.1:9")  # port 9: refused
    args = argparse.Namespace(hub_model_id=None, output_dir=str(tmp_path / "my-lora"), hub_token=None)
    with pytest.raises(HubUnavailable) as error:
        create_hub_repo(args)
    message = str(error.value)
    assert "\n" not in message and message.startswith("--push_to_hub: cannot create or reach the Hub repository")
    assert "'my-lora'" in message and "ConnectError" in message


def test_a_push_uploads_the_lora_card_and_images_not_checkpoints(tmp_path):
    names = [
        "pytorch_lora_weights.safetensors", "pytorch_lora_weights_comfyui.safetensors", "README.md",
        "training_curves.png", "metrics.jsonl", "training_config.json",
        "checkpoint-2/pytorch_lora_weights.safetensors", "checkpoint-2/training_curves.png",
        "validation/step-2/0.png", "validation/step-4/0.png", "validation/step-4/1.png",
    ]  # fmt: skip
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".png"):
            Image.new("RGB", (8, 8)).save(tmp_path / name)
        else:
            (tmp_path / name).write_text("x")
    assert shared_files(tmp_path) == [
        "pytorch_lora_weights.safetensors", "pytorch_lora_weights_comfyui.safetensors", "README.md",
        "training_curves.png", "validation/step-4/0.png", "validation/step-4/1.png",
    ]  # fmt: skip
