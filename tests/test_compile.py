"""common.compile: compiled blocks train like eager ones (fp32, CPU, within 1e-5) and new mixed layouts reuse the
compiled graphs. One compiled run is shared by the tests (inductor on CPU: about 80 s of CPU time)."""

import copy

import pytest
import test_qwen
import torch
from conftest import lora_grads, randomize_lora, relative_error
from peft import LoraConfig

from common import qwen
from common.compile import compile_blocks, compiled_frames
from common.tiny import tiny_transformer

# Mixed batches of different sizes, grids, reference counts and sizes, and text lengths (Qwen-Image-Edit 2511, with
# zero_cond_t: the richest block inputs). FLUX's compiled blocks are measured by bench/compile.py; compiling both
# models here would double the test's minute or two of CPU.
BATCHES = [
    (test_qwen.MIXED, test_qwen.TEXT_LENGTHS),
    ([[(1, 3, 5)], [(1, 4, 4), (1, 2, 2)]], [7, 4]),
    ([[(1, 2, 2), (1, 3, 4)], [(1, 5, 6)], [(1, 3, 3), (1, 2, 2), (1, 2, 3)], [(1, 4, 5), (1, 6, 6)]], [3, 12, 5, 8]),
    ([[(1, 5, 3), (1, 4, 2)], [(1, 2, 6)]], [9, 11]),
    ([[(1, 2, 5)], [(1, 6, 6), (1, 4, 5)], [(1, 3, 2), (1, 2, 6)]], [10, 2, 6]),
]
WARMUP = 2  # batches that may compile (seen: the first compiles the graphs, the second 2 more frames), then none


@pytest.fixture(scope="module")
def run() -> list[dict]:
    """Eager and compiled copies of the tiny model with the same random LoRA: per batch, both outputs, both LoRA
    gradients of a weighted sum of the outputs, and the frames compiled so far."""
    torch._dynamo.reset()
    eager = tiny_transformer("qwen_edit_2511").train()
    eager.requires_grad_(False)
    eager.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    randomize_lora(eager)
    compiled = copy.deepcopy(eager)
    for transformer in (eager, compiled):
        qwen.install_mixed(transformer, "split")
    compile_blocks(compiled)
    records = []
    for step, layout in enumerate(BATCHES):
        batch = test_qwen.make_batch(*layout, seed=step)
        record = {}
        for kind, transformer in (("eager", eager), ("compiled", compiled)):
            transformer.zero_grad()
            out, valid = qwen.padded_forward(transformer, **batch)
            weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(step))
            (out * weight * valid[..., None]).sum().backward()
            record[kind] = (out.detach(), lora_grads(transformer))
        record["frames"] = compiled_frames()
        records.append(record)
    return records


def test_compiled_blocks_equal_eager(run):
    for record in run:
        (out_e, grads_e), (out_c, grads_c) = record["eager"], record["compiled"]
        assert (out_c - out_e).abs().max().item() <= 1e-5
        assert grads_e.keys() == grads_c.keys() and grads_e
        for name, grad in grads_e.items():
            assert relative_error(grads_c[name], grad) <= 1e-5, name


def test_later_layouts_reuse_the_graphs(run):
    """After the warm-up batches, new batch sizes, image sizes, reference counts and text lengths compile nothing."""
    frames = [record["frames"] for record in run]
    assert frames[0] > 0
    assert frames[WARMUP:] == [frames[WARMUP - 1]] * (len(frames) - WARMUP), frames


def test_steps_that_compile_are_logged_with_their_time(caplog):
    """--compile says which steps compiled and how long they took (TorchDynamo's eager backend: no inductor cost)."""
    from accelerate import PartialState

    from common.compile import CompileWatch
    from common.errors import configure_logging

    PartialState()  # accelerate's logger needs it, as in a training run
    configure_logging()
    watch = CompileWatch()
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=True)
    with caplog.at_level("INFO", logger="common.compile"):
        double(torch.ones(3))
        watch.after_step(1, 12.5)
        double(torch.ones(5))  # a new length: the dynamic graph serves it
        watch.after_step(2, 0.25)
    lines = [r.getMessage().removeprefix("[RANK 0] ") for r in caplog.records if r.name == "common.compile"]
    assert lines == [
        "--compile: step 1 compiled 1 new graph(s) and took 12.5 s (12.5 s in compiling steps so far); "
        "steps with layouts compiled before reuse the graphs"
    ]


def test_compile_turns_off_the_coalescing_analysis_that_crashed_inductor(monkeypatch):
    """torch 2.11, real-width FLUX.1 Kontext blocks, dynamic shapes: Inductor's coalescing tiling analysis asserted in
    `get_pw_red_splits` during codegen (H200, issue 20); with it off the same blocks compiled and trained."""
    from torch._inductor import config

    monkeypatch.setattr(config.triton, "coalesce_tiling_analysis", True)  # torch's default, restored after
    compile_blocks(tiny_transformer("flux_kontext"))
    assert config.triton.coalesce_tiling_analysis is False
