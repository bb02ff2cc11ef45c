"""common.lora: adapters that train, exclusions DDP needs, and an exact save/load round trip."""

import torch
from diffusers import QwenImageEditPipeline

from common.lora import adapted_modules, add_lora, load_lora, save_lora
from common.models import flux2
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


def test_save_and_load_round_trip_exactly(tmp_path):
    source, target = tiny_transformer("qwen_edit", seed=0), tiny_transformer("qwen_edit", seed=0)
    for model in (source, target):
        add_lora(model, 4, 8.0, ["to_q", "to_v"])
    with torch.no_grad():
        for param in source.parameters():
            if param.requires_grad:
                param.normal_()
    path = save_lora(QwenImageEditPipeline, source, tmp_path)
    assert path.name == "pytorch_lora_weights.safetensors" and not list(tmp_path.glob(".lora-*"))
    load_lora(QwenImageEditPipeline, target, tmp_path)
    theirs = dict(target.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in source.named_parameters() if p.requires_grad)


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
