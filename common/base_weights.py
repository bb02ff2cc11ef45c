"""Where and how the frozen base weights live: fp8 storage, bitsandbytes nf4/int8, and block offloading.

Model-independent mechanics behind `--base_precision` and `--offload_blocks` (and the encoders' offloading):

- `fp8`: every frozen linear layer inside the transformer's blocks stores its weight as float8 e4m3 with one
  float32 scale per output row (as musubi-tuner's `--fp8_scaled`; measured closer to the full-precision outputs than
  diffusers' unscaled layerwise casting, see README "Memory") and computes in the dtype it was loaded in.
- `nf4` / `int8`: bitsandbytes through diffusers' `BitsAndBytesConfig` at `from_pretrained` (QLoRA, as the diffusers
  examples' `--bnb_quantization_config_path`); CUDA only, refused in one line before anything loads elsewhere.
- `--offload_blocks`: the frozen tensors of each block live in (pinned) CPU memory and are copied onto the device
  for the block's forward (on a side CUDA stream, the next block prefetched while this one computes).

Both are diffusers `ModelHook`s. Frozen linear layers run through `FrozenLinear`, an autograd function that saves no
weight for backward but fetches (and dequantizes) it again there, so an fp8 base never keeps full-precision copies
alive between forward and backward, and an offloaded block's weights need not stay on the device. LoRA layers
(trainable) are never touched: their weights stay float32 and on the device.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch import Tensor, nn

from common.errors import UserError

BASE_PRECISIONS = ("auto", "fp8", "nf4", "int8")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_FROZEN_LINEAR = "frozen_linear"
_BLOCK_OFFLOAD = "block_offload"


def add_memory_args(parser: argparse.ArgumentParser) -> None:
    """--base_precision, --offload_blocks and --encoders_on_device (README "Memory" compares them)."""
    memory = parser.add_argument_group("memory")
    memory.add_argument(
        "--base_precision",
        default="auto",
        choices=BASE_PRECISIONS,
        help="storage of the frozen transformer: auto = the training dtype; fp8 = e4m3 with per-row scales; "
        "nf4/int8 = bitsandbytes (CUDA only)",
    )
    memory.add_argument(
        "--offload_blocks", action="store_true", help="keep the frozen blocks in CPU memory, stream each onto the GPU"
    )
    memory.add_argument(
        "--encoders_on_device",
        action="store_true",
        help="without --cache_dir: keep the text encoders and VAE on the GPU (default: in CPU memory, onloaded "
        "only while encoding)",
    )


def check_memory_args(args: argparse.Namespace) -> None:
    """Refuse, in one line and before anything loads, what this machine or combination cannot do."""
    if args.base_precision in ("nf4", "int8") and not torch.cuda.is_available():
        raise UserError(
            f"--base_precision {args.base_precision} needs a CUDA GPU (bitsandbytes quantization through "
            "diffusers' BitsAndBytesConfig runs only on CUDA); use --base_precision fp8 on this machine"
        )
    if args.base_precision in ("nf4", "int8") and args.offload_blocks:
        raise UserError("--offload_blocks works with --base_precision auto or fp8, not with nf4/int8")


def quantize_fp8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(e4m3 weight, float32 scale per output row) with weight ~= q * scale; each row's largest value maps to 448."""
    w = weight.float()
    scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _frozen_weight(hook: FrozenLinearHook, device: torch.device) -> Tensor:
    """The layer's weight on `device` in its compute dtype, wherever and however it is stored right now."""
    module = hook.module
    weight = module.weight.to(device, non_blocking=True)
    if hook.fp8:
        scale = module.weight_scale.to(device, non_blocking=True)
        return weight.float().mul_(scale).to(hook.compute_dtype)  # in place: one float32 temporary, not two
    return weight


class FrozenLinear(torch.autograd.Function):
    """y = x W^T + b for a frozen W: backward fetches W again instead of saving it (only x's gradient is needed)."""

    @staticmethod
    def forward(ctx, x: Tensor, hook: FrozenLinearHook) -> Tensor:  # noqa: D102
        ctx.hook, ctx.x_dtype = hook, x.dtype
        bias = hook.module.bias
        return F.linear(x, _frozen_weight(hook, x.device), None if bias is None else bias.to(x.device))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        weight = _frozen_weight(ctx.hook, grad.device)
        return grad.matmul(weight.to(grad.dtype)).to(ctx.x_dtype), None


class FrozenLinearHook(ModelHook):
    """Runs a frozen nn.Linear through `FrozenLinear`; with fp8, stores its weight as e4m3 + per-row scale."""

    _is_stateful = False

    def __init__(self, fp8: bool) -> None:
        """`fp8`: quantize the weight when the hook is installed."""
        super().__init__()
        self.fp8 = fp8

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        """Remember the layer and its compute dtype; quantize its weight in place (on whatever device it is)."""
        self.module, self.compute_dtype = module, module.weight.dtype
        if self.fp8:
            q, scale = quantize_fp8(module.weight.data)
            module.weight.data = q
            module.register_buffer("weight_scale", scale, persistent=False)
        return module

    def new_forward(self, module: nn.Module, x: Tensor) -> Tensor:
        """The linear layer through `FrozenLinear` (its output dtype follows autocast as F.linear's does)."""
        return FrozenLinear.apply(x, self)


class BlockOffloadHook(ModelHook):
    """Keeps one block's frozen tensors in CPU memory and copies them onto the device around the block's forward.

    On CUDA the copies come from pinned memory on a side stream, and the block that will run next is prefetched
    while this one computes (the next block in forward, the previous one while gradient checkpointing recomputes
    blocks in backward). Offloading only points the tensors back at their CPU copies: frozen weights never change.
    """

    _is_stateful = False

    def __init__(self, tensors: list[Tensor], device: torch.device, stream: torch.cuda.Stream | None) -> None:
        """`tensors`: the block's frozen parameters/buffers; `device`: where it computes."""
        super().__init__()
        self.tensors, self.device, self.stream = tensors, torch.device(device), stream
        pin = stream is not None
        self.cpu = [t.data.to("cpu").pin_memory() if pin else t.data.to("cpu") for t in tensors]
        self.next: BlockOffloadHook | None = None
        self.previous: BlockOffloadHook | None = None

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        """Start offloaded."""
        self.offload()
        return module

    def onload(self) -> None:
        """Copy the tensors onto the device (asynchronously on the side stream on CUDA); no-op if already there."""
        if not self.tensors or self.tensors[0].device == self.device:
            return
        with torch.cuda.stream(self.stream):  # None: no-op
            for tensor, cpu in zip(self.tensors, self.cpu, strict=True):
                tensor.data = cpu.to(self.device, non_blocking=self.stream is not None)

    def offload(self) -> None:
        """Point the tensors back at their CPU copies (the device copies are freed once no kernel uses them)."""
        for tensor, cpu in zip(self.tensors, self.cpu, strict=True):
            if self.stream is not None and tensor.device.type == "cuda":
                tensor.data.record_stream(torch.cuda.current_stream())
            tensor.data = cpu

    def pre_forward(self, module: nn.Module, *args, **kwargs) -> tuple[tuple, dict]:
        """Onload this block (wait for its copies), then start copying the block that runs after it."""
        self.onload()
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)
        upcoming = self.previous if torch._C._current_graph_task_id() != -1 else self.next  # in backward: reverse
        if upcoming is not None and self.stream is not None:
            upcoming.onload()
        return args, kwargs

    def post_forward(self, module: nn.Module, output):
        """Offload after the block's forward (FrozenLinear fetches weights again for backward)."""
        self.offload()
        return output


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: elements of its outermost ModuleLists (as diffusers' block-level offload)."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList | nn.Sequential) and any(True for _ in child.parameters()):
                found.extend(child)
            else:
                visit(child)

    visit(model)
    return found


def _frozen_linears(module: nn.Module) -> Iterator[nn.Linear]:
    """Linear layers of `module` whose parameters are all frozen (so never a LoRA A/B matrix)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear) and not any(p.requires_grad for p in layer.parameters()):
            yield layer


def _register(module: nn.Module, hook: ModelHook, name: str) -> None:
    """Install a diffusers hook on a module."""
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def place_base_weights(transformer: nn.Module, args: argparse.Namespace, device: torch.device) -> None:
    """Apply --base_precision fp8 and --offload_blocks to a transformer loaded (on CPU) by `load_transformer` whose
    LoRA adapter is already added; everything ends up on `device` except what is offloaded. No-op for auto/nf4/int8
    without offloading (those were placed at load time)."""
    fp8 = args.base_precision == "fp8"
    if not (fp8 or args.offload_blocks):
        return
    device = torch.device(device)
    stream = torch.cuda.Stream(device) if args.offload_blocks and device.type == "cuda" else None
    hooks: list[BlockOffloadHook] = []
    for block in blocks(transformer):
        frozen = list(_frozen_linears(block))
        for layer in frozen:  # quantized one layer at a time on the device, so the full model is never there
            if fp8:
                layer.to(device)
            _register(layer, FrozenLinearHook(fp8), _FROZEN_LINEAR)
        if args.offload_blocks:
            tensors = [t for layer in frozen for t in (*layer.parameters(), *layer.buffers())]
            hooks.append(BlockOffloadHook(tensors, device, stream))
            _register(block, hooks[-1], _BLOCK_OFFLOAD)
    for before, after in zip(hooks, hooks[1:], strict=False):
        before.next, after.previous = after, before
    offloaded = {id(t) for hook in hooks for t in hook.tensors}
    for tensor in (*transformer.parameters(), *transformer.buffers()):
        if id(tensor) not in offloaded:
            tensor.data = tensor.data.to(device)
    # Every rank loads the same frozen weights: DDP need not broadcast them (NCCL cannot send CPU-resident ones).
    transformer._ddp_params_and_buffers_to_ignore = [
        name for name, p in transformer.named_parameters() if not p.requires_grad
    ] + [name for name, _ in transformer.named_buffers()]


def is_placed_by_hooks(args: argparse.Namespace) -> bool:
    """Whether some weights must stay where `place_base_weights` put them (accelerate must not move the model)."""
    return args.offload_blocks


def load_transformer(
    transformer_class: type[nn.Module], args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """The frozen base transformer with --base_precision: on `device` for auto/nf4/int8, on CPU for fp8/offloading
    (`place_base_weights` moves it once the LoRA is added)."""
    kwargs = {"subfolder": "transformer", "revision": args.revision, "torch_dtype": dtype}
    if args.base_precision in ("nf4", "int8"):
        from diffusers import BitsAndBytesConfig
        from peft import prepare_model_for_kbit_training

        if args.base_precision == "nf4":
            config = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True,
            )
        else:
            config = BitsAndBytesConfig(load_in_8bit=True)
        model = transformer_class.from_pretrained(
            args.pretrained_model_name_or_path, quantization_config=config, **kwargs
        )
        # As the diffusers QLoRA examples: norms etc. in float32, inputs that need gradients for checkpointing.
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False).to(device)
    model = transformer_class.from_pretrained(args.pretrained_model_name_or_path, **kwargs)
    return model if args.base_precision == "fp8" or args.offload_blocks else model.to(device)


def offload_modules(module: nn.Module, device: torch.device) -> None:
    """Offload a frozen inference model (text encoder, VAE) block by block: each of its blocks, and the rest of it
    as one more group around its own forward, is in CPU memory except while it runs. Inputs stay on `device`."""
    device = torch.device(device)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    in_blocks = set()
    for block in blocks(module):
        tensors = [*block.parameters(), *block.buffers()]
        in_blocks.update(id(t) for t in tensors)
        _register(block, BlockOffloadHook(tensors, device, stream), _BLOCK_OFFLOAD)
    rest = [t for t in (*module.parameters(), *module.buffers()) if id(t) not in in_blocks]
    _register(module, BlockOffloadHook(rest, device, stream), _BLOCK_OFFLOAD)


class ExecutionDevice:
    """Where an offloaded model computes, where diffusers looks for it: its pipelines put a model's inputs on
    `get_module_execution_device(model)` and create latents on `_execution_device`, which read accelerate's
    `_hf_hook.execution_device` and otherwise take the device of the weights (the CPU while offloaded)."""

    def __init__(self, device: torch.device) -> None:
        """`device`: where the model's blocks are onloaded to compute."""
        self.execution_device = device


def offload_pipeline(pipe: object, device: torch.device) -> None:
    """Offload every model of a pipeline loaded on CPU with `offload_modules`; a VAE, whose `encode`/`decode` are
    not its forward, per child (encoder, decoder, quant convs). The pipeline then computes on `device`."""
    for component in pipe.components.values():
        if not isinstance(component, nn.Module):
            continue
        component._hf_hook = ExecutionDevice(torch.device(device))
        parts = list(component.children()) if hasattr(component, "encode") else [component]
        for part in parts:
            if any(True for _ in part.parameters()):
                offload_modules(part, device)
