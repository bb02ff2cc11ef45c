"""Test-wide settings: no network, W&B offline, deterministic CPU math."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402

from common.tiny import write_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a tiny random checkpoint in the hub layout of MODEL, written once per session."""
    written = {}

    def get(model: str):
        if model not in written:
            written[model] = write_tiny(model, tmp_path_factory.mktemp(model))
        return written[model]

    return get


def randomize_lora(module: torch.nn.Module, seed: int = 0) -> None:
    """Give LoRA B matrices random values (PEFT starts them at zero, which would make A's gradients vanish)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def lora_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the LoRA parameter gradients, by name."""
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()


def check_lora_gradients(
    transformer,
    backend,
    checkpointing,
    install,
    padded_forward,
    stock_single,
    batch,
    input_module,
    target_modules=("to_q", "to_k", "to_v", "to_out.0"),
):
    """Mixed-batch LoRA gradients equal the sum of per-sample stock gradients; padding gets exactly zero gradient.

    Returns the mixed-batch LoRA gradients so the caller can check which tensors were adapted.
    """
    transformer.requires_grad_(False)
    target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=target_modules))
    randomize_lora(transformer)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    install(transformer, backend)
    for h in batch["hidden_states"]:
        h.requires_grad_(True)
    captured = {}

    def keep_padded_input(module, args):
        args[0].retain_grad()
        captured["input"] = args[0]

    hook = input_module.register_forward_pre_hook(keep_padded_input)
    out, valid = padded_forward(transformer, **batch)
    hook.remove()
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid])), "padded outputs must be exactly zero"
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(h.shape[0], out.shape[-1], generator=g) for h in batch["hidden_states"]]
    sum((o[: w.shape[0]] * w).sum() for o, w in zip(out, weights, strict=True)).backward()
    padded_input_grad = captured["input"].grad
    assert torch.equal(padded_input_grad[~valid], torch.zeros_like(padded_input_grad[~valid]))
    assert padded_input_grad[valid].abs().sum() > 0
    mixed = lora_grads(transformer)

    transformer.zero_grad()
    for i, w in enumerate(weights):
        (stock_single(transformer, batch, i) * w).sum().backward()
    summed = lora_grads(transformer)
    for name, grad in mixed.items():
        assert summed[name].abs().sum() > 0, name
        assert relative_error(grad, summed[name]) <= 1e-5, name
    return mixed


def check_flux_control_dropout(transformer, batch, targets, padded_forward, stock_single):
    """FLUX-family control dropout: samples 0 and 2 attend to their first targets[i] (target) tokens only, sample 1
    to everything. The layout keeps every token; a dropped sample's target equals the stock model on the target
    alone."""
    attend = [targets[0], len(batch["hidden_states"][1]), targets[2]]
    out, valid = padded_forward(transformer, **batch, attend=attend)
    assert out.shape[1] == max(len(h) for h in batch["hidden_states"])
    for i in (0, 2):
        alone = {**batch, "hidden_states": [h[: targets[i]] for h in batch["hidden_states"]]}
        alone["img_ids"] = [ids[: targets[i]] for ids in batch["img_ids"]]
        assert (out[i, : targets[i]] - stock_single(transformer, alone, i)).abs().max().item() <= 1e-5
    assert (out[1, : valid[1].sum()] - stock_single(transformer, batch, 1)).abs().max().item() <= 1e-5


@pytest.fixture(scope="class")
def kit(request, tmp_path_factory, tiny_checkpoint):
    """For a trainer test class (MODEL, KIT): its tiny checkpoint, the demo data set's flags, and their cache."""
    import trainer_harness as h

    model, name = request.cls.MODEL, request.cls.KIT
    root = tmp_path_factory.mktemp(name)
    checkpoint = tiny_checkpoint(name)
    flags = h.data_flags(model, checkpoint, h.dataset(root, model))
    return {"root": root, "checkpoint": checkpoint, "flags": flags, "cache": h.precompute(model, flags, root / "c")}


@pytest.fixture(scope="class")
def cached_run(request, kit):
    """A short cached training run of the class's trainer: (output folder, LoRA file)."""
    import trainer_harness as h

    out = kit["root"] / "cached"
    argv = [*kit["flags"], "--cache_dir", str(kit["cache"]), *h.train_flags(out, "--export_comfyui")]
    return out, h.train_inprocess(request.cls.MODEL, argv)
