"""bench.random_weights: full-size configs of the released models, random weights where a folder has none, real
weights where it has them, and a trainer script run through the launcher on CPU (tiny configs)."""

import json
import math

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file
from transformers import Qwen3ForCausalLM

from bench.random_weights import FULL_SIZE, main, random_weights, write_checkpoint, write_pairs
from common.lora import LORA_FILE
from common.models import get_model

# Parameters (billions) of the released checkpoints' models: FLUX.1 Kontext 11.9, T5-XXL encoder 4.76, Qwen-Image
# 20.43, Qwen2.5-VL-7B 8.29, FLUX.2 klein 4B's transformer 3.88, Qwen3-4B 4.02 (embedding tied to the LM head).
RELEASED_B = {
    ("flux_kontext", "transformer"): 11.90,
    ("flux_kontext", "text_encoder_2"): 4.76,
    ("qwen_edit_plus", "transformer"): 20.43,
    ("qwen_edit_plus", "text_encoder"): 8.29,
    ("flux2_klein", "transformer"): 3.88,
    ("flux2_klein", "text_encoder"): 4.02,
}


def test_full_size_configs_build_the_released_models(tmp_path):
    """Each big model of the written checkpoint, built on meta by its real class, has the released size."""
    for (model, component), billions in RELEASED_B.items():
        folder = tmp_path / model
        if not folder.exists():
            write_checkpoint(model, folder)
            assert not list(folder.glob("*/*.safetensors")), "no weight files"
        index = json.loads((folder / "model_index.json").read_text())
        library, name = index[component]
        cls = getattr(__import__(library), name)
        with init_empty_weights():
            if library == "diffusers":
                built = cls.from_config(cls.load_config(folder / component))
            else:
                built = cls(cls.config_class.from_pretrained(folder / component))
        if hasattr(built, "tie_weights"):
            built.tie_weights()  # as from_pretrained does (Qwen3-4B shares its embedding with the LM head)
        count = sum(p.numel() for p in built.parameters()) / 1e9
        assert math.isclose(count, billions, abs_tol=0.01), (model, component, count)
    assert set(FULL_SIZE) == {"flux_kontext", "qwen_edit_plus", "flux2_klein"}


def test_folders_without_weights_load_random_ones_folders_with_weights_their_own(tmp_path, tiny_checkpoint):
    folder = write_checkpoint("flux2_klein", tmp_path / "klein", full_size=False)
    with random_weights():
        transformer = FluxTransformer2DModel.from_pretrained(
            tiny_checkpoint("flux_kontext"), subfolder="transformer", torch_dtype=torch.bfloat16
        )
        saved = load_file(tiny_checkpoint("flux_kontext") / "transformer" / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(p, saved[n].bfloat16()) for n, p in transformer.named_parameters())
        encoder = Qwen3ForCausalLM.from_pretrained(folder / "text_encoder", dtype=torch.bfloat16)
        random = get_model("flux2_klein").transformer_class.from_pretrained(folder, subfolder="transformer")
    assert not encoder.training and not random.training, "from_pretrained returns eval-mode models"
    assert encoder.lm_head.weight is encoder.model.embed_tokens.weight, "tied weights stay tied"
    for model, dtype in ((encoder, torch.bfloat16), (random, torch.float32)):
        for name, param in model.named_parameters():
            assert param.device.type == "cpu" and param.dtype == dtype, name
            if param.ndim >= 2:
                bound = param[0].numel() ** -0.5
                assert param.abs().max() <= bound and param.float().std() > bound / 4, name
            else:
                assert torch.all(param == (1 if name.endswith("weight") else 0)), name
    with pytest.raises(OSError):  # outside the context, from_pretrained is the library's own again
        FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")


def test_the_launcher_runs_a_trainer_script_on_random_weights(tmp_path, monkeypatch, fresh_accelerate_state):
    """What gpu_check runs at full size, on CPU with tiny configs: 1 mixed step of 2 samples, validated."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    checkpoint = write_checkpoint("flux_kontext", tmp_path / "model", full_size=False)
    write_pairs(tmp_path / "data", references=1, sizes=((64, 64), (96, 64)))
    out = tmp_path / "out"
    flags = ["--pretrained_model_name_or_path", str(checkpoint), "--dataset", str(tmp_path / "data")]
    flags += ["--output_dir", str(out), "--multi_resolutions", "64*64", "96*96", "--train_batch_size", "2"]
    flags += ["--max_train_steps", "1", "--gradient_checkpointing", "--report_to", "none", "--validation_steps", "1"]
    flags += ["--validation_prompts", "make it red", "--validation_images", str(tmp_path / "data" / "000_control.png")]
    main(["train_flux_kontext.py", *flags, "--validation_inference_steps", "2"])
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["step"] == 1 and math.isfinite(record["loss"]) and record["padding_ratio"] > 0
    assert (out / LORA_FILE).is_file() and list((out / "validation").rglob("*.png"))
