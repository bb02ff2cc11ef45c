"""The model descriptions: the registry, a new model added in a test alone, and `--control_resolution pipeline`
sizing references exactly as each stock pipeline's own code does at inference."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus
from PIL import Image

import precompute_cache
from common.cache import cache_info, load_cache
from common.cli import parse_training_args, resolution_policy
from common.data import BadSampleError, EditRow, prepare_sample
from common.demo import write_dataset
from common.models import MODELS, get_model
from common.models.flux_kontext import FLUX_KONTEXT
from common.models.qwen_edit import QWEN_EDIT_PLUS
from common.tiny import write_tiny
from common.training import METRICS_FILE, train

ROOT = Path(__file__).resolve().parent.parent


def test_registry_names_every_model_once():
    assert list(MODELS) == [
        "flux_kontext",
        "qwen_edit",
        "qwen_edit_plus",
        "qwen_edit_2511",
        "flux2_klein",
        "flux2_dev",
        "qwen_image21",
        "flux3_klein",
    ]
    assert all(get_model(name).name == name for name in MODELS)
    assert get_model(FLUX_KONTEXT) is FLUX_KONTEXT
    # 2511 runs the Edit-Plus pipeline: its data are encoded alike, so caches name it as Edit-Plus does
    assert get_model("qwen_edit_2511").data_name == QWEN_EDIT_PLUS.data_name == "qwen_edit_plus"
    with pytest.raises(ValueError, match="unknown model 'sdxl'"):
        get_model("sdxl")


def test_shared_modules_name_no_model():
    names = "|".join(map(re.escape, MODELS))
    pattern = re.compile(rf"[\"']({names})[\"']")
    shared = [*(ROOT / "common").glob("*.py"), ROOT / "precompute_cache.py"]
    found = [f"{path.name}: {m.group(0)}" for path in shared for m in pattern.finditer(path.read_text())]
    assert found == []


def _imports() -> dict[str, set[str]]:
    """common.* modules each common module (and the scripts) import, anywhere in the file (lazy imports too)."""
    files = {f"common.{p.stem}": p for p in (ROOT / "common").glob("*.py") if p.stem != "__init__"}
    files |= {f"common.models.{p.stem}": p for p in (ROOT / "common" / "models").glob("*.py")}
    files["common.models"] = files.pop("common.models.__init__")
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("common"):
                names = [f"{node.module}.{a.name}" for a in node.names]
                found |= {n for n in names if n in files} or {node.module}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("common")}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def test_import_graph_has_no_cycle_and_reads_bottom_up():
    graph = _imports()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module not in done:
            for dependency in graph[module]:
                visit(dependency, (*path, module))
            done.add(module)

    for module in graph:
        visit(module, ())
    upper = {"data", "cache", "encoders", "training_data", "training", "validation", "demo", "cli", "tiny", "comfyui"}
    for module in [m for m in graph if m.startswith("common.models")]:
        reached = {m.removeprefix("common.") for m in _closure(graph, module)}
        assert not reached & upper, (module, reached & upper)


def _closure(graph: dict[str, set[str]], module: str) -> set[str]:
    """Every module `module` imports, directly or not."""
    seen, todo = set(), [module]
    while todo:
        for dependency in graph[todo.pop()] - seen:
            seen.add(dependency)
            todo.append(dependency)
    return seen


def test_a_new_model_is_one_description(tmp_path, monkeypatch):
    """A Kontext copy with another latent multiple and rounding, registered here only: precompute + 2 steps."""
    model = dataclasses.replace(FLUX_KONTEXT, name="kontext_multiple_32", multiple=32, rounding="nearest")
    monkeypatch.setitem(MODELS, model.name, model)
    checkpoint = write_tiny(model.name, tmp_path / "model")
    write_dataset(tmp_path / "data", model, rows=6)
    flags = ["--pretrained_model_name_or_path", str(checkpoint), "--dataset", str(tmp_path / "data")]
    flags += ["--multi_resolutions", "64*64", "128*128", "--max_sequence_length", "32"]
    cache = tmp_path / "cache"
    precompute_cache.main(precompute_cache.parse_args(["--model", model.name, *flags, "--cache_dir", str(cache)]))
    assert cache_info(cache)["fingerprint"]["model"] == "kontext_multiple_32"

    rows = load_cache(cache)
    shapes = [tuple(s) for r in rows for s in r["img_shapes"]]
    assert all(h * 16 % 32 == 0 and w * 16 % 32 == 0 for _, h, w in shapes)  # 32 px multiples, not Kontext's 16
    kontext = resolution_policy(argparse_namespace(flags[4:], checkpoint), FLUX_KONTEXT)
    ours = resolution_policy(argparse_namespace(flags[4:], checkpoint), model)
    demo_sizes = [(384, 256), (320, 192), (448, 192)]
    assert any(kontext.plan(*s).size != ours.plan(*s).size for s in demo_sizes)

    out = tmp_path / "out"
    argv = [*flags, "--cache_dir", str(cache), "--output_dir", str(out), "--max_train_steps", "2"]
    argv += ["--train_batch_size", "2", "--rank", "4", "--report_to", "none", "--checkpointing_steps", "2"]
    lora_file = train(parse_training_args(model, "", argv), model)
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    assert lora_file.exists()


def argparse_namespace(flags: list[str], kontext_checkpoint: Path):
    """The data flags of `flags` parsed as precompute_cache.py parses them (it reads the checkpoint's
    model_index.json, so a FLUX.1 Kontext checkpoint folder is named)."""
    required = ["--pretrained_model_name_or_path", str(kontext_checkpoint), "--dataset", "d", "--cache_dir", "c"]
    return precompute_cache.parse_args(["--model", "flux_kontext", *required, *flags])


class _Stop(Exception):
    """Raised from inside a pipeline once the sizes it chose are recorded."""


def _pipeline_reference_inputs(pipe, images: list[Image.Image]) -> list[torch.Tensor]:
    """The VAE inputs the stock pipeline's __call__ makes of `images`, stopped right after its sizing code ran."""
    seen: list[torch.Tensor] = []
    preprocess = pipe.image_processor.preprocess

    def record(image, height=None, width=None, *args, **kwargs):
        seen.append(preprocess(image, height, width, *args, **kwargs))
        if len(seen) == len(images):
            raise _Stop
        return seen[-1]

    pipe.image_processor.preprocess = record
    with pytest.raises(_Stop):
        pipe(prompt="make it red", image=images if len(images) > 1 else images[0], num_inference_steps=1)
    return seen


@pytest.mark.parametrize(
    ("model", "sizes"),
    [
        ("flux_kontext", [(700, 500)]),
        ("flux_kontext", [(360, 1000)]),
        ("qwen_edit", [(500, 900)]),
        ("qwen_edit_plus", [(700, 500), (300, 640)]),
        ("qwen_edit_2511", [(1000, 480)]),
        ("flux2_klein", [(150, 100), (90, 200), (100, 70)]),  # FLUX.2 crops to 16-multiples; 3 references
        ("flux2_dev", [(200, 130)]),
    ],
)
def test_pipeline_control_resolution_matches_the_pipeline(tmp_path, tiny_checkpoint, monkeypatch, model, sizes):
    """Each reference's VAE input under `--control_resolution pipeline` equals the stock pipeline's, bit for bit."""
    if model in ("qwen_edit_plus", "qwen_edit_2511"):
        # Edit-Plus reads its module constant at call time; a smaller one keeps the tiny VAE cheap on CPU.
        monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 256 * 256)
    description = get_model(model)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    pipe = description.pipeline_class.from_pretrained(tiny_checkpoint(model))
    expected = _pipeline_reference_inputs(pipe, images)
    kontext = tiny_checkpoint("flux_kontext")

    args = argparse_namespace(["--target_area", "64*64", "--control_resolution", "pipeline"], kontext)
    row = EditRow(0, "s0", images[0], tuple(images), "make it red", None, {})
    prepared = prepare_sample(row, model, resolution_policy(args, model))
    target_w, target_h = description.policy(target_area=64 * 64).plan(*sizes[0]).size
    assert prepared.target.shape == (3, target_h, target_w)  # the target keeps the training resolution
    for control, reference, (w, h) in zip(prepared.controls, expected, sizes, strict=True):
        assert control.shape == reference.shape[1:], (w, h)
        assert torch.equal(control, reference[0])
    # The default keeps today's behaviour: references sized like targets.
    default = prepare_sample(
        row, model, resolution_policy(argparse_namespace(["--target_area", "64*64"], kontext), model)
    )
    assert all(c.numel() < e.numel() for c, e in zip(default.controls, expected, strict=True))


def test_control_resolution_area_fixes_the_reference_area(tiny_checkpoint):
    kontext = tiny_checkpoint("flux_kontext")
    args = argparse_namespace(["--target_area", "64*64", "--control_resolution", "256*256"], kontext)
    for name in MODELS:
        model = get_model(name)
        policy = resolution_policy(args, model)
        plan = policy.control_plan(1000, 500)
        assert plan.size == model.policy(target_area=256 * 256).plan(1000, 500).size
        assert policy.plan(1000, 500).size == model.policy(target_area=64 * 64).plan(1000, 500).size
    with pytest.raises(SystemExit):
        argparse_namespace(["--control_resolution", "large"], kontext)


def test_validation_sizes_references_like_training(tmp_path, tiny_checkpoint):
    """Validation prepares its references with the run's --control_resolution, as the training rows were."""
    from common.validation import Validation

    image = tmp_path / "control.png"
    Image.fromarray(np.zeros((200, 300, 3), dtype=np.uint8)).save(image)
    checkpoint = str(tiny_checkpoint("qwen_edit_plus"))
    argv = ["--pretrained_model_name_or_path", checkpoint, "--dataset", "d", "--target_area", "64*64"]
    argv += ["--validation_prompts", "make it red", "--validation_images", f"{image},{image}"]
    argv += ["--output_dir", str(tmp_path / "out"), "--control_resolution", "128*128"]
    args = parse_training_args(QWEN_EDIT_PLUS, "", argv)
    sample = Validation(args, QWEN_EDIT_PLUS, torch.device("cpu"), torch.float32).samples[0]
    reference = QWEN_EDIT_PLUS.policy(target_area=128 * 128).plan(300, 200).size  # (160, 96)
    output = QWEN_EDIT_PLUS.policy(target_area=64 * 64).plan(300, 200).size
    assert (sample.width, sample.height) == output
    assert sample.img_shapes[1:] == [(1, reference[1] // 16, reference[0] // 16)] * 2


def test_too_many_controls_are_a_bad_row_naming_the_model():
    image = Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))
    row = EditRow(0, "s0", image, (image, image), "make it red", None, {"control_1": "s0_control_1.png"})
    for name in ("flux_kontext", "qwen_edit"):
        model = get_model(name)
        with pytest.raises(BadSampleError, match=f"{re.escape(model.title)} takes one control image, got 2"):
            prepare_sample(row, model, model.policy(target_area=64 * 64))
    assert len(prepare_sample(row, QWEN_EDIT_PLUS, QWEN_EDIT_PLUS.policy(target_area=64 * 64)).controls) == 2
