"""bench.memory: the arithmetic of the CPU estimate (static bytes, CUDA-only terms, the fit) and its CUDA-autocast
emulation; the 10-minute CPU run itself is not part of the suite."""

import pytest
import torch
from torch import nn

from bench import memory
from bench.memory import CASES, Sizes

# FLUX.1 Kontext at full size (19 double + 38 single blocks, rank-16 LoRA on the trainer's targets), as counted by
# `memory.sizes("flux_kontext", (19, 38))` on the meta device.
KONTEXT = Sizes(
    base=11_901_408_320,
    lora=54_165_504,
    linear=11_834_228_736,
    rows=3_035_136,
    block=339_738_624,
    block_rows=92_160,
    layer=56_623_104,
)


def test_sizes_counts_a_real_width_block_configuration():
    size = memory.sizes("flux_kontext", (1, 1), heads=1)
    assert size == Sizes(
        base=1_629_376, lora=96_256, linear=835_584, rows=5_248, block=589_824, block_rows=3_840, layer=98_304
    )


def test_static_bytes_per_option():
    lora_state = 16 * KONTEXT.lora  # float32 weights, gradients, two AdamW states
    outside_blocks = 2 * (KONTEXT.base - KONTEXT.linear)
    assert memory.static_bytes("auto", KONTEXT) == 2 * KONTEXT.base + lora_state == 24_669_464_704
    assert memory.static_bytes("fp8", KONTEXT) == outside_blocks + KONTEXT.linear + 4 * KONTEXT.rows + lora_state
    assert memory.static_bytes("fp8", KONTEXT) == 12_847_376_512
    # offloading keeps the running and the prefetched block's frozen linear weights on the device
    assert memory.static_bytes("fp8+offload", KONTEXT) == 134_359_168 + 2 * 339_738_624 + 8 * 92_160 + lora_state
    assert memory.static_bytes("auto+offload", KONTEXT) == 134_359_168 + 4 * 339_738_624 + lora_state
    assert memory.static_bytes("nf4", KONTEXT) == pytest.approx(outside_blocks + 0.516 * KONTEXT.linear + lora_state)


def test_flash_backward_workspace_rounds_tokens_up_to_128():
    # Kontext batch 1: 512 text + 2 x 4096 image tokens = 8704 = 68 x 128; dq_accum + softmax_d, float32
    assert memory.flash_backward_bytes(1, 8704) == 4 * 8704 * 24 * (128 + 1) == 107_790_336
    assert memory.flash_backward_bytes(2, 8705) == 4 * 2 * 8832 * 24 * 129


def test_case_tokens_and_inputs():
    kontext, qwen_two_refs = CASES[0], CASES[2]
    assert (kontext.tokens, qwen_two_refs.tokens) == (8704, 12738)
    assert memory.input_bytes(kontext, 1) == 2 * (64 * 8192 + 4096 * 512)


def test_fit_recovers_every_coefficient_exactly():
    """A dynamic peak built from known per-kind coefficients is fitted back from the runs the CPU bench makes."""
    truth = [float(k + 1) for k in range(12)]
    runs = [
        (counts, heads, tokens)
        for counts in memory._fit_configs("flux_kontext")
        for heads in memory.FIT_HEADS
        for tokens in (144, 304)
    ]
    a = torch.tensor([memory.fit_row(*run) for run in runs], dtype=torch.float64)
    b = torch.tensor([memory.predict(truth, *run) for run in runs], dtype=torch.float64)
    fitted = torch.linalg.solve(a, b).tolist()
    assert fitted == pytest.approx(truth)
    # n_j * (p + q*H + r*T + s*H*T): model (1, 2, 3, 4), double blocks (5..8), single blocks (9..12)
    assert memory.predict(truth, (19, 38), 24, 8704) == pytest.approx(
        (1 + 2 * 24 + 3 * 8704 + 4 * 24 * 8704)
        + 19 * (5 + 6 * 24 + 7 * 8704 + 8 * 24 * 8704)
        + 38 * (9 + 10 * 24 + 11 * 8704 + 12 * 24 * 8704)
    )


def test_estimate_adds_cuda_terms_to_the_largest_phase():
    dynamic = {"forward": 3e9, "single_transformer_blocks": 4e9, "transformer_blocks": 2e9}
    inputs = memory.input_bytes(CASES[0], 1)
    flash, workspace = memory.flash_backward_bytes(1, 8704), memory.CUBLAS_WORKSPACE
    auto = memory.estimate("auto", KONTEXT, dynamic, 1, 8704, inputs)
    assert auto == memory.static_bytes("auto", KONTEXT) + inputs + 4e9 + flash + workspace
    # fp8 dequantizes the largest weight into a float32 and a bf16 copy while it computes
    fp8 = memory.estimate("fp8", KONTEXT, dynamic, 1, 8704, inputs)
    assert fp8 == memory.static_bytes("fp8", KONTEXT) + inputs + 4e9 + 6 * KONTEXT.layer + flash + workspace
    # a forward larger than every backward phase: no flash backward workspace at that moment
    forward_peak = memory.estimate("auto", KONTEXT, {**dynamic, "forward": 5e9}, 1, 8704, inputs)
    assert forward_peak == memory.static_bytes("auto", KONTEXT) + inputs + 5e9 + workspace


def test_cuda_autocast_norms_run_layer_norm_in_float32_under_cpu_autocast():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, elementwise_affine=False))
    memory.cuda_autocast_norms(model)
    x = torch.randn(2, 8)
    with torch.autocast("cpu", torch.bfloat16):
        assert model[0](x).dtype == torch.bfloat16
        assert model(x).dtype == torch.float32  # CUDA autocast's float32 list; CPU autocast alone gives bfloat16
    assert model(x.bfloat16().float()).dtype == torch.float32
    assert model[1](x.bfloat16()).dtype == torch.bfloat16  # outside autocast the hook changes nothing


def test_one_option_per_gpu_process(monkeypatch, capsys):
    """`--device cuda --cases 0 --options fp8 --batch_sizes 1 --checkpointing on` measures that one cell, with its
    step time; main returns an exit status."""
    calls = []

    def measure(cases, batches, options, checkpointing, root):  # stands in for the GPU: what would run, one cell
        calls.append(([case.name for case in cases], batches, options, checkpointing))
        return [dict(case=cases[0].name, checkpointing=True, batch=1, option="fp8", gib=16.4, seconds=2.09,
                     how="measured")]  # fmt: skip

    monkeypatch.setattr(memory, "_cuda_rows", measure)
    argv = ["--device", "cuda", "--cases", "0", "--options", "fp8", "--batch_sizes", "1", "--checkpointing", "on"]
    assert memory.main(argv) == 0
    assert calls == [(["FLUX.1 Kontext"], [1], ["fp8"], [True])]
    assert "| FLUX.1 Kontext | on | 1 | 16.4 (2.09 s) |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as raised:
        memory.rows(["--device", "cuda", "--options", "fp16"])
    assert raised.value.code == 2
