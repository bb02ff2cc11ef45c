"""The tiny checkpoints load into the stock diffusers pipelines offline, run, and are deterministic."""

import filecmp
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from PIL import Image

from common.flux2 import text_ids
from common.models import get_model
from common.tiny import MODELS, tiny_transformer, tiny_transformer_config, write_tiny

REPO = pathlib.Path(__file__).resolve().parents[1]


def _image(width: int, height: int) -> Image.Image:
    """A deterministic RGB gradient image."""
    pixels = np.arange(width * height * 3, dtype=np.int64).reshape(height, width, 3) % 256
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """Each tiny checkpoint, written once for the module."""
    root = tmp_path_factory.mktemp("tiny")
    return {model: write_tiny(model, root / model) for model in MODELS}


@pytest.mark.parametrize("model", MODELS)
def test_stock_pipeline_runs(model: str, checkpoints: dict[str, pathlib.Path]) -> None:
    pipe = get_model(model).load_pipeline(str(checkpoints[model]))
    kwargs = {
        "prompt": "Make the sky blue",
        "height": 64,
        "width": 96,
        "num_inference_steps": 2,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(0),
    }
    if model == "flux_kontext":
        # Without these Kontext resizes input and output to ~1024x1024 (fine, but slower).
        out = pipe(image=_image(64, 48), max_area=64 * 96, _auto_resize=False, **kwargs)
    elif model == "qwen_edit":
        out = pipe(image=_image(64, 48), true_cfg_scale=1.0, **kwargs)
    elif model.startswith("flux2"):
        # The stock FLUX.2 pipelines refuse references under 64 px a side; the tiny klein is a "base" one (CFG).
        assert pipe.transformer.config.guidance_embeds == (model == "flux2_dev")
        out = pipe(image=[_image(96, 64), _image(64, 128)], **kwargs)
        embeds, ids = pipe.encode_prompt("Make the sky blue")
        assert embeds.shape == (1, 512, pipe.transformer.config.joint_attention_dim)
        assert torch.equal(ids[0], text_ids(512))
    elif model == "qwen_image21":
        # Condition images at ~64*64 pixels (the pipeline's default is ~1 MP); its VAE decodes RGBA.
        out = pipe(image=[_image(64, 48), _image(32, 64)], output_resolution=64, **kwargs)
        assert out.images.shape == (1, 4, 64, 96)
        out.images = out.images[:, :3]
    elif model.startswith("flux3"):  # the modular pipeline returns the outputs it is asked for
        out = SimpleNamespace(images=pipe(image=[_image(96, 64), _image(64, 128)], output="images", **kwargs))
    else:
        out = pipe(image=[_image(64, 48), _image(32, 64)], true_cfg_scale=1.0, **kwargs)
    assert out.images.shape == (1, 3, 64, 96)
    assert torch.isfinite(out.images).all() and out.images.std() > 0


@pytest.mark.parametrize("model", ["qwen_edit", "qwen_edit_plus"])
def test_qwen_template_prefix_is_drop_idx_tokens(model: str, checkpoints: dict[str, pathlib.Path]) -> None:
    # The pipelines drop the first prompt_template_encode_start_idx hidden states: the system prompt up to the
    # user turn, which the tiny tokenizer (like the real one) encodes in exactly that many tokens.
    pipe = get_model(model).pipeline_class.from_pretrained(checkpoints[model])
    user_turn = "<|im_start|>user\n"
    prefix = pipe.prompt_template_encode.split(user_turn)[0] + user_turn
    assert len(pipe.processor.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx


@pytest.mark.parametrize("model", MODELS)
def test_written_transformer_round_trips(model: str, checkpoints: dict[str, pathlib.Path]) -> None:
    loaded = get_model(model).transformer_class.from_pretrained(checkpoints[model], subfolder="transformer")
    expected = tiny_transformer(model).state_dict()
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in expected)
    if "zero_cond_t" in loaded.config:
        assert loaded.config.zero_cond_t == (model == "qwen_edit_2511")


def test_transformer_save_reload_is_equal(tmp_path: pathlib.Path) -> None:
    transformer = tiny_transformer("qwen_edit_plus", seed=3)
    transformer.save_pretrained(tmp_path)
    reloaded = QwenImageTransformer2DModel.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(transformer.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_tiny_transformer_overrides_and_config() -> None:
    config = tiny_transformer_config("flux_kontext")
    assert config["attention_head_dim"] == sum(config["axes_dims_rope"])
    assert tiny_transformer("flux_kontext", num_layers=1).config.num_layers == 1
    assert tiny_transformer_config("qwen_edit_2511")["zero_cond_t"] is True
    with pytest.raises(ValueError, match="unknown model"):
        tiny_transformer_config("sdxl")


@pytest.mark.parametrize("model", ["flux_kontext", "flux2_dev"])  # CLIP/T5/Qwen tokenizers; Mistral's BPE
def test_cli_writes_identical_checkpoint(
    model: str, tmp_path: pathlib.Path, checkpoints: dict[str, pathlib.Path]
) -> None:
    # A fresh process must write byte-identical files (tokenizer training is hash-order independent).
    out_dir = tmp_path / model
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "common.tiny", model, str(out_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == str(out_dir)
    assert (out_dir / "model_index.json").is_file()
    reference = checkpoints[model]
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(reference, out_dir, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors
