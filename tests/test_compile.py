"""common.compile: compiled blocks train like eager ones (fp32, CPU, within 1e-5) and new mixed layouts reuse the
compiled graphs. One compiled run per model is shared by the tests (inductor on CPU takes a minute or two)."""

import copy

import pytest
import test_flux
import test_qwen
import torch
from conftest import lora_grads, randomize_lora, relative_error
from peft import LoraConfig

from common import flux, qwen
from common.compile import compile_blocks, compiled_frames
from common.tiny import tiny_transformer

# Batches of different sizes, grids, reference sizes (and for Qwen text lengths and reference counts), one of them
# with equal layouts (the stock path), one of a single sample.
FLUX_BATCHES = [
    test_flux.MIXED,
    [((3, 5), (2, 2)), ((4, 4), (5, 3))],
    [((6, 2), (3, 3))] * 2,
    [((2, 2), (3, 4)), ((5, 6), (2, 3)), ((3, 3), (3, 3)), ((4, 5), (6, 6))],
    [((5, 3), (4, 2))],
    [((2, 5), (2, 2)), ((6, 6), (4, 5)), ((3, 2), (2, 6))],
]
QWEN_BATCHES = [
    (test_qwen.MIXED, test_qwen.TEXT_LENGTHS),
    ([[(1, 3, 5)], [(1, 4, 4), (1, 2, 2)]], [7, 4]),
    ([[(1, 2, 6), (1, 3, 3)]] * 2, [6, 6]),
    ([[(1, 2, 2), (1, 3, 4)], [(1, 5, 6)], [(1, 3, 3), (1, 2, 2), (1, 2, 3)], [(1, 4, 5), (1, 6, 6)]], [3, 12, 5, 8]),
    ([[(1, 5, 3), (1, 4, 2)]], [9]),
    ([[(1, 2, 5)], [(1, 6, 6), (1, 4, 5)], [(1, 3, 2), (1, 2, 6)]], [10, 2, 6]),
]
WARMUP = 3  # batches after which no new compile may happen (see test_later_layouts_reuse_the_graphs)


def train_run(model: str) -> list[dict]:
    """Eager and compiled copies of the tiny model with the same random LoRA: per batch, both outputs, both LoRA
    gradients of a weighted sum of the outputs, and the frames compiled so far."""
    name = "qwen_edit_2511" if model == "qwen" else "flux_kontext"
    eager = tiny_transformer(name).train()
    eager.requires_grad_(False)
    eager.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    randomize_lora(eager)
    compiled = copy.deepcopy(eager)
    module = qwen if model == "qwen" else flux
    for transformer in (eager, compiled):
        module.install_mixed(transformer, "split")
    compile_blocks(compiled)
    records = []
    for step, layout in enumerate(QWEN_BATCHES if model == "qwen" else FLUX_BATCHES):
        batch = test_qwen.make_batch(*layout, seed=step) if model == "qwen" else test_flux.make_batch(layout, step)
        record = {}
        for kind, transformer in (("eager", eager), ("compiled", compiled)):
            transformer.zero_grad()
            out, valid = module.padded_forward(transformer, **batch)
            weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(step))
            (out * weight * valid[..., None]).sum().backward()
            record[kind] = (out.detach(), lora_grads(transformer))
        record["frames"] = compiled_frames()
        records.append(record)
    return records


@pytest.fixture(scope="module", params=["flux", "qwen"])
def run(request):
    torch._dynamo.reset()
    return train_run(request.param)


def test_compiled_blocks_equal_eager(run):
    for record in run:
        (out_e, grads_e), (out_c, grads_c) = record["eager"], record["compiled"]
        assert (out_c - out_e).abs().max().item() <= 1e-5
        assert grads_e.keys() == grads_c.keys() and grads_e
        for name, grad in grads_e.items():
            assert relative_error(grads_c[name], grad) <= 1e-5, name


def test_later_layouts_reuse_the_graphs(run):
    """After the first batches (a mixed one, then the stock path of equal layouts and a batch of one sample, each a
    one-time compile), new sizes, text lengths and reference counts compile nothing."""
    frames = [record["frames"] for record in run]
    assert frames[0] > 0
    assert frames[WARMUP:] == [frames[WARMUP - 1]] * (len(frames) - WARMUP), frames
