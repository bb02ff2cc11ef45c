"""common.validation: one mixed-size batch renders, per edit, what the stock pipeline renders for it alone."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
import trainer_harness as harness
from conftest import OneDevice, randomize_lora
from diffusers import DiffusionPipeline, FluxKontextPipeline, QwenImageEditPlusPipeline
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

import train_flux2
import train_flux3
import train_flux_kontext
import train_qwen_edit_plus
import train_qwen_image21
from common.lora import add_lora
from common.models import EditModel
from common.sdpa import DEFAULT_SDPA_KERNELS, enabled_sdpa_kernels, sdpa_kernels
from common.validation import Validation, validation_rows

PROMPTS = [
    "Make the sky blue and add a small red dog.",
    "Turn the cat into a tiger sitting on a wooden chair.",
    "Remove the person in the background, keep the lighting.",
]
SEED = 5
STEPS = 4


def _write(path: Path, width: int, height: int, seed: int) -> str:
    """A random RGB PNG of width x height; returns its path."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return str(path)


def _flags(checkpoint: Path, tmp_path: Path, images: list[str], *extra: str) -> list[str]:
    """Trainer flags with a validation set of len(images) edits, 4 sampling steps and seed SEED."""
    return [
        "--pretrained_model_name_or_path", str(checkpoint), "--dataset", str(tmp_path), "--output_dir",
        str(tmp_path / "out"), "--validation_steps", "1", "--validation_prompts", *PROMPTS[: len(images)],
        "--validation_images", *images, "--validation_inference_steps", str(STEPS), "--seed", str(SEED), *extra,
    ]  # fmt: skip


def _trained_transformer(checkpoint: Path, model: EditModel) -> torch.nn.Module:
    """The checkpoint's transformer as training holds it: mixed-batch hooks, a LoRA with nonzero B, train mode."""
    transformer = model.transformer_class.from_pretrained(checkpoint, subfolder="transformer")
    model.install_mixed(transformer, "auto")
    add_lora(transformer, 4, 4.0, list(model.lora_targets), model.unused_modules(transformer))
    randomize_lora(transformer)
    return transformer.train()


def _sample_and_watch(
    validation: Validation, transformer: torch.nn.Module, args: argparse.Namespace
) -> tuple[list[torch.Tensor], list[PIL.Image.Image], list[tuple[bool, int]]]:
    """Final latents and images of the validation set, and (training mode, batch size) of every transformer call."""
    calls: list[tuple[bool, int]] = []

    def watch(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        calls.append((module.training, kwargs["hidden_states"].shape[0]))

    handle = transformer.register_forward_pre_hook(watch, with_kwargs=True)
    try:
        latents = validation.denoise(transformer, args)
    finally:
        handle.remove()
    return latents, validation.decode(latents), calls


def _stock(pipe: DiffusionPipeline, k: int, **kwargs: Any) -> tuple[torch.Tensor, PIL.Image.Image]:
    """Final packed latents (N, C) and image of sample k rendered alone by the stock pipeline, from seed SEED + k."""
    final: dict[str, torch.Tensor] = {}

    def keep_latents(pipe: DiffusionPipeline, step: int, t: torch.Tensor, tensors: dict) -> dict:
        final["latents"] = tensors["latents"]
        return {}

    image = pipe(
        prompt=PROMPTS[k],
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(SEED + k),
        callback_on_step_end=keep_latents,
        **kwargs,
    ).images[0]
    return final["latents"][0], image


def _check_equal(latents: torch.Tensor, image: PIL.Image.Image, stock: tuple[torch.Tensor, PIL.Image.Image]) -> None:
    """Same latents up to float rounding of the mixed forward, same pixels up to 1/255."""
    stock_latents, stock_image = stock
    assert latents.shape == stock_latents.shape
    assert (latents - stock_latents).abs().max() <= 1e-5 * stock_latents.abs().max()
    assert image.size == stock_image.size
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(stock_image, dtype=int)).max() <= 1


def _check_computes_on_the_device_alone(
    validation: Validation, transformer: torch.nn.Module, args: argparse.Namespace
) -> None:
    """Denoising and decoding with `meta` as the compute device never touch a CPU tensor (0-d scalars aside): FLUX.2's
    decode once unpacked GPU latents with CPU ids and failed on the first GPU only. Moves everything to meta."""
    meta = torch.device("meta")
    validation.device = meta
    validation.vae.to(meta)
    for sample in validation.samples:
        sample.prompt_embeds = sample.prompt_embeds.to(meta)
        if sample.pooled_prompt_embeds is not None:
            sample.pooled_prompt_embeds = sample.pooled_prompt_embeds.to(meta)
        sample.references = [r.to(meta) for r in sample.references]
    with OneDevice():
        latents = validation.denoise(transformer.to(meta), args)
        pixels = [
            validation.model.decode_latents(validation.vae, x, s.height, s.width, validation.vae_scale_factor)
            for x, s in zip(latents, validation.samples, strict=True)
        ]
    assert {p.device for p in pixels} == {meta}
    assert [tuple(p.shape) for p in pixels] == [(1, 3, s.height, s.width) for s in validation.samples]


def test_flux_kontext_batch_equals_stock_pipeline_per_sample(tiny_checkpoint: Any, tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint("flux_kontext")
    # (w, h) the policy keeps as they are (64*64 area for the small ones, 128*128 for 160x96), so the pipeline,
    # which keeps its image's size with _auto_resize=False, gets the same reference as validation.
    sizes = [(64, 64), (160, 96), (48, 80)]
    images = [_write(tmp_path / f"{k}.png", w, h, seed=k) for k, (w, h) in enumerate(sizes)]
    extra = ("--multi_resolutions", "64*64", "128*128", "--max_sequence_length", "32")
    args = train_flux_kontext.parse_args(_flags(checkpoint, tmp_path, images, *extra))
    model = train_flux_kontext.MODEL
    transformer = _trained_transformer(checkpoint, model)

    validation = Validation(args, model, torch.device("cpu"), torch.float32)
    assert [(s.width, s.height) for s in validation.samples] == sizes
    assert [s.img_shapes for s in validation.samples] == [[(1, h // 16, w // 16)] * 2 for w, h in sizes]
    latents, rendered, calls = _sample_and_watch(validation, transformer, args)
    assert calls == [(False, 3)] * STEPS  # all samples in one eval-mode batch per step
    assert transformer.training
    assert [image.size for image in rendered] == sizes
    kernels = []  # --sdpa_kernels (default: no cuDNN attention) in every transformer and VAE attention call
    for module in [*transformer.modules(), *validation.vae.modules()]:
        if isinstance(module, AttentionModuleMixin | Attention):  # the VAE's is the older class
            module.register_forward_pre_hook(lambda *_: kernels.append(tuple(enabled_sdpa_kernels())))
    with sdpa_kernels(["flash", "efficient", "cudnn", "math"]):  # torch's default (tests run inside the trainers')
        assert [image.size for image in validation.sample(transformer, args)] == sizes
    assert len(kernels) > 2 * STEPS and set(kernels) == {DEFAULT_SDPA_KERNELS} and "cudnn" not in kernels[0]

    pipe = FluxKontextPipeline.from_pretrained(checkpoint, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    for k, (w, h) in enumerate(sizes):
        image = PIL.Image.open(images[k])
        stock = _stock(
            pipe, k, image=image, height=h, width=w, max_area=h * w, _auto_resize=False, guidance_scale=1.0,
            max_sequence_length=32,
        )  # fmt: skip
        _check_equal(latents[k], rendered[k], stock)
    _check_computes_on_the_device_alone(validation, transformer, args)


@pytest.mark.parametrize("kit", ["qwen_edit_plus", "qwen_edit_2511"])  # 2511: references modulated with t = 0
def test_qwen_edit_plus_batch_equals_stock_pipeline_per_sample(
    kit: str, tiny_checkpoint: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = tiny_checkpoint(kit)
    raw = [(150, 100), (100, 100), (90, 180)]
    paths = [_write(tmp_path / f"{k}.png", w, h, seed=10 + k) for k, (w, h) in enumerate(raw)]
    # Sample 1 has two references; each output is sized from its first one.
    entries = [paths[0], f"{paths[1]},{paths[2]}", paths[2]]
    sizes = [(160, 96), (128, 128), (96, 192)]
    # The stock pipeline sizes every reference to VAE_IMAGE_SIZE (1 MP; several seconds per VAE pass on CPU) with
    # the rule the policy applies with --target_area; both use 128*128 here, the pipeline's code otherwise as is.
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 128 * 128)
    args = train_qwen_edit_plus.parse_args(_flags(checkpoint, tmp_path, entries, "--target_area", "128*128"))
    model = train_qwen_edit_plus.MODEL
    transformer = _trained_transformer(checkpoint, model)

    validation = Validation(args, model, torch.device("cpu"), torch.float32)
    assert [(s.width, s.height) for s in validation.samples] == sizes
    assert [len(s.references) for s in validation.samples] == [1, 2, 1]
    latents, rendered, calls = _sample_and_watch(validation, transformer, args)
    assert calls == [(False, 3)] * STEPS
    assert transformer.training
    assert [image.size for image in rendered] == sizes

    pipe = QwenImageEditPlusPipeline.from_pretrained(checkpoint, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    for k, entry in enumerate(entries):
        w, h = sizes[k]
        image = [PIL.Image.open(path) for path in entry.split(",")]
        stock = _stock(pipe, k, image=image, height=h, width=w, true_cfg_scale=1.0)
        _check_equal(latents[k], rendered[k], stock)
    _check_computes_on_the_device_alone(validation, transformer, args)


@pytest.mark.parametrize("kit", ["flux2_klein", "flux2_dev"])
def test_flux2_batch_equals_stock_pipeline_per_sample(kit: str, tiny_checkpoint: Any, tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint(kit)
    # References of 16-multiple sizes under 1 MP, which the pipeline keeps as they are, and so does
    # --control_resolution pipeline; 1, 2 and 3 references (at t = 10, 20, 30) of other sizes than their outputs.
    raw = [(96, 64), (64, 64), (80, 112), (64, 96), (112, 64), (64, 80)]
    paths = [_write(tmp_path / f"{k}.png", w, h, seed=20 + k) for k, (w, h) in enumerate(raw)]
    entries = [paths[0], ",".join(paths[1:3]), ",".join(paths[3:])]
    sizes = [(64, 48), (64, 64), (48, 64)]  # --target_area 64*64 for each first reference, floored to 16
    extra = ("--target_area", "64*64", "--control_resolution", "pipeline", "--max_sequence_length", "32")
    argv = _flags(checkpoint, tmp_path, entries, *extra)
    args, model = train_flux2.parse_args(argv), train_flux2.model_for(argv)
    assert model.name == kit
    transformer = _trained_transformer(checkpoint, model)

    validation = Validation(args, model, torch.device("cpu"), torch.float32)
    assert [(s.width, s.height) for s in validation.samples] == sizes
    assert [s.img_shapes[1:] for s in validation.samples] == [
        [(1, h // 16, w // 16) for w, h in raw[a:b]] for a, b in ((0, 1), (1, 3), (3, 6))
    ]
    latents, rendered, calls = _sample_and_watch(validation, transformer, args)
    assert calls == [(False, 3)] * STEPS
    assert transformer.training

    pipe = model.pipeline_class.from_pretrained(checkpoint, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    # [klein] without CFG (guidance_scale 1; training runs conditional forwards); [dev]'s embedded guidance is the
    # run's --guidance_scale (default 4.0, the pipeline's default too).
    guidance = getattr(args, "guidance_scale", 1.0)
    assert guidance == (4.0 if kit == "flux2_dev" else 1.0)
    for k, entry in enumerate(entries):
        w, h = sizes[k]
        image = [PIL.Image.open(path) for path in entry.split(",")]
        stock = _stock(pipe, k, image=image, height=h, width=w, guidance_scale=guidance, max_sequence_length=32)
        _check_equal(latents[k], rendered[k], stock)
    _check_computes_on_the_device_alone(validation, transformer, args)


def test_qwen_image21_batch_equals_stock_pipeline_per_sample(tiny_checkpoint: Any, tmp_path: Path) -> None:
    """The stock QwenImage21Pipeline.__call__ (its defaults: prefix KV cache on, no CFG) renders each edit of the
    mixed validation batch (1 and 2 condition images) alone; its RGBA output's colour channels are ours."""
    checkpoint = tiny_checkpoint("qwen_image21")
    raw = [(150, 100), (100, 100), (90, 180)]
    paths = [_write(tmp_path / f"{k}.png", w, h, seed=30 + k) for k, (w, h) in enumerate(raw)]
    entries = [paths[0], f"{paths[1]},{paths[2]}"]
    sizes = [(160, 96), (128, 128)]
    # output_resolution=128 sizes every condition image as --target_area 128*128 sizes the references.
    args = train_qwen_image21.parse_args(_flags(checkpoint, tmp_path, entries, "--target_area", "128*128"))
    model = train_qwen_image21.MODEL
    transformer = _trained_transformer(checkpoint, model)

    validation = Validation(args, model, torch.device("cpu"), torch.float32)
    assert [(s.width, s.height) for s in validation.samples] == sizes
    assert [len(s.references) for s in validation.samples] == [1, 2]
    latents, rendered, calls = _sample_and_watch(validation, transformer, args)
    assert calls == [(False, 2)] * STEPS
    assert transformer.training

    pipe = model.pipeline_class.from_pretrained(checkpoint, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    for k, entry in enumerate(entries):
        w, h = sizes[k]
        image = [PIL.Image.open(path) for path in entry.split(",")]
        stock_latents, stock_image = _stock(pipe, k, image=image, height=h, width=w, output_resolution=128)
        assert stock_image.mode == "RGBA"
        _check_equal(latents[k], rendered[k], (stock_latents, stock_image.convert("RGB")))


def test_flux3_batch_equals_modular_pipeline_per_sample(tiny_checkpoint: Any, tmp_path: Path) -> None:
    """FLUX.3: the validation batch (0..n references, each sample's own text length) renders what the stock modular
    pipeline renders for each edit alone, its guider off (training and validation run conditional forwards)."""
    checkpoint = tiny_checkpoint("flux3_klein")
    # References of 16-multiple sizes under 1 MP: the pipeline keeps them as they are (one reference: its canvas is
    # itself; several: nothing to crop), and so does --control_resolution pipeline.
    raw = [(96, 64), (64, 64), (80, 112)]
    paths = [_write(tmp_path / f"{k}.png", w, h, seed=30 + k) for k, (w, h) in enumerate(raw)]
    entries = [paths[0], ",".join(paths[1:3])]
    sizes = [(64, 48), (64, 64)]  # --target_area 64*64 for each first reference, floored to 16
    argv = _flags(checkpoint, tmp_path, entries, "--target_area", "64*64", "--control_resolution", "pipeline")
    args, model = train_flux3.parse_args(argv), train_flux3.MODEL
    transformer = _trained_transformer(checkpoint, model)
    validation = Validation(args, model, torch.device("cpu"), torch.float32)
    assert [(s.width, s.height) for s in validation.samples] == sizes
    latents, rendered, calls = _sample_and_watch(validation, transformer, args)
    assert calls == [(False, 2)] * STEPS

    pipe = model.load_pipeline(str(checkpoint))
    pipe.update_components(transformer=transformer.eval())
    pipe.guider.disable()
    for k, entry in enumerate(entries):
        w, h = sizes[k]
        state = pipe(
            prompt=PROMPTS[k],
            image=[PIL.Image.open(path) for path in entry.split(",")],
            height=h,
            width=w,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(SEED + k),
        )
        stock_latents = state.get("latents")[0].flatten(1).T  # unpacked (C, h, w) back to tokens
        _check_equal(latents[k], rendered[k], (stock_latents, state.get("images")[0]))


def test_validation_rows_check_the_reference_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    rows = validation_rows(["edit it", "merge them"], ["a.png", " b.png , c.png "], "qwen_edit_plus")
    assert [(r.target, r.controls) for r in rows] == [("a.png", ("a.png",)), ("b.png", ("b.png", "c.png"))]
    assert rows[1].sources == {
        "image": "b.png",
        "control_0": "b.png",
        "control_1": "c.png",
        "caption": "--validation_prompts[1]",
    }
    with pytest.raises(ValueError, match="takes one control image"):
        validation_rows(["edit"], ["a.png,b.png"], "flux_kontext")
    with pytest.raises(ValueError, match="no such file d.png"):
        validation_rows(["edit"], ["a.png,d.png"], "qwen_edit_plus")
    with pytest.raises(ValueError, match="names no image"):
        validation_rows(["edit"], [" , "], "qwen_edit_plus")


def test_training_saves_and_logs_validation_without_changing_the_run(
    tiny_checkpoint: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = "flux_kontext"
    flags = harness.data_flags(model, tiny_checkpoint(model), harness.dataset(tmp_path, model, rows=4))
    control = _write(tmp_path / "control.png", 160, 96, seed=0)
    plain = harness.train_inprocess(model, [*flags, *harness.train_flags(tmp_path / "plain")])
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    validation = [
        "--validation_steps", "2", "--validation_prompts", *PROMPTS[:2], "--validation_images", control, control,
        "--validation_inference_steps", "2", "--report_to", "wandb",
    ]  # fmt: skip
    out = tmp_path / "validated"
    validated = harness.train_inprocess(model, [*flags, *harness.train_flags(out), *validation])

    first, second = harness.lora(plain), harness.lora(validated)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    for step in (2, 4):
        saved = sorted((out / "validation" / f"step-{step}").iterdir())
        assert [p.name for p in saved] == ["0.png", "1.png"]
        assert all(PIL.Image.open(p).size == (160, 96) for p in saved)
    logged = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/validation_*.png"))
    assert len(logged) == 4
