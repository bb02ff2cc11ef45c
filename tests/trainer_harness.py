"""Shared body of the trainer CLI tests (one test module per script calls these with its model)."""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import precompute_cache
from common.demo import write_dataset
from common.lora import COMFYUI_FILE, LORA_FILE, STATE_FILE
from common.model_card import CARD_FILE, SNIPPET_STEPS
from common.models import get_model
from common.plots import CURVES_FILE
from common.training import METRICS_FILE, TrainingDiverged

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {
    "flux_kontext": "train_flux_kontext",
    "qwen_edit": "train_qwen_edit",
    "qwen_edit_plus": "train_qwen_edit_plus",
    "flux2_klein": "train_flux2",  # one script for both FLUX.2 models, chosen by the checkpoint's pipeline
    "flux2_dev": "train_flux2",
    "qwen_image21": "train_qwen_image21",
    "flux3_klein": "train_flux3",
}
# What the scripts' --demo trains, tested end to end as a user runs it (about a minute each): `--demo` is one code
# path (`common.demo.run`) for every script, so the suite runs it once, for FLUX.2 [klein], whose demo rows hold 0 to
# 3 references; every model's own training runs in its TrainerCases.
DEMO_MODELS = ("flux2_klein",)
RESOLUTIONS = ["64*64", "128*128", "192*192"]
VALIDATION_PROMPT = "make the first shape red"
# One thread and no tokenizer threads: CPU results are then bitwise reproducible across processes.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def dataset(root: Path, model: str, rows: int = 8) -> Path:
    """The demo's synthetic edit set (several sizes and aspect ratios; Plus rows with 0, 1 and 2 controls)."""
    folder = root / "data"
    if not folder.exists():
        write_dataset(folder, model, rows=rows)
    return folder


def data_flags(model: str, checkpoint: Path, data: Path, *extra: str) -> list[str]:
    """Flags shared by precompute_cache.py and the trainer."""
    flags = ["--pretrained_model_name_or_path", str(checkpoint), "--dataset", str(data), "--allow_target_only"]
    flags += ["--multi_resolutions", *RESOLUTIONS, *extra]
    return flags + (["--max_sequence_length", "32"] if get_model(model).max_sequence_length else [])


def precompute(model: str, flags: list[str], cache: Path) -> Path:
    """Write the cache for these flags (in-process)."""
    precompute_cache.main(precompute_cache.parse_args(["--model", model, *flags, "--cache_dir", str(cache)]))
    return cache


def train_flags(out: Path, *extra: str) -> list[str]:
    """A short tiny run: 4 steps of 3 samples, checkpoints every 2 steps, no tracker."""
    return [
        "--output_dir", str(out), "--train_batch_size", "3", "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--learning_rate", "1e-3", "--rank", "4", "--lora_alpha", "6", "--report_to", "none", "--seed", "7", *extra,
    ]  # fmt: skip


def train_inprocess(model: str, argv: list[str]) -> Path:
    """Run the script's parse_args + run in this process; returns the LoRA file."""
    script = importlib.import_module(SCRIPTS[model])
    from common.demo import run

    chosen = script.model_for(argv) if hasattr(script, "model_for") else script.MODEL
    assert chosen is get_model(model)
    return run(script.parse_args(argv), chosen)


def command(model: str, argv: list[str], processes: int = 1) -> list[str]:
    """The script as a real process: plain python, or torchrun with `processes` CPU ranks."""
    script = str(ROOT / f"{SCRIPTS[model]}.py")
    if processes == 1:
        return [sys.executable, script, *argv]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", script, *argv]


def run_process(model: str, argv: list[str], processes: int = 1) -> None:
    """Run to completion (CPU ranks via ACCELERATE_USE_CPU; accelerate's own --cpu launcher starts only one)."""
    env = {**ENV, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command(model, argv, processes), cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


def check_same_lora(one: Path, two: Path) -> None:
    """Equal within 1e-5 (the 2-process criterion), while training moved the B matrices (zero at init) far more."""
    first, second = lora(one), lora(two)
    assert first.keys() == second.keys()
    for key in first:
        assert (first[key] - second[key]).abs().max() <= 1e-5, key
    assert max(first[k].abs().max() for k in first if "lora_B" in k) > 1e-3


def metrics(out: Path) -> list[dict]:
    """The run's per-step records."""
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


def lora(path: Path) -> dict[str, torch.Tensor]:
    """LoRA tensors of a saved file."""
    return load_file(path)


def check_run(out: Path, steps: int, mixed: bool) -> list[dict]:
    """Every step logged with finite values; mixed runs pad some batches, equal-size runs none."""
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for record in records:
        for key in ("loss", "lr", "padding_ratio", "tokens_per_second", "grad_norm"):
            assert math.isfinite(record[key]), (key, record)
        assert record["tokens_per_second"] > 0
    if mixed:
        assert max(r["padding_ratio"] for r in records) > 0.05
    else:
        assert all(r["padding_ratio"] == 0 for r in records)
    return records


def check_lora_changes_pipeline_output(model: str, checkpoint: Path, lora_dir: Path) -> None:
    """The saved LoRA loads with the stock pipeline's load_lora_weights and changes the transformer's output."""
    pipe = get_model(model).load_pipeline(str(checkpoint))
    transformer = pipe.transformer.eval()
    generator = torch.Generator().manual_seed(0)
    channels = transformer.config.in_channels
    hidden = torch.randn(1, 12, channels, generator=generator)
    if model == "flux_kontext":
        from common.flux import image_ids

        kwargs = dict(
            encoder_hidden_states=torch.randn(1, 5, transformer.config.joint_attention_dim, generator=generator),
            pooled_projections=torch.randn(1, transformer.config.pooled_projection_dim, generator=generator),
            img_ids=image_ids(3, 4),
            txt_ids=torch.zeros(5, 3),
            guidance=torch.full((1,), 1.0) if transformer.config.guidance_embeds else None,
        )
    elif model.startswith("flux2"):
        from common.flux2 import image_ids, text_ids

        kwargs = dict(
            encoder_hidden_states=torch.randn(1, 5, transformer.config.joint_attention_dim, generator=generator),
            img_ids=image_ids(3, 4),
            txt_ids=text_ids(5),
            guidance=torch.full((1,), 4.0) if transformer.config.guidance_embeds else None,
        )
    elif model == "qwen_image21":
        from common.qwen21 import target_slots

        kwargs = dict(
            encoder_hidden_states=torch.randn(1, 5, transformer.config.context_in_dim, generator=generator),
            img_shapes=[[(1, 3, 4)]],
            img_mask=target_slots(torch.zeros(5, dtype=torch.bool), 12)[None],
        )
    elif model.startswith("flux3"):
        from common.flux3 import image_ids, text_ids

        kwargs = dict(
            encoder_hidden_states=torch.randn(1, 5, transformer.config.joint_attention_dim, generator=generator),
            img_ids=image_ids(3, 4),
            txt_ids=text_ids(5),
        )
    else:
        kwargs = dict(
            encoder_hidden_states=torch.randn(1, 5, transformer.config.joint_attention_dim, generator=generator),
            img_shapes=[[(1, 3, 4)]],
        )

    def output() -> torch.Tensor:
        with torch.no_grad():
            return transformer(hidden_states=hidden, timestep=torch.full((1,), 0.5), return_dict=False, **kwargs)[0]

    before = output()
    pipe.load_lora_weights(str(lora_dir))
    after = output()
    assert (after - before).abs().max() > 1e-4
    saved = load_file(lora_dir / LORA_FILE)
    assert saved and all(k.startswith("transformer.") for k in saved)


def check_folded_lora(lora_file: Path, checkpoint: Path) -> None:
    """The saved LoRA is the trained adapter (the checkpoint's state) with B scaled by alpha / rank = 6 / 4, and says
    lora_alpha = rank, so loaders that ignore the metadata apply the same delta; the checkpoint's copy is the same."""
    with safe_open(lora_file, framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.lora_alpha"] == meta["transformer.r"] == 4
    saved, trained = lora(lora_file), lora(checkpoint / STATE_FILE)
    assert lora(checkpoint / LORA_FILE).keys() == saved.keys() == {f"transformer.{k}" for k in trained}
    for key, value in trained.items():
        expected = value * 1.5 if ".lora_B." in key else value
        assert torch.equal(saved[f"transformer.{key}"], expected), key
        assert torch.equal(lora(checkpoint / LORA_FILE)[f"transformer.{key}"], expected), key


def small(model: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Keyword arguments (and, for Qwen, the pipelines' 1-MP input sizing made 64x64) that keep a stock pipeline call
    at 64x64 pixels: the pipelines otherwise resize every input to about 1 MP, seconds per VAE pass on CPU."""
    if model == "flux_kontext":
        return "height=64, width=64, max_area=64 * 64, _auto_resize=False"
    if model == "qwen_image21":  # condition images sized for its output_resolution (default 1024)
        return "height=64, width=64, output_resolution=64"
    if model == "qwen_edit":
        original = pipeline_qwenimage_edit.calculate_dimensions
        monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda _, ratio: original(64 * 64, ratio))
    else:
        monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 64 * 64)
    return "height=64, width=64"


def kill_after_first_checkpoint(model: str, argv: list[str], out: Path) -> None:
    """Start a run, SIGKILL it as soon as its first checkpoint is complete, and check it was cut short."""
    env = {**ENV, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        command(model, argv), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-2").is_dir():
        if process.poll() is not None:
            pytest.fail(f"run ended before its first checkpoint: {process.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("no checkpoint within 300 s")
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / LORA_FILE).exists(), "the run finished before the kill; the test needs more steps"


def check_resume_after_sigkill(model: str, kit: dict, tmp_path: Path, *memory: str) -> None:
    """A run SIGKILLed after its first checkpoint and resumed with `latest` ends bitwise equal to an uninterrupted
    one, with identical logged losses (control dropout on, so the dropout coins are restored too)."""
    argv = [*kit["flags"], "--cache_dir", str(kit["cache"]), "--max_train_steps", "6", "--control_dropout", "0.5"]
    argv += memory
    run_process(model, [*train_flags(tmp_path / "full"), *argv])
    killed = [*train_flags(tmp_path / "killed"), *argv]
    kill_after_first_checkpoint(model, killed, tmp_path / "killed")
    run_process(model, [*killed, "--resume_from_checkpoint", "latest"])
    full, resumed = lora(tmp_path / "full" / LORA_FILE), lora(tmp_path / "killed" / LORA_FILE)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    losses = [[r["loss"] for r in metrics(tmp_path / name)] for name in ("full", "killed")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


class TrainerCases:
    """The end-to-end cases every trainer must pass; a test module subclasses it with its MODEL and tiny KIT.

    Its class-scoped fixtures `kit` (checkpoint, data flags, cache) and `cached_run` live in conftest.py.
    """

    MODEL = ""
    KIT = ""

    def test_cached_mixed_run_end_to_end(self, kit, cached_run):
        out, lora_file = cached_run
        assert lora_file == out / LORA_FILE
        check_run(out, steps=4, mixed=True)
        assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
        assert (out / COMFYUI_FILE).is_file()
        check_lora_changes_pipeline_output(self.MODEL, kit["checkpoint"], out)
        check_folded_lora(out / LORA_FILE, out / "checkpoint-4")
        for folder in (out, out / "checkpoint-2", out / "checkpoint-4"):  # the panels: tests/test_plots.py
            with Image.open(folder / CURVES_FILE) as plot:
                assert plot.format == "PNG" and plot.size == (800, 900), folder
        halfway, final = (Image.open(f / CURVES_FILE).convert("RGB") for f in (out / "checkpoint-2", out))
        assert halfway.tobytes() != final.tobytes(), "a checkpoint's curves stop at its step"

    def test_resumed_from_a_checkpoint_equals_the_uninterrupted_run(self, cached_run, tmp_path):
        """Resumed from the cached run's record and checkpoint-2 (what a kill right after it leaves; the flags come
        from the record), the run ends bitwise equal to the uninterrupted one, with the same losses at steps 3 and 4.
        (Kontext's and Edit-Plus's process cases kill real runs.)"""
        out, lora_file = cached_run
        resumed = tmp_path / "resumed"
        shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
        shutil.copy(out / "run.json", resumed / "run.json")
        argv = ["--output_dir", str(resumed), "--resume_from_checkpoint", "latest"]
        resumed_lora = lora(train_inprocess(self.MODEL, argv))
        uninterrupted = lora(lora_file)
        assert resumed_lora.keys() == uninterrupted.keys()
        assert all(torch.equal(resumed_lora[k], uninterrupted[k]) for k in uninterrupted)
        steps = {r["step"]: r["loss"] for r in metrics(out)}
        assert {r["step"]: r["loss"] for r in metrics(resumed) if r["step"] > 2} == {3: steps[3], 4: steps[4]}

    def test_model_card_holds_the_run_and_its_snippet_runs(self, kit, cached_run, tmp_path, monkeypatch):
        out, _ = cached_run
        card = ModelCard.load(out / CARD_FILE)
        base = get_model(self.MODEL).hub.repo_id  # the tiny checkpoint is a local folder
        assert card.data.base_model == base and card.data.library_name == "diffusers"
        assert {"lora", "diffusers"} <= set(card.data.tags) and card.data.license
        assert card.data.widget == [{"text": VALIDATION_PROMPT, "output": {"url": "validation/step-4/0.png"}}]
        assert f"{len(list((kit['root'] / 'data').glob('[0-9][0-9][0-9].png')))} samples;" in card.text
        assert "| 192×192 |" in card.text and "| share |" in card.text
        assert "![0](validation/step-4/0.png)" in card.text
        code = card.text.split("```python\n")[1].split("```")[0]
        assert f"pipe.load_lora_weights({str(out.resolve())!r})" in code
        # The snippet as printed, with the tiny checkpoint for the model id, at 64x64 for 2 steps on CPU.
        code = code.replace(repr(base), repr(str(kit["checkpoint"]))).replace("torch.bfloat16", "torch.float32")
        code = code.replace(
            f"num_inference_steps={SNIPPET_STEPS}", f"num_inference_steps=2, {small(self.MODEL, monkeypatch)}"
        )
        shutil.copy(kit["root"] / "data" / "000_control.png", tmp_path / "input.png")
        monkeypatch.chdir(tmp_path)
        exec(compile(code, "model card snippet", "exec"), {})
        with Image.open(tmp_path / "edited.png") as edited:
            assert edited.size == (64, 64)

    def test_uncached_run_equals_cached_run(self, kit, cached_run, tmp_path):
        lora_file = train_inprocess(self.MODEL, [*kit["flags"], *train_flags(tmp_path, "--export_comfyui")])
        cached, uncached = lora(cached_run[1]), lora(lora_file)
        assert cached.keys() == uncached.keys()
        assert all(torch.equal(cached[k], uncached[k]) for k in cached)

    def test_offloaded_blocks_train_the_same_lora(self, kit, cached_run, tmp_path):
        """--offload_blocks end to end; on CPU the onload device is the CPU itself, and the LoRA is bitwise equal."""
        argv = [*kit["flags"], "--cache_dir", str(kit["cache"]), *train_flags(tmp_path, "--export_comfyui")]
        offloaded = lora(train_inprocess(self.MODEL, [*argv, "--offload_blocks"]))
        check_run(tmp_path, steps=4, mixed=True)
        plain = lora(cached_run[1])
        assert plain.keys() == offloaded.keys()
        assert all(torch.equal(plain[k], offloaded[k]) for k in plain)

    def test_fp8_base_trains_a_lora_for_the_stock_pipeline(self, kit, cached_run, tmp_path):
        """--base_precision fp8 end to end: a float32 LoRA in the same diffusers format that the stock (full
        precision) pipeline loads, trained on a base that really was fp8 (so not bitwise the full-precision LoRA)."""
        argv = [*kit["flags"], "--cache_dir", str(kit["cache"]), *train_flags(tmp_path), "--base_precision", "fp8"]
        fp8 = lora(train_inprocess(self.MODEL, argv))
        check_run(tmp_path, steps=4, mixed=True)
        plain = lora(cached_run[1])
        assert fp8.keys() == plain.keys()
        assert all(fp8[k].dtype == torch.float32 for k in fp8)
        assert not all(torch.equal(plain[k], fp8[k]) for k in plain)
        check_lora_changes_pipeline_output(self.MODEL, kit["checkpoint"], tmp_path)

    @pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
    def test_bf16_mixed_precision_run(self, kit, cached_run, tmp_path, monkeypatch, fresh_accelerate_state, device):
        """--mixed_precision bf16 (base weights bf16, LoRA fp32) trains mixed batches; its first loss, computed before
        any update on the same samples and noise, equals the fp32 run's within bf16 rounding (0.1%; 5e-5 seen, CPU)."""
        monkeypatch.setenv("ACCELERATE_USE_CPU", str(device == "cpu").lower())
        argv = [*kit["flags"], "--cache_dir", str(kit["cache"]), *train_flags(tmp_path), "--mixed_precision", "bf16"]
        weights = lora(train_inprocess(self.MODEL, [*argv, "--max_train_steps", "2"]))
        records = check_run(tmp_path, steps=2, mixed=True)
        first_fp32 = metrics(cached_run[0])[0]["loss"]
        assert abs(records[0]["loss"] - first_fp32) <= 1e-3 * first_fp32
        assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
        assert max(w.abs().max() for k, w in weights.items() if "lora_B" in k) > 1e-4, "the LoRA must have trained"

    def test_nan_loss_stops_naming_step_and_samples(self, kit, tmp_path):
        argv = [*kit["flags"], "--cache_dir", str(kit["cache"]), *train_flags(tmp_path)]
        with pytest.raises(TrainingDiverged, match=r"at step 2 .*samples in this batch: \[") as error:
            train_inprocess(self.MODEL, [*argv, "--learning_rate", "1e30", "--checkpointing_steps", "1"])
        assert "'0" in str(error.value)  # the demo set's sample ids are file stems 000, 001, ...
        assert (tmp_path / "checkpoint-1" / LORA_FILE).is_file() and not (tmp_path / "checkpoint-2").exists()
        assert not (tmp_path / LORA_FILE).exists()


class ProcessCases:
    """2 ranks as real processes, a few seconds of start-up each: for FLUX.2 [klein], whose ranks' batches differ
    most (0..3 references per sample; gradients are synchronised the same way for every model). A real SIGKILL and
    resume runs once, for Kontext with fp8 and offloaded blocks (`check_resume_after_sigkill`); every trainer resumes
    in-process from a checkpoint (`TrainerCases`), which is what a kill leaves."""

    MODEL = ""

    def test_two_processes_equal_one_with_the_same_global_batch(self, kit, tmp_path):
        argv = [*kit["flags"], "--cache_dir", str(kit["cache"])]
        run_process(self.MODEL, [*train_flags(tmp_path / "one"), *argv, "--train_batch_size", "4"])
        run_process(self.MODEL, [*train_flags(tmp_path / "two"), *argv, "--train_batch_size", "2"], processes=2)
        check_same_lora(tmp_path / "one" / LORA_FILE, tmp_path / "two" / LORA_FILE)


class EqualSizeCases:
    """For data sets whose samples can all be sized alike: a fixed resolution gives unpadded, stock-path batches."""

    MODEL = ""

    def test_equal_sizes_run_unpadded(self, kit, tmp_path):
        train_inprocess(self.MODEL, [*kit["flags"], "--resolution", "128x128", *train_flags(tmp_path)])
        check_run(tmp_path, steps=4, mixed=False)
