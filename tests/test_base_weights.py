"""common.base_weights: fp8 storage, block offloading, encoder offloading, and the CUDA-only bitsandbytes options."""

import argparse
import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from conftest import reduce_base, relative_error
from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel, QwenImageTransformer2DModel
from diffusers.hooks import HookRegistry
from diffusers.utils.torch_utils import get_module_execution_device
from peft import LoraConfig
from PIL import Image

from common.base_weights import (
    FP8,
    FrozenLinearHook,
    OffloadChain,
    _frozen_linears,
    blocks,
    load_transformer,
    place_base_weights,
    quantize_fp8,
)
from common.encoders import load_encoders
from common.errors import UserError
from common.models import get_model

ROOT = Path(__file__).resolve().parent.parent


def test_fp8_rows_use_the_whole_range_and_beat_unscaled_casting():
    """Each row's largest magnitude maps to 448; small-magnitude rows, which an unscaled cast pushes into e4m3's
    subnormals (below 2^-6), keep ~3 significant bits."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=g) * torch.logspace(-3, 0, 64)[:, None]
    q, scale = quantize_fp8(weight)
    assert q.dtype == FP8 and scale.shape == (64, 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((64,), 448.0))

    def error(w):
        return ((w - weight).norm(dim=1) / weight.norm(dim=1)).max().item()

    assert error(q.float() * scale) < 0.04
    assert error(weight.to(FP8).float()) > 0.5  # the smallest rows lose most of their bits unscaled


def _flux(tiny_checkpoint):
    return FluxTransformer2DModel.from_pretrained(tiny_checkpoint("flux_kontext"), subfolder="transformer")


def test_fp8_stores_base_linears_only_and_leaves_lora_float32(tiny_checkpoint):
    transformer = _flux(tiny_checkpoint)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "proj_mlp"]))
    reduce_base(transformer, "fp8")
    in_blocks = ("transformer_blocks.", "single_transformer_blocks.")
    base_linears = {
        f"{name}.weight"
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(in_blocks) and "lora_" not in name
    }
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            assert param.dtype == torch.float32 and param.requires_grad, name
        else:  # block linears in fp8; embedders, output layers, norms and biases untouched
            assert param.dtype == (FP8 if name in base_linears else torch.float32), name
    lora_layers = [m for n, m in transformer.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    assert lora_layers and not any(hasattr(m, "_diffusers_hook") for m in lora_layers)


def _linear_error(fp8: bool) -> tuple[float, float]:
    """Relative error of a 64x64 frozen linear's output and input gradient through `FrozenLinearHook` (stored in
    fp8 or not) against the float32 layer's own."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64).requires_grad_(False)
    x = torch.randn(16, 64, requires_grad=True)
    expected = layer(x)
    (expected_grad,) = torch.autograd.grad(expected.pow(2).sum(), x)
    HookRegistry.check_if_exists_or_initialize(layer).register_hook(FrozenLinearHook(fp8), "frozen_linear")
    out = layer(x)
    (grad,) = torch.autograd.grad(out.pow(2).sum(), x)
    return relative_error(out, expected), relative_error(grad, expected_grad)


def test_fp8_frozen_linear_is_within_4_percent_of_full_precision():
    """Forward and backward both compute with the dequantized weight (q * per-row scale): measured relative errors
    0.024 (output) and 0.025 (input gradient); with the unscaled e4m3 values 3,590 and 1.3e7."""
    assert _linear_error(fp8=False) == (0.0, 0.0)
    out_error, grad_error = _linear_error(fp8=True)
    assert 0.01 < out_error < 0.04 and 0.01 < grad_error < 0.04, (out_error, grad_error)


def _tiny_inputs(transformer: torch.nn.Module, model: str) -> dict:
    """One sample of a 4x6 target and a 3x3 reference (packed tokens) and 7 text tokens for a tiny transformer."""
    g = torch.Generator().manual_seed(1)
    config = transformer.config
    if model == "qwen_edit_plus":
        return dict(
            hidden_states=torch.randn(1, 33, config.in_channels, generator=g),
            encoder_hidden_states=torch.randn(1, 7, config.joint_attention_dim, generator=g),
            timestep=torch.full((1,), 0.5),
            img_shapes=[[(1, 4, 6), (1, 3, 3)]],
        )
    if model == "flux2_klein":
        from common.flux2 import sample_ids, text_ids

        return dict(
            hidden_states=torch.randn(1, 33, config.in_channels, generator=g),
            encoder_hidden_states=torch.randn(1, 7, config.joint_attention_dim, generator=g),
            timestep=torch.full((1,), 0.5),
            img_ids=sample_ids((4, 6), [(3, 3)])[None],
            txt_ids=text_ids(7)[None],
        )
    from common.flux import image_ids

    return dict(
        hidden_states=torch.randn(1, 33, config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 7, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
        timestep=torch.full((1,), 0.5),
        img_ids=torch.cat([image_ids(4, 6), image_ids(3, 3, index=1)]),
        txt_ids=torch.zeros(7, 3),
        guidance=torch.full((1,), 2.5),
    )


@torch.no_grad()
@pytest.mark.parametrize("model", ["flux_kontext", "qwen_edit_plus", "flux2_klein"])
def test_fp8_base_output_is_within_1_percent_of_full_precision(tiny_checkpoint, model):
    """The tiny transformers' outputs with every block linear stored in fp8 (per-row scales) vs float32: measured
    relative errors 0.0038 (FLUX.1 Kontext), 0.0018 (Qwen-Image-Edit-Plus), 0.00067 (FLUX.2 [klein]); computing with
    the unscaled e4m3 values gives 1.29 / 1.39 / 1.42."""
    cls = {"flux_kontext": FluxTransformer2DModel, "qwen_edit_plus": QwenImageTransformer2DModel}
    cls = cls.get(model, Flux2Transformer2DModel)
    transformer = cls.from_pretrained(tiny_checkpoint(model), subfolder="transformer").eval()
    inputs = _tiny_inputs(transformer, model)
    expected = transformer(**inputs, return_dict=False)[0]
    reduce_base(transformer, "fp8")
    assert any(m.weight.dtype == FP8 for m in transformer.modules() if isinstance(m, torch.nn.Linear))
    error = relative_error(transformer(**inputs, return_dict=False)[0], expected)
    assert 1e-4 < error < 0.01, error


def _frozen_bytes(module: torch.nn.Module) -> int:
    return sum(t.nbytes for layer in _frozen_linears(module) for t in (*layer.parameters(), *layer.buffers()))


def _record_onloads(chain: OffloadChain) -> tuple[list, list]:
    """Wrap the chain's `acquire` and `onload`: returns the lists they fill, of (block, grad mode) per acquire and of
    (in backward, asking block, onloaded block, bytes of all onloaded copies still alive) per onload."""
    copies, events, asking = [], [], []
    acquire, onload = chain.acquire, chain.onload

    def recording_acquire(index):
        asking.append((index, torch.is_grad_enabled()))
        acquire(index)

    def recording_onload(index):
        onload(index)
        copies.extend(weakref.ref(t.data.untyped_storage()) for t in chain.tensors[index])
        alive = sum(s().nbytes() for s in copies if s() is not None)
        events.append((torch._C._current_graph_task_id() != -1, asking[-1][0], index, alive))

    chain.acquire, chain.onload = recording_acquire, recording_onload
    return events, asking


@pytest.mark.parametrize("checkpointing", [False, True])
def test_offload_prefetches_the_next_block_keeps_two_at_most_and_frees_on_delete(tiny_checkpoint, checkpointing):
    """fp8 + offloading as the trainers combine them. Every onload is recorded with the block that asked for it and
    the bytes of onloaded copies still alive anywhere (weak references to their storages: a copy kept by autograd or
    a hook would count). Forward: block i prefetches i + 1; backward (the recomputation under checkpointing, or the
    frozen layers' weight fetches without it): i prefetches i - 1; each block is copied once per direction and two
    blocks at most are ever resident. Then `del` and a garbage collection free the model, its blocks, weights and
    host copies: no hook, stream, chain or autograd node keeps any alive (diffusers' hooks refer to their modules in
    a cycle, so the collector, not `del` alone, frees hooked layers)."""
    transformer = _flux(tiny_checkpoint)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q"]))
    transformer.requires_grad_(False)
    transformer.set_adapter("default")  # LoRA trainable again: the frozen base as the trainers have it
    place_base_weights(transformer, argparse.Namespace(base_precision="fp8", offload_blocks=True), "cpu")
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    chain = blocks(transformer)[0]._diffusers_hook.get_hook("block_offload").chain
    assert [_frozen_bytes(b) for b in blocks(transformer)] == [sum(t.nbytes for t in g) for g in chain.tensors]
    events, asking = _record_onloads(chain)
    inputs = _tiny_inputs(transformer, "flux_kontext")
    transformer(**inputs, return_dict=False)[0].pow(2).mean().backward()

    n = len(chain.tensors)
    assert n == 4
    forward = [(False, max(i - 1, 0), i) for i in range(n)]  # block 0 onloads itself, then prefetches 1, ...
    backward = [(True, i, i - 1) for i in range(n - 1, 0, -1)]  # the last block is still there from forward
    sizes = sorted(_frozen_bytes(b) for b in blocks(transformer))
    assert max(e[3] for e in events) <= sizes[-1] + sizes[-2]
    assert [e[:3] for e in events] == forward + backward
    assert len(chain.resident) == 1  # block 0 stays for the next step
    # In backward, checkpointing's recomputation acquires each block first (grad mode on), then the frozen layers'
    # weight fetches (grad mode off); without checkpointing only the latter.
    in_backward = asking[n:]
    recomputed = [index for index, grad_mode in in_backward if grad_mode]
    assert recomputed == (list(range(n - 1, -1, -1)) if checkpointing else [])
    assert {index for index, grad_mode in in_backward if not grad_mode} == set(range(n))

    tracked = [transformer, chain, *blocks(transformer), *transformer.parameters()]
    tracked += [t for group in chain.host for t in group] + [t.untyped_storage() for g in chain.host for t in g]
    refs = [weakref.ref(obj) for obj in tracked]
    del transformer, chain, tracked
    gc.collect()
    assert [type(r()) for r in refs if r() is not None] == []


@pytest.mark.parametrize("checkpointing", [False, True])
def test_offload_on_cpu_is_bitwise_exact(tiny_checkpoint, checkpointing):
    """Forward output and every LoRA gradient equal the plain model's bit for bit (onload device = the CPU)."""

    def run(option):
        torch.manual_seed(0)
        transformer = _flux(tiny_checkpoint)
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q"]))
        if option:
            reduce_base(transformer, option)
        else:
            transformer.requires_grad_(False)
            for name, param in transformer.named_parameters():
                param.requires_grad_("lora_" in name)
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        g = torch.Generator().manual_seed(1)
        from common.flux import image_ids

        out = transformer(
            hidden_states=torch.randn(2, 12, 64, generator=g),
            encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
            pooled_projections=torch.randn(2, 32, generator=g),
            timestep=torch.rand(2, generator=g),
            img_ids=image_ids(3, 4),
            txt_ids=torch.zeros(5, 3),
            guidance=torch.full((2,), 1.0),
            return_dict=False,
        )[0]
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad for n, p in transformer.named_parameters() if p.requires_grad}

    plain, offloaded = run(None), run("offload")
    assert torch.equal(plain[0], offloaded[0])
    assert plain[1].keys() == offloaded[1].keys() and len(plain[1]) > 0
    assert all(torch.equal(plain[1][k], offloaded[1][k]) for k in plain[1])


def test_offloaded_encoders_encode_identically(tiny_checkpoint):
    """precompute_cache.py --offload_encoders / uncached training: same embeddings and latents as resident ones, and
    nothing of the encoders left on the device afterwards."""
    checkpoint = tiny_checkpoint("qwen_edit_plus")
    resident = load_encoders("qwen_edit_plus", checkpoint)
    offloaded = load_encoders("qwen_edit_plus", checkpoint, offload=True)
    assert offloaded.pipe.text_encoder._diffusers_hook.get_hook("block_offload") is not None
    assert offloaded.pipe.vae.encoder._diffusers_hook.get_hook("block_offload") is not None
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 30, 90))
    expected, got = resident.encode_prompt("a red cat", [image]), offloaded.encode_prompt("a red cat", [image])
    assert torch.equal(expected["prompt_embeds"], got["prompt_embeds"])
    pixels = torch.rand(3, 64, 64) * 2 - 1
    assert torch.equal(resident.encode_image(pixels), offloaded.encode_image(pixels))
    hooks = [
        m._diffusers_hook.get_hook("block_offload") for m in (offloaded.pipe.text_encoder, offloaded.pipe.vae.encoder)
    ]
    assert all(len(h.blocks.tensors) > 1 and not h.blocks.resident and not h.rest.resident for h in hooks)


class _Reached(Exception):
    """Raised by a forward pre-hook once it has seen a module's inputs (meta weights cannot be onloaded)."""


@pytest.mark.parametrize("model", ["flux_kontext", "qwen_edit", "qwen_edit_plus", "flux2_klein", "flux2_dev"])
def test_offloaded_encoders_get_their_inputs_on_the_compute_device(tiny_checkpoint, model):
    """The first GPU run: offloaded encoders got CPU token ids (the pipelines put inputs where
    `get_module_execution_device` says, which was where offloaded weights live) while the hooks onloaded the
    weights to the GPU. With `meta` as the compute device the first text encoder and the VAE encoder must get their
    inputs on meta, and every model of the pipeline, and the pipeline itself (its `__call__` creates latents
    there), must report meta as where it computes. (Meta weights cannot be onloaded: each run stops at the inputs.)"""
    encoders = load_encoders(model, tiny_checkpoint(model), device="meta", offload=True)
    pipe, meta = encoders.pipe, torch.device("meta")
    seen: list[set[torch.device]] = []

    def reach(module, args, kwargs):
        seen.append({t.device for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)})
        raise _Reached

    models = {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    for name, component in models.items():
        (component.encoder if name == "vae" else component).register_forward_pre_hook(reach, with_kwargs=True)
    images = [Image.new("RGB", (32, 32))] if get_model(model).condition_size else []
    with pytest.raises(_Reached):
        encoders.encode_prompt("a red cat", images)
    with pytest.raises(_Reached):
        encoders.encode_image(torch.zeros(3, 32, 32))
    assert seen == [{meta}, {meta}]
    assert {name: get_module_execution_device(c) for name, c in models.items()} == dict.fromkeys(models, meta)
    assert encoders.device == meta and pipe._execution_device == meta


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bitsandbytes_without_cuda_fails_fast_in_one_line(tmp_path):
    """Refused right after parsing (neither the model, a hub name, nor the data exists), one line, no traceback,
    non-zero exit: nf4 as a process; int8 (the same check) of another script in-process."""
    import train_qwen_edit_plus

    argv = ["--pretrained_model_name_or_path", "nobody/missing", "--dataset", str(tmp_path / "missing")]
    with pytest.raises(UserError, match="--base_precision int8 needs a CUDA GPU"):
        train_qwen_edit_plus.parse_args([*argv, "--base_precision", "int8"])
    precision = "nf4"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_flux_kontext.py"), *argv, "--base_precision", precision],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"--base_precision {precision} needs a CUDA GPU" in lines[0]
    assert not (tmp_path / "output").exists()


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["nf4", "int8", "fp8"])
def test_quantized_base_trains_a_lora_on_cuda(tiny_checkpoint, precision):
    """bitsandbytes (and fp8) on the GPU: the base is quantized, LoRA float32 and its gradients finite and non-zero.
    nf4/int8 skip where bitsandbytes is not installed (an optional dependency; bench.gpu_check carries it)."""
    if precision != "fp8":
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    args = argparse.Namespace(
        base_precision=precision,
        offload_blocks=False,
        pretrained_model_name_or_path=str(tiny_checkpoint("flux_kontext")),
        revision=None,
    )
    device = torch.device("cuda")
    transformer = load_transformer(FluxTransformer2DModel, args, device, torch.bfloat16)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q"]))
    place_base_weights(transformer, argparse.Namespace(base_precision=precision, offload_blocks=False), device)
    lora = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in lora:
        p.data = p.data.float()
        p.requires_grad_(True)
    from common.flux import image_ids

    with torch.autocast("cuda", torch.bfloat16):
        out = transformer(
            hidden_states=torch.randn(1, 12, 64, device=device),
            encoder_hidden_states=torch.randn(1, 5, 32, device=device),
            pooled_projections=torch.randn(1, 32, device=device),
            timestep=torch.rand(1, device=device),
            img_ids=image_ids(3, 4).to(device),
            txt_ids=torch.zeros(5, 3, device=device),
            guidance=torch.ones(1, device=device),
            return_dict=False,
        )[0]
    out.float().pow(2).mean().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora)


@pytest.mark.cuda
@pytest.mark.parametrize("checkpointing", [False, True])
def test_offload_on_cuda_matches_resident(tiny_checkpoint, checkpointing):
    """Offloaded blocks streamed onto the GPU give the resident model's output and LoRA gradients (<= 1e-5)."""
    device = torch.device("cuda")
    results = []
    for offload in (False, True):
        torch.manual_seed(0)
        transformer = _flux(tiny_checkpoint)
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q"]))
        for name, param in transformer.named_parameters():
            param.requires_grad_("lora_" in name)
        if offload:
            place_base_weights(transformer, argparse.Namespace(base_precision="auto", offload_blocks=True), device)
            hook = blocks(transformer)[0]._diffusers_hook.get_hook("block_offload")
            assert all(t.device.type == "cpu" and t.is_pinned() for t in hook.chain.tensors[hook.index])
        else:
            transformer.to(device)
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        g = torch.Generator().manual_seed(1)
        from common.flux import image_ids

        out = transformer(
            hidden_states=torch.randn(2, 12, 64, generator=g).to(device),
            encoder_hidden_states=torch.randn(2, 5, 32, generator=g).to(device),
            pooled_projections=torch.randn(2, 32, generator=g).to(device),
            timestep=torch.rand(2, generator=g).to(device),
            img_ids=image_ids(3, 4).to(device),
            txt_ids=torch.zeros(5, 3, device=device),
            guidance=torch.full((2,), 1.0, device=device),
            return_dict=False,
        )[0]
        out.pow(2).mean().backward()
        if offload:  # after backward only block 0 is left on the GPU
            on_gpu = [t for group in hook.chain.tensors for t in group if t.device.type == "cuda"]
            assert list(hook.chain.resident) == [0] and len(on_gpu) == len(hook.chain.tensors[0])
        results.append((out.detach(), {n: p.grad for n, p in transformer.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (offloaded, offloaded_grads) = results
    assert (plain - offloaded).abs().max() <= 1e-5
    assert all((plain_grads[k] - offloaded_grads[k]).abs().max() <= 1e-5 for k in plain_grads)
