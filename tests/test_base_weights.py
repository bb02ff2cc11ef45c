"""common.base_weights: fp8 storage, block offloading, encoder offloading, and the CUDA-only bitsandbytes options."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import reduce_base
from diffusers import FluxTransformer2DModel
from diffusers.utils.torch_utils import get_module_execution_device
from peft import LoraConfig
from PIL import Image

from common.base_weights import FP8, blocks, load_transformer, place_base_weights, quantize_fp8
from common.encoders import load_encoders
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


def test_offload_keeps_frozen_block_weights_off_device_between_uses(tiny_checkpoint):
    """Offloaded tensors live in their CPU copies outside the block's forward (one per block, chained for
    prefetching) and LoRA weights are never among them; the copies themselves are checked by the cuda tests."""
    transformer = _flux(tiny_checkpoint)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]))
    reduce_base(transformer, "offload")
    hooks = [b._diffusers_hook.get_hook("block_offload") for b in blocks(transformer)]
    assert len(hooks) == transformer.config.num_layers + transformer.config.num_single_layers
    assert [h.next for h in hooks[:-1]] == hooks[1:] and [h.previous for h in hooks[1:]] == hooks[:-1]
    lora = {id(p) for n, p in transformer.named_parameters() if "lora_" in n}
    assert not any(id(t) in lora for h in hooks for t in h.tensors)
    assert all(t.data_ptr() == c.data_ptr() for h in hooks for t, c in zip(h.tensors, h.cpu, strict=True))


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
    """precompute_cache.py --offload_encoders / uncached training: same embeddings and latents as resident ones."""
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
@pytest.mark.parametrize(
    ("script", "precision"),
    [("train_flux_kontext.py", "nf4"), ("train_qwen_edit_plus.py", "int8")],
)
def test_bitsandbytes_without_cuda_fails_fast_in_one_line(script, precision, tmp_path):
    """Refused right after parsing (neither the model, a hub name, nor the data exists), one line, no traceback,
    non-zero exit."""
    argv = ["--pretrained_model_name_or_path", "nobody/missing", "--dataset", str(tmp_path / "missing")]
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *argv, "--base_precision", precision],
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
            assert all(t.device.type == "cpu" for t in hook.tensors)
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
        results.append((out.detach(), {n: p.grad for n, p in transformer.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (offloaded, offloaded_grads) = results
    assert (plain - offloaded).abs().max() <= 1e-5
    assert all((plain_grads[k] - offloaded_grads[k]).abs().max() <= 1e-5 for k in plain_grads)
