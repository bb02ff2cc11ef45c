"""ComfyUI LoRA export: the exported file applies exactly the delta that diffusers applies for the diffusers file.

Oracles: Qwen-Image-Edit — diffusers itself loads `diffusion_model.`-keyed LoRAs (the ComfyUI format), so both
files go through `load_lora_weights` and the transformer outputs must agree. FLUX — diffusers reads BFL-named LoRAs
only at the full FLUX.1 sizes (its converter hard-codes them), so (a) the tiny transformer gets the exported LoRA
applied the way ComfyUI applies it (W_bfl += alpha / rank * B @ A on the BFL layout of ComfyUI's
`flux_to_diffusers`) and its output must equal the diffusers-loaded LoRA's, and (b) at FLUX.1 sizes diffusers' own
ComfyUI/kohya FLUX converter must read the export back to the original deltas.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora, relative_error
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from common.comfyui import comfyui_state_dict, save_comfyui_lora
from common.flux2 import sample_ids, text_ids
from common.lora import adapted_modules
from common.models import MODELS, flux2, flux_kontext, qwen_edit
from common.tiny import tiny_transformer

# The Kontext trainer's defaults plus the single blocks' proj_out.
FLUX_DEFAULT_TARGETS = [*flux_kontext.LORA_TARGETS, "proj_out"]
FLUX_EVERY_LINEAR = FLUX_DEFAULT_TARGETS + [
    "norm1.linear",
    "norm1_context.linear",
    "norm.linear",
    "norm_out.linear",
    "x_embedder",
    "context_embedder",
    "linear_1",
    "linear_2",
]
# Fused BFL linears with some parts unadapted: img qkv without k, txt qkv with only k, linear1 without k.
FLUX_PARTIAL = ["attn.to_q", "attn.to_v", "attn.add_k_proj", "proj_mlp"]
QWEN_TARGETS = list(qwen_edit.LORA_TARGETS)
# The FLUX.2 trainers' defaults plus every other linear ComfyUI's FLUX.2 has a name for, but the final norm (below).
FLUX2_LINEARS = [
    *flux2.LORA_TARGETS,
    "x_embedder",
    "context_embedder",
    "linear_1",
    "linear_2",
    "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.linear",
    "single_stream_modulation.linear",
    "proj_out",
]
# BFL FLUX linears as ComfyUI's `comfy.utils.flux_to_diffusers` lays them out: the diffusers linears whose weights
# they stack by rows, in row order.
BFL_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}
BFL_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
BFL_TOP = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}


def save_random_lora(model: str, directory: Path, config: LoraConfig, metadata: bool = True) -> Path:
    """Save a random non-zero LoRA of the tiny transformer with the pipeline's `save_lora_weights`, as trainers do."""
    transformer = tiny_transformer(model)
    transformer.add_adapter(config)
    randomize_lora(transformer)
    MODELS[model].pipeline_class.save_lora_weights(
        directory,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict() if metadata else None,
    )
    return directory / "pytorch_lora_weights.safetensors"


@torch.no_grad()
def run_flux(transformer: torch.nn.Module) -> torch.Tensor:
    """Transformer output on a fixed Kontext-shaped input (target and reference tokens)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([FluxKontextPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32)] * 2)
    ids[12:, 0] = 1
    return transformer(
        hidden_states=torch.randn(1, 24, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.7]),
        img_ids=ids,
        txt_ids=torch.zeros(7, 3),
        guidance=torch.tensor([2.5]),
        return_dict=False,
    )[0]


@torch.no_grad()
def run_qwen(transformer: torch.nn.Module) -> torch.Tensor:
    """Transformer output on a fixed edit-shaped input (target and one reference image)."""
    g = torch.Generator().manual_seed(0)
    return transformer(
        hidden_states=torch.randn(1, 24 + 6, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 9, 32, generator=g),
        encoder_hidden_states_mask=None,
        timestep=torch.tensor([0.7]),
        img_shapes=[[(1, 4, 6), (1, 2, 3)]],
        return_dict=False,
    )[0]


@torch.no_grad()
def run_flux2(transformer: torch.nn.Module) -> torch.Tensor:
    """Transformer output on a fixed FLUX.2 edit-shaped input (target and one reference at t = 10)."""
    g = torch.Generator().manual_seed(0)
    guidance = torch.tensor([2.5]) if transformer.config.guidance_embeds else None
    return transformer(
        hidden_states=torch.randn(1, 12 + 6, 16, generator=g),
        encoder_hidden_states=torch.randn(1, 7, 48, generator=g),
        timestep=torch.tensor([0.7]),
        img_ids=sample_ids((3, 4), [(2, 3)]),
        txt_ids=text_ids(7),
        guidance=guidance,
        return_dict=False,
    )[0]


def diffusers_linears(bfl: str) -> list[str]:
    """Diffusers linears stacked in BFL linear `bfl`, in row order; KeyError if `bfl` is no BFL FLUX linear."""
    block = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", bfl)
    if block is None:
        return list(BFL_TOP[bfl])
    kind, index, name = block.groups()
    table, prefix = (
        (BFL_DOUBLE, "transformer_blocks") if kind == "double" else (BFL_SINGLE, "single_transformer_blocks")
    )
    return [f"{prefix}.{index}.{module}" for module in table[name]]


@torch.no_grad()
def apply_like_comfyui(transformer: torch.nn.Module, lora: dict[str, torch.Tensor]) -> None:
    """Patch weights as ComfyUI's "lora" patch does (W += alpha / rank * B @ A; factor 1 without `.alpha`) on BFL."""
    linears = dict(transformer.named_modules())
    names = {key.removeprefix("diffusion_model.").rsplit(".", 2)[0] for key in lora}
    assert set(lora) == {f"diffusion_model.{n}.lora_{m}.weight" for n in names for m in "AB"}, "A/B pairs only"
    for name in names:
        a, b = lora[f"diffusion_model.{name}.lora_A.weight"], lora[f"diffusion_model.{name}.lora_B.weight"]
        delta = b @ a
        if name == "final_layer.adaLN_modulation.1":  # BFL (shift, scale) rows -> diffusers (scale, shift)
            delta = torch.cat(delta.chunk(2)[::-1])
        weights = [linears[module].weight for module in diffusers_linears(name)]
        for weight, part in zip(weights, delta.split([w.shape[0] for w in weights]), strict=True):
            weight += part


@pytest.mark.parametrize(
    "targets", [FLUX_DEFAULT_TARGETS, FLUX_EVERY_LINEAR, FLUX_PARTIAL], ids=["default", "every_linear", "partial"]
)
def test_flux_export_applied_as_comfyui_does_equals_diffusers_lora(tiny_checkpoint, tmp_path, targets):
    path = tiny_checkpoint("flux_kontext")
    diffusers_file = save_random_lora("flux_kontext", tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    comfy_file = save_comfyui_lora("flux_kontext", diffusers_file, tmp_path / "comfyui.safetensors")
    comfy = load_file(comfy_file)
    assert any(".img_attn.qkv." in k for k in comfy) and any(".single_blocks.1.linear1." in k for k in comfy)

    pipe = FluxKontextPipeline.from_pretrained(path)
    pipe.load_lora_weights(diffusers_file)
    patched = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer")
    apply_like_comfyui(patched, comfy)
    plain = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer")

    reference, out, base = run_flux(pipe.transformer), run_flux(patched), run_flux(plain)
    assert relative_error(out, reference) <= 1e-5
    assert relative_error(base, reference) > 1e-2


def test_flux_export_read_back_by_diffusers_comfyui_flux_converter_at_flux1_sizes():
    """Diffusers' converter for ComfyUI/kohya FLUX LoRAs names the BFL linears and un-fuses them at FLUX.1 sizes."""
    with torch.device("meta"):
        full = FluxTransformer2DModel(guidance_embeds=True)  # FLUX.1 [dev] / Kontext sizes
    shapes = {n: m.weight.shape for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)}
    unadapted = {"transformer_blocks.18.attn.to_k", "transformer_blocks.18.attn.add_q_proj"}
    unadapted |= {"transformer_blocks.18.attn.add_v_proj", "single_transformer_blocks.37.attn.to_v"}
    chosen = [
        n for n in shapes if n not in unadapted and not re.match(r"(single_)?transformer_blocks\.(?!0\.|18\.|37\.)", n)
    ]
    g = torch.Generator().manual_seed(0)
    lora = {}
    for n in chosen:
        lora[f"transformer.{n}.lora_A.weight"] = torch.randn(4, shapes[n][1], generator=g)
        lora[f"transformer.{n}.lora_B.weight"] = torch.randn(shapes[n][0], 4, generator=g)

    comfy = comfyui_state_dict("flux_kontext", lora, alpha=8)
    # lora_down/lora_up are the kohya names of lora_A/lora_B; ComfyUI's `load_lora` reads both spellings alike.
    kohya = {k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v for k, v in comfy.items()}
    back = {k.removeprefix("transformer."): v for k, v in FluxKontextPipeline.lora_state_dict(kohya).items()}

    modules = {k.rsplit(".", 2)[0] for k in back}
    assert set(chosen) <= modules <= set(shapes)
    for n in modules:
        x = torch.randn(shapes[n][1], 3, generator=g)
        got = back[f"{n}.lora_B.weight"] @ (back[f"{n}.lora_A.weight"] @ x)
        if n in chosen:
            expected = 2 * lora[f"transformer.{n}.lora_B.weight"] @ (lora[f"transformer.{n}.lora_A.weight"] @ x)
            assert relative_error(got, expected) <= 1e-5, n
        else:  # an unadapted part of a fused linear: its zero block
            assert not got.any(), n


@pytest.mark.parametrize(
    ("model", "config"),
    [
        ("qwen_edit", {}),
        ("qwen_edit_plus", {}),
        ("qwen_edit_2511", {}),
        ("qwen_edit", {"rank_pattern": {"to_k": 2}, "alpha_pattern": {"to_q": 2.0, "img_mlp.net.2": 16.0}}),
        ("qwen_edit", {"use_rslora": True}),
    ],
    ids=["edit", "edit_plus", "edit_2511", "rank_alpha_patterns", "rslora"],
)
def test_qwen_export_loads_into_diffusers_with_the_same_effect(tiny_checkpoint, tmp_path, model, config):
    path = tiny_checkpoint(model)
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=QWEN_TARGETS, **config)
    diffusers_file = save_random_lora(model, tmp_path, lora_config)
    comfy_file = save_comfyui_lora(model, diffusers_file, tmp_path / "comfyui" / "lora.safetensors")
    assert os.listdir(comfy_file.parent) == ["lora.safetensors"], "no temporary file may be left behind"
    assert set(load_file(comfy_file)) == {
        "diffusion_model." + k.removeprefix("transformer.") for k in load_file(diffusers_file)
    }

    outs = []
    for file in (diffusers_file, comfy_file, None):
        pipe = MODELS[model].pipeline_class.from_pretrained(path)
        if file is not None:
            pipe.load_lora_weights(file)
        outs.append(run_qwen(pipe.transformer))
    reference, out, base = outs
    assert relative_error(out, reference) <= 1e-5
    assert relative_error(base, reference) > 1e-2


@pytest.mark.parametrize("model", ["flux2_klein", "flux2_dev"])
def test_flux2_export_is_bfl_named_and_loads_into_diffusers_with_the_same_effect(tiny_checkpoint, tmp_path, model):
    """diffusers reads `diffusion_model.` BFL-named FLUX.2 LoRAs (its `_convert_non_diffusers_flux2_lora_to_diffusers`,
    the names of ComfyUI's FLUX.2): the export must load back to the diffusers file's effect."""
    path = tiny_checkpoint(model)
    targets = adapted_modules(tiny_transformer(model), FLUX2_LINEARS)
    diffusers_file = save_random_lora(model, tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    comfy_file = save_comfyui_lora(model, diffusers_file, tmp_path / "comfyui" / "lora.safetensors")
    modules = {k.removeprefix("diffusion_model.").rsplit(".lora_", 1)[0] for k in load_file(comfy_file)}
    expected = {"img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "final_layer.linear"}
    expected |= {f"double_stream_modulation_{s}.lin" for s in ("img", "txt")} | {"single_stream_modulation.lin"}
    expected |= {f"double_blocks.{i}.{n}" for i in range(2) for n in ("img_attn.qkv", "txt_attn.qkv")}
    expected |= {f"double_blocks.{i}.{s}_{n}" for i in range(2) for s in ("img", "txt") for n in ("attn.proj", "mlp.0")}
    expected |= {f"double_blocks.{i}.{s}_mlp.2" for i in range(2) for s in ("img", "txt")}
    expected |= {f"single_blocks.{i}.linear{n}" for i in range(2) for n in (1, 2)}
    if model == "flux2_dev":
        expected |= {"guidance_in.in_layer", "guidance_in.out_layer"}
    assert modules == expected

    outs = []
    for file in (diffusers_file, comfy_file, None):
        pipe = MODELS[model].pipeline_class.from_pretrained(path)
        if file is not None:
            pipe.load_lora_weights(file)
        outs.append(run_flux2(pipe.transformer))
    reference, out, base = outs
    assert relative_error(out, reference) <= 1e-5
    assert relative_error(base, reference) > 1e-2


def test_flux2_final_norm_export_swaps_scale_and_shift():
    """BFL's final modulation emits (shift, scale), diffusers' (scale, shift) (diffusers' FLUX.2 checkpoint converter
    swaps them): a LoRA on it is exported swapped, as for FLUX.1. (diffusers' FLUX.2 LoRA converter does not swap
    back; no default target adapts this layer.)"""
    a, b = torch.randn(2, 32), torch.randn(64, 2)
    lora = {"transformer.norm_out.linear.lora_A.weight": a, "transformer.norm_out.linear.lora_B.weight": b}
    out = comfyui_state_dict("flux2_klein", lora)
    assert torch.equal(out["diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight"], torch.cat([b[32:], b[:32]]))


def test_explicit_alpha_stands_in_for_missing_metadata(tmp_path):
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=QWEN_TARGETS)
    with_metadata = save_random_lora("qwen_edit", tmp_path / "meta", lora_config)
    without = save_random_lora("qwen_edit", tmp_path / "plain", lora_config, metadata=False)
    with safe_open(with_metadata, framework="pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.lora_alpha"] == 8

    from_metadata = load_file(save_comfyui_lora("qwen_edit", with_metadata, tmp_path / "a.safetensors"))
    explicit = load_file(save_comfyui_lora("qwen_edit", without, tmp_path / "b.safetensors", alpha=8))
    unscaled = load_file(save_comfyui_lora("qwen_edit", without, tmp_path / "c.safetensors"))
    original = load_file(without)
    for key, value in original.items():
        comfy_key = "diffusion_model." + key.removeprefix("transformer.")
        assert torch.equal(explicit[comfy_key], from_metadata[comfy_key])
        assert torch.equal(unscaled[comfy_key], value), "no alpha anywhere means scale 1, as diffusers loads it"
        assert torch.equal(explicit[comfy_key], 2 * value if ".lora_B." in key else value), "alpha 8 / rank 4"


def test_bfloat16_weights_stay_bfloat16():
    lora = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32).bfloat16(),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4).bfloat16(),
    }
    comfy = comfyui_state_dict("flux_kontext", lora, alpha=8)
    assert {v.dtype for v in comfy.values()} == {torch.bfloat16}
    b = comfy["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"]
    assert b.shape == (96, 4)
    assert torch.equal(b[:32], 2 * lora["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"])
    assert not b[32:].any()


def zero_pair(module: str, out_features: int) -> dict[str, torch.Tensor]:
    """A diffusers-keyed rank-4 LoRA pair on a 32-feature input of transformer module `module`."""
    return {
        f"transformer.{module}.lora_A.weight": torch.zeros(4, 32),
        f"transformer.{module}.lora_B.weight": torch.zeros(out_features, 4),
    }


Q = "transformer.transformer_blocks.0.attn.to_q"


@pytest.mark.parametrize(
    ("model", "lora", "message"),
    [
        ("flux_kontext", zero_pair("single_transformer_blocks.0.attn.to_out.0", 32), "has no matching linear"),
        ("flux_kontext", zero_pair("pos_embed.proj", 32), "has no matching linear"),
        ("flux_kontext", zero_pair("single_transformer_blocks.0.proj_mlp", 32), "output rows, expected 128"),
        ("qwen_edit", {"text_encoder.model.layers.0.q_proj.lora_A.weight": torch.zeros(4, 32)}, "cannot export"),
        ("qwen_edit", {f"{Q}.lora_magnitude_vector": torch.zeros(32)}, "cannot export"),
        ("qwen_edit", {**zero_pair("transformer_blocks.0.attn.to_q", 32), f"{Q}.lora_B.bias": torch.zeros(32)}, "bias"),
        ("qwen_edit", {f"{Q}.lora_A.weight": torch.zeros(4, 32)}, "has no lora_B matrix"),
        ("sdxl", zero_pair("transformer_blocks.0.attn.to_q", 32), "unknown model"),
    ],
    ids=[
        "flux_no_bfl_linear",
        "flux_unknown_module",
        "flux_wrong_rows",
        "text_encoder",
        "dora",
        "lora_bias",
        "missing_b",
        "unknown_model",
    ],
)
def test_unexportable_input_raises(model, lora, message):
    with pytest.raises(ValueError, match=message):
        comfyui_state_dict(model, lora)
