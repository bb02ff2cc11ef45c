"""common.model_card: the README.md a run leaves — Hub metadata, data summary, command without secrets, ours vs the
user's. (The card of real runs and its snippet running against the tiny checkpoint: tests/trainer_harness.py.)"""

import json

from huggingface_hub import ModelCard
from PIL import Image

import train_flux_kontext
import train_qwen_edit_plus
from common.model_card import (
    CARD_FILE,
    MARKER,
    MAX_SIZE_ROWS,
    base_model_id,
    latest_validation,
    model_card,
    resolution_mix,
    write_model_card,
)
from common.training_data import TrainingData

# Targets of 3 sizes (grids of 16-pixel tokens), with 0, 1 or 2 references.
SHAPES = [[[1, 16, 16], [1, 16, 16]]] * 3 + [[[1, 12, 20]]] * 2 + [[[1, 20, 12], [1, 8, 8], [1, 16, 16]]]
CAPTIONS = ["ohwx make the cup red", "ohwx make the cup blue", "OHWX turn the cup green", None]


def flux_args(tmp_path, *extra):
    """Parsed Kontext flags of a run into tmp_path/out (the cache is never opened here)."""
    argv = [
        "--pretrained_model_name_or_path", "someone/kontext-finetune", "--cache_dir", str(tmp_path / "cache"),
        "--output_dir", str(tmp_path / "out"), "--rank", "8", "--lora_alpha", "4", *extra,
    ]  # fmt: skip
    return train_flux_kontext.parse_args(argv)


def data(shapes=SHAPES, captions=CAPTIONS) -> TrainingData:
    return TrainingData(None, [], None, True, img_shapes=shapes, captions=captions)


def test_card_parses_with_its_metadata_data_summary_and_command(tmp_path):
    args = flux_args(tmp_path, "--hub_token", "hf_secret", "--train_batch_size", "2", "--hub_token=hf_secret2")
    card = model_card(args, train_flux_kontext.MODEL, data(), 2, "bf16")
    assert write_model_card(tmp_path / "out", card) == tmp_path / "out" / CARD_FILE
    loaded = ModelCard.load(tmp_path / "out" / CARD_FILE)
    meta = loaded.data
    assert meta.base_model == "someone/kontext-finetune"  # a Hub name given is the base model
    assert meta.library_name == "diffusers" and meta.pipeline_tag == "image-to-image"
    assert {"lora", "diffusers", "flux", "flux-kontext"} <= set(meta.tags)
    assert meta.license == "other" and meta.license_name == "flux-1-dev-non-commercial-license"
    text = loaded.text
    assert text.startswith(MARKER)
    assert "FluxKontextPipeline.from_pretrained('someone/kontext-finetune', dtype=torch.bfloat16)" in text
    assert text.split("\n")[3].startswith("A LoRA for [someone/kontext-finetune](https://huggingface.co/someone/")
    assert f"pipe.load_lora_weights({str((tmp_path / 'out').resolve())!r})" in text
    assert "prompt='ohwx make the cup red'" in text  # no validation prompts: the first caption
    assert "6 samples; reference images per sample: 0 in 2, 1 in 3, 2 in 1." in text
    assert "| 256×256 | 3 | 50% |" in text and "| 320×192 | 2 | 33% |" in text and "| 192×320 | 1 | 17% |" in text
    assert "Words in every caption: `ohwx`, `the`, `cup`." in text
    assert "accelerate launch train_flux_kontext.py --pretrained_model_name_or_path someone/kontext-finetune" in text
    assert "| global batch | 4 (per process 2 × processes 2 × accumulation 1) |" in text
    assert "| lora_alpha | 4.0 |" in text and "| mixed precision | bf16 |" in text
    assert "hf_secret" not in text and "hub_token" not in text


def test_base_model_of_a_local_folder(tmp_path):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen-Image-Edit-2511" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert base_model_id(str(snapshot), "Qwen/Qwen-Image-Edit-2509") == "Qwen/Qwen-Image-Edit-2511"
    assert base_model_id(str(tmp_path), "Qwen/Qwen-Image-Edit-2509") == "Qwen/Qwen-Image-Edit-2509"
    args = flux_args(tmp_path, "--pretrained_model_name_or_path", str(tmp_path))
    text = model_card(args, train_flux_kontext.MODEL, data(), 1, "no").text
    assert "from_pretrained('black-forest-labs/FLUX.1-Kontext-dev', dtype=torch.bfloat16)" in text
    opening = text.split("\n")[3]  # after the marker, the title and a blank line
    assert opening.startswith(f"A LoRA for the local checkpoint `{tmp_path}` (`FluxKontextPipeline`), trained on 6")
    assert "[black-forest-labs/FLUX.1-Kontext-dev](https://huggingface.co/black-forest-labs/FLUX.1-Kontext-dev)" in text
    assert "A LoRA for [black-forest-labs" not in text and "torch_dtype" not in text


def test_last_validation_images_are_shown_and_in_the_widget(tmp_path):
    args = flux_args(tmp_path, "--validation_prompts", "make it red", "make it blue", "--validation_images", "a", "b")
    for step in (2, 10):
        folder = tmp_path / "out" / "validation" / f"step-{step}"
        folder.mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (32, 32)).save(folder / f"{k}.png")
    assert latest_validation(tmp_path / "out")[0] == 10
    card = model_card(args, train_qwen_edit_plus.MODEL, data(captions=None), 1, "no", repo_id="me/my-lora")
    assert card.data.widget == [
        {"text": "make it red", "output": {"url": "validation/step-10/0.png"}},
        {"text": "make it blue", "output": {"url": "validation/step-10/1.png"}},
    ]
    assert (
        "## Validation images (step 10)" in card.text
        and "| make it blue | ![1](validation/step-10/1.png) |" in card.text
    )
    assert "pipe.load_lora_weights('me/my-lora')" in card.text and "prompt='make it red'" in card.text
    assert card.text.split("\n")[1] == "# me/my-lora"
    assert "The training captions are not recorded" in card.text
    assert card.data.license == "apache-2.0" and "qwen-image-edit-plus" in card.data.tags


def test_a_readme_of_the_user_is_never_overwritten(tmp_path):
    args = flux_args(tmp_path)
    card = model_card(args, train_flux_kontext.MODEL, data(), 1, "no")
    out = tmp_path / "out"
    out.mkdir()
    (out / CARD_FILE).write_text("# my own notes\n")
    assert write_model_card(out, card) is None
    assert (out / CARD_FILE).read_text() == "# my own notes\n"
    (out / CARD_FILE).write_text(f"---\nlicense: mit\n---\n{MARKER}\n# an older card of ours\n")
    assert write_model_card(out, card) == out / CARD_FILE
    assert ModelCard.load(out / CARD_FILE).data.base_model == "someone/kontext-finetune"
    assert sorted(p.name for p in out.iterdir()) == [CARD_FILE]


def test_rare_sizes_are_summed_into_one_row():
    shapes = [[[1, 4, 4 + k]] for k in range(MAX_SIZE_ROWS + 3) for _ in range(1 if k else 5)]
    rows = resolution_mix(shapes)
    assert rows[0] == ("64×64", 5) and len(rows) == MAX_SIZE_ROWS + 1
    assert rows[-1] == ("3 other sizes", 3)


def test_public_config_drops_the_token(tmp_path):
    from common.cli import public_config

    args = flux_args(tmp_path, "--hub_token", "hf_secret")
    assert args.hub_token == "hf_secret" and "hf_secret" not in json.dumps(public_config(args))
