"""Test-wide settings: no network, W&B offline, deterministic CPU math."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers.training_utils import cast_training_params  # noqa: E402
from peft import LoraConfig  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from common.sdpa import sdpa_kernels  # noqa: E402
from common.tiny import write_tiny  # noqa: E402


@pytest.fixture(autouse=True)
def trainer_sdpa_kernels():
    """Every test's attention runs on the trainers' default SDPA kernels, as training and sampling do: on an H200
    (torch 2.11) the cuDNN attention torch picks first gave the stock path's bf16 LoRA gradients values near 1e35."""
    with sdpa_kernels():
        yield


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip with the reason "needs CUDA" on machines without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


class OneDevice(TorchDispatchMode):
    """Refuse any op whose tensor arguments (0-d scalars aside) sit on more than one device: with `meta` as the compute
    device, a CPU test then catches the CPU/GPU mixing that only a GPU run would otherwise show."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(devices) > 1:
            raise RuntimeError(f"{func} mixes tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def reduce_base(transformer: torch.nn.Module, option: str) -> None:
    """Apply a memory option ("fp8" or "offload") to a transformer's frozen base, as the trainers do, on CPU."""
    from argparse import Namespace

    from common.base_weights import place_base_weights

    for name, param in transformer.named_parameters():
        param.requires_grad_("lora_" in name)
    args = Namespace(base_precision="fp8" if option == "fp8" else "auto", offload_blocks=option == "offload")
    place_base_weights(transformer, args, torch.device("cpu"))


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


BF16_FLOOR = 2.0**-8  # relative error of a couple of bf16 roundings (8 bits of mantissa)
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def backend_cases(with_auto: bool = True) -> list:
    """(device, dtype, backend) parameters: CPU fp32 (masked, split), CUDA fp32 (same) and CUDA bf16 (plus varlen,
    which needs half precision on CUDA); CUDA cases carry the `cuda` mark. `auto` resolves per device and dtype."""
    cases = []
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.float32), ("cuda", torch.bfloat16)):
        backends = ["masked", "split"] + (["varlen"] if dtype == torch.bfloat16 else []) + (["auto"] * with_auto)
        marks = [pytest.mark.cuda] if device == "cuda" else []
        cases += [
            pytest.param(device, dtype, b, id=f"{device}-{_DTYPE_NAMES[dtype]}-{b}", marks=marks) for b in backends
        ]
    return cases


def to_device(batch: dict, device: str, dtype: torch.dtype, keep_dtype: tuple[str, ...] = ("img_ids", "txt_ids")):
    """The batch on `device`, floating tensors in `dtype` except position ids (kept float32, as the pipelines do)."""

    def move(key, value):
        if isinstance(value, list):
            return [move(key, v) for v in value]
        if not isinstance(value, torch.Tensor):
            return value
        cast = value.is_floating_point() and key not in keep_dtype
        return value.to(device, dtype) if cast else value.to(device)

    return {key: move(key, value) for key, value in batch.items()}


def check_backend_runs(backend: str, device: str, dtype: torch.dtype) -> None:
    """A requested concrete backend must really run here (varlen silently falling back to split would hide it)."""
    from common.attention import resolve_backend

    if backend != "auto":
        assert resolve_backend(backend, torch.device(device), dtype) == backend


def _spread_tolerance(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """bf16 tolerance from the stock path's own rounding: twice the largest relative difference between two stock
    runs that differ only in the SDPA kernel (flash/efficient vs the fp32-accumulating math kernel), at least
    BF16_FLOOR. A mixed batch changes kernels and matmul shapes in the same way, so it may differ as much."""
    spread = max(relative_error(o.float(), r.float()) for o, r in zip(other, reference, strict=True))
    return max(2 * spread, BF16_FLOOR)


def check_matches_stock(outputs: list[torch.Tensor], stock, dtype: torch.dtype) -> None:
    """Each mixed-batch output equals `stock(i)`, sample i alone through the stock model: max abs error <= 1e-5 in
    fp32; in bf16, relative error within the stock path's own kernel-to-kernel spread (`_spread_tolerance`)."""
    expected = [stock(i) for i in range(len(outputs))]
    for o, e in zip(outputs, expected, strict=True):
        assert o.shape == e.shape
    if dtype == torch.float32:
        for o, e in zip(outputs, expected, strict=True):
            assert (o - e).abs().max().item() <= 1e-5
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        other = [stock(i) for i in range(len(outputs))]
    tolerance = _spread_tolerance(expected, other)
    for o, e in zip(outputs, expected, strict=True):
        assert relative_error(o.float(), e.float()) <= tolerance


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
    base="auto",
):
    """Mixed-batch LoRA gradients equal the sum of per-sample stock gradients; padding gets exactly zero gradient.
    `base`: "auto", or a memory option of `reduce_base` applied once the LoRA is added (both sides use it).

    `transformer` and `batch` are already on their device and dtype; LoRA weights are float32 as in training.
    fp32: relative error <= 1e-5 per LoRA tensor. bf16: relative error of all LoRA gradients together within the
    stock path's own kernel-to-kernel spread. Returns the mixed-batch LoRA gradients.
    """
    device, dtype = batch["hidden_states"][0].device, batch["hidden_states"][0].dtype
    transformer.requires_grad_(False)
    target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=target_modules))
    cast_training_params(transformer, torch.float32)
    randomize_lora(transformer)
    if base != "auto":
        reduce_base(transformer, base)
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
    weights = [torch.randn(h.shape[0], out.shape[-1], generator=g).to(device, dtype) for h in batch["hidden_states"]]
    sum((o[: w.shape[0]] * w).sum() for o, w in zip(out, weights, strict=True)).backward()
    padded_input_grad = captured["input"].grad
    assert torch.equal(padded_input_grad[~valid], torch.zeros_like(padded_input_grad[~valid]))
    assert padded_input_grad[valid].abs().sum() > 0
    mixed = lora_grads(transformer)

    def stock_grads() -> dict[str, torch.Tensor]:
        transformer.zero_grad()
        for i, w in enumerate(weights):
            (stock_single(transformer, batch, i) * w).sum().backward()
        return lora_grads(transformer)

    summed = stock_grads()
    for name, grad in mixed.items():
        assert summed[name].abs().sum() > 0, name
        if dtype == torch.float32:
            assert relative_error(grad, summed[name]) <= 1e-5, name
    if dtype != torch.float32:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            other = stock_grads()

        def flat(grads):
            return torch.cat([grads[n].flatten() for n in sorted(grads)])

        assert relative_error(flat(mixed), flat(summed)) <= _spread_tolerance([flat(summed)], [flat(other)])
    return mixed


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state that refuses another precision or device; clear it around a test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


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
    """A short cached training run of the class's trainer, validated at its last step: (output folder, LoRA file)."""
    import trainer_harness as h

    out = kit["root"] / "cached"
    validation = [
        "--validation_steps", "4", "--validation_prompts", h.VALIDATION_PROMPT, "--validation_images",
        str(kit["root"] / "data" / "000_control.png"), "--validation_inference_steps", "2",
    ]  # fmt: skip
    argv = [*kit["flags"], "--cache_dir", str(kit["cache"]), *h.train_flags(out, "--export_comfyui", *validation)]
    return out, h.train_inprocess(request.cls.MODEL, argv)
