"""common.lora: adapters that train, exclusions DDP needs, an exact resume round trip, and saved files that every
loader applies alike whatever --lora_alpha is."""

import json

import pytest
import torch
from diffusers import QwenImageEditPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from common.lora import STATE_FILE, adapted_modules, add_lora, load_lora, save_lora, save_lora_state
from common.models import flux2, get_model
from common.models.flux_kontext import LORA_TARGETS as FLUX_TARGETS
from common.models.qwen_edit import LORA_TARGETS, unused_modules
from common.tiny import tiny_transformer


def test_qwen_unused_text_outputs_of_the_last_block_get_no_adapter():
    transformer = tiny_transformer("qwen_edit")
    transformer.img_in.weight.requires_grad_(True)
    add_lora(transformer, 4, 4.0, list(LORA_TARGETS), unused_modules(transformer))
    last = len(transformer.transformer_blocks) - 1
    adapted = {n.rsplit(".lora_", 1)[0] for n, p in transformer.named_parameters() if p.requires_grad}
    assert not any(n.startswith(f"transformer_blocks.{last}.txt_mlp") for n in adapted)
    assert f"transformer_blocks.{last}.attn.add_k_proj" in adapted and "transformer_blocks.0.txt_mlp.net.2" in adapted
    assert "img_in" not in adapted, "base weights must be frozen"
    # Every remaining LoRA parameter gets a gradient from an image-token loss, as DDP requires.
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    g = torch.Generator().manual_seed(0)
    out = transformer(
        hidden_states=torch.randn(1, 6, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 4, 32, generator=g),
        timestep=torch.full((1,), 0.5),
        img_shapes=[[(1, 2, 3)]],
        return_dict=False,
    )[0]
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in transformer.parameters() if p.requires_grad)


def test_checkpoint_state_round_trips_exactly(tmp_path):
    source, target = tiny_transformer("qwen_edit", seed=0), tiny_transformer("qwen_edit", seed=0)
    for model in (source, target):
        add_lora(model, 4, 3.0, ["to_q", "to_v"])  # scale 0.75: folding it into B would not round-trip bitwise
    with torch.no_grad():
        for param in source.parameters():
            if param.requires_grad:
                param.normal_()
    path = save_lora(QwenImageEditPipeline, source, tmp_path)
    assert path.name == "pytorch_lora_weights.safetensors" and not list(tmp_path.glob(".lora-*"))
    assert save_lora_state(source, tmp_path).name == STATE_FILE
    load_lora(target, tmp_path)
    theirs = dict(target.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in source.named_parameters() if p.requires_grad)


def test_load_lora_names_a_checkpoint_without_state(tmp_path):
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        load_lora(tiny_transformer("qwen_edit"), tmp_path)


def linear_weights(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights of every linear layer by module name, as plain tensors (PEFT-wrapped layers by their base layer)."""
    return {
        name.removesuffix(".base_layer"): module.weight.detach().clone()
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and ".lora_" not in name
    }


@pytest.mark.parametrize(
    ("model", "targets"), [("flux_kontext", list(FLUX_TARGETS)), ("qwen_edit", list(LORA_TARGETS))]
)
@pytest.mark.parametrize("alpha", [6.0, 3.0])
def test_saved_lora_applies_the_same_delta_with_or_without_its_metadata(
    tiny_checkpoint, tmp_path, model, targets, alpha
):
    """diffusers (reads lora_alpha from the metadata) and a loader that ignores it, as ComfyUI does for keys without
    `.alpha` (W + B @ A), fuse identical weights, equal to the adapter's trained delta alpha / r * B @ A."""
    path = tiny_checkpoint(model)
    pipeline = get_model(model).pipeline_class
    trained = pipeline.from_pretrained(path).transformer
    add_lora(trained, 4, alpha, targets)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    lora_file = save_lora(pipeline, trained, tmp_path)
    with safe_open(lora_file, framework="pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.lora_alpha"] == metadata["transformer.r"] == 4

    pipe = pipeline.from_pretrained(path)
    pipe.load_lora_weights(tmp_path)
    pipe.fuse_lora()
    fused_by_diffusers = linear_weights(pipe.transformer)

    plain = pipeline.from_pretrained(path).transformer
    original = linear_weights(plain)
    tensors = load_file(lora_file)
    modules = {key.removeprefix("transformer.").rsplit(".lora_", 1)[0] for key in tensors}
    linears = dict(plain.named_modules())
    with torch.no_grad():
        for module in modules:
            a, b = tensors[f"transformer.{module}.lora_A.weight"], tensors[f"transformer.{module}.lora_B.weight"]
            linears[module].weight += b @ a
    fused_plainly = linear_weights(plain)

    assert fused_by_diffusers.keys() == fused_plainly.keys()
    assert all(torch.equal(fused_by_diffusers[n], fused_plainly[n]) for n in fused_plainly)
    layers = dict(trained.named_modules())
    for module in modules:
        expected = layers[module].get_delta_weight("default")  # alpha / r * B @ A of the adapter as trained
        delta = fused_plainly[module] - original[module]
        assert (delta - expected).abs().max() <= 1e-6 * expected.abs().max(), module
    assert len(modules) > 10


def test_flux2_default_targets_are_every_block_linear():
    """`attn.to_out` names the single blocks' output linear and the double blocks' [linear, dropout] list; only
    layers are adapted, so the FLUX.2 defaults cover every block linear and PEFT never sees the list."""
    transformer = tiny_transformer("flux2_klein")
    modules = adapted_modules(transformer, list(flux2.LORA_TARGETS))
    linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and "blocks." in n]
    assert modules == linears and len(linears) == 2 * 12 + 2 * 2
    assert "single_transformer_blocks.1.attn.to_out" in modules and "transformer_blocks.0.attn.to_out" not in modules
    params = add_lora(transformer, 4, 4.0, list(flux2.LORA_TARGETS))
    assert len(params) == 2 * len(linears)
