"""Where and how the frozen base weights live: fp8 storage, bitsandbytes nf4/int8, and block offloading.

Model-independent mechanics behind `--base_precision` and `--offload_blocks` (and the encoders' offloading):

- `fp8`: every frozen linear layer inside the transformer's blocks stores its weight as float8 e4m3 with one
  float32 scale per output row (as musubi-tuner's `--fp8_scaled`; measured closer to the full-precision outputs than
  diffusers' unscaled layerwise casting, see README "Memory") and computes in the dtype it was loaded in.
- `nf4` / `int8`: bitsandbytes through diffusers' `BitsAndBytesConfig` at `from_pretrained` (QLoRA, as the diffusers
  examples' `--bnb_quantization_config_path`); CUDA only, refused in one line before anything loads elsewhere.
- `--offload_blocks`: the frozen tensors of each block live in (pinned) CPU memory; an `OffloadChain` keeps at most
  two blocks' of them on the device, the one computing and the one that runs next, copied on a side CUDA stream
  (forward: the next block; backward: the previous one, for its recomputation and its frozen layers' gradients).

Both are diffusers `ModelHook`s. Frozen linear layers run through `FrozenLinear`, an autograd function that saves no
weight for backward but fetches (and dequantizes) it again there, so an fp8 base never keeps full-precision copies
alive between forward and backward, and an offloaded block's weights need not stay on the device. Nothing
module-level refers to a model: a deleted one is freed by the garbage collector (diffusers' hooks refer to their
modules in a cycle, so `del` alone frees hooked layers only once the collector runs: call `gc.collect()`). LoRA layers
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
        if ctx.hook.block is not None:  # offloaded: on the device again, the block before this one prefetched
            ctx.hook.block.chain.acquire(ctx.hook.block.index)
        weight = _frozen_weight(ctx.hook, grad.device)
        return grad.matmul(weight.to(grad.dtype)).to(ctx.x_dtype), None


class FrozenLinearHook(ModelHook):
    """Runs a frozen nn.Linear through `FrozenLinear`; with fp8, stores its weight as e4m3 + per-row scale."""

    _is_stateful = False

    def __init__(self, fp8: bool) -> None:
        """`fp8`: quantize the weight when the hook is installed."""
        super().__init__()
        self.fp8 = fp8
        self.block: BlockOffloadHook | None = None  # with --offload_blocks: the hook of the block it belongs to

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


class OffloadChain:
    """Groups of frozen tensors that live in (pinned) CPU memory, in the order their blocks run, and which of them
    are on the compute device now.

    `acquire(i)` puts group i on the device and starts copying the group that runs after it (i + 1 in forward,
    i - 1 in backward: a block recomputed by gradient checkpointing, or a `FrozenLinear` fetching its weight for
    backward); every other group is offloaded first, so at most two groups are on the device at any time, however
    the forward ends (checkpointing's recomputation stops early, without the block's post-forward). On CUDA the copies
    run on a side stream. It holds tensors, never modules: nothing here keeps a deleted model alive.
    """

    def __init__(self, device: torch.device) -> None:
        """`device`: where the blocks compute (a real copy is made there even on the CPU)."""
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.tensors: list[list[Tensor]] = []
        self.host: list[list[Tensor]] = []
        self.resident: dict[int, torch.cuda.Event | None] = {}  # groups on the device (at most two): copy done

    def add(self, tensors: list[Tensor]) -> int:
        """Offload a group of tensors (the next one to run) to CPU memory, pinned on CUDA; returns its index."""
        host = [t.data.to("cpu") for t in tensors]
        host = [h.pin_memory() for h in host] if self.stream is not None else host
        for tensor, copy in zip(tensors, host, strict=True):
            tensor.data = copy
        self.tensors.append(tensors)
        self.host.append(host)
        return len(self.tensors) - 1

    def acquire(self, index: int) -> None:
        """Make group `index` usable on the device now and prefetch the group that runs after it."""
        ahead = index - 1 if torch._C._current_graph_task_id() != -1 else index + 1  # in backward: reverse order
        for other in [i for i in self.resident if i not in (index, ahead)]:
            self.offload(other)
        if index not in self.resident:
            self.onload(index)
        if self.stream is not None:  # wait for this group's copies only, not for a prefetch still under way
            torch.cuda.current_stream(self.device).wait_event(self.resident[index])
        if 0 <= ahead < len(self.tensors) and ahead not in self.resident:
            self.onload(ahead)

    def onload(self, index: int) -> None:
        """Copy group `index` onto the device (asynchronously on the side stream on CUDA)."""
        with torch.cuda.stream(self.stream):  # None: no-op
            for tensor, host in zip(self.tensors[index], self.host[index], strict=True):
                tensor.data = host.to(self.device, non_blocking=self.stream is not None, copy=True)
            self.resident[index] = None if self.stream is None else self.stream.record_event()

    def offload(self, index: int) -> None:
        """Point group `index` back at its CPU copies; its device copies are freed once the kernels queued on the
        compute stream so far are done with them (frozen weights never change, so nothing is copied back)."""
        for tensor, host in zip(self.tensors[index], self.host[index], strict=True):
            if self.stream is not None:
                tensor.data.record_stream(torch.cuda.current_stream(self.device))
            tensor.data = host
        del self.resident[index]

    def release(self) -> None:
        """Offload every group."""
        for index in list(self.resident):
            self.offload(index)


class BlockOffloadHook(ModelHook):
    """Before a block's forward (or its recomputation in backward), acquires its group of an `OffloadChain`."""

    _is_stateful = False

    def __init__(self, chain: OffloadChain, tensors: list[Tensor]) -> None:
        """`tensors`: the block's frozen parameters/buffers, offloaded as the chain's next group."""
        super().__init__()
        self.chain, self.index = chain, chain.add(tensors)

    def pre_forward(self, module: nn.Module, *args, **kwargs) -> tuple[tuple, dict]:
        """Acquire this block's group (which prefetches the next)."""
        self.chain.acquire(self.index)
        return args, kwargs


class ModuleOffloadHook(ModelHook):
    """Around an inference model's own forward: its weights outside the blocks are on the device only during it,
    and its blocks are all offloaded after it."""

    _is_stateful = False

    def __init__(self, tensors: list[Tensor], blocks: OffloadChain) -> None:
        """`tensors`: the model's parameters/buffers outside its blocks; `blocks`: the chain of its blocks."""
        super().__init__()
        self.rest, self.blocks = OffloadChain(blocks.device), blocks
        self.rest.add(tensors)

    def pre_forward(self, module: nn.Module, *args, **kwargs) -> tuple[tuple, dict]:
        """Onload the weights outside the blocks."""
        self.rest.acquire(0)
        return args, kwargs

    def post_forward(self, module: nn.Module, output):
        """Offload everything (inference: no recomputation skips this)."""
        self.rest.release()
        self.blocks.release()
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
    chain = OffloadChain(device) if args.offload_blocks else None
    for block in blocks(transformer):
        frozen = list(_frozen_linears(block))
        linear_hooks = [FrozenLinearHook(fp8) for _ in frozen]
        for layer, hook in zip(frozen, linear_hooks, strict=True):
            if fp8:  # quantized one layer at a time on the device, so the full model is never there
                layer.to(device)
            _register(layer, hook, _FROZEN_LINEAR)
        if chain is not None:
            tensors = [t for layer in frozen for t in (*layer.parameters(), *layer.buffers())]
            block_hook = BlockOffloadHook(chain, tensors)
            _register(block, block_hook, _BLOCK_OFFLOAD)
            for hook in linear_hooks:
                hook.block = block_hook
    offloaded = {id(t) for group in (chain.tensors if chain is not None else []) for t in group}
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
    chain = OffloadChain(device)
    for block in blocks(module):
        _register(block, BlockOffloadHook(chain, [*block.parameters(), *block.buffers()]), _BLOCK_OFFLOAD)
    in_blocks = {id(t) for group in chain.tensors for t in group}
    rest = [t for t in (*module.parameters(), *module.buffers()) if id(t) not in in_blocks]
    _register(module, ModuleOffloadHook(rest, chain), _BLOCK_OFFLOAD)


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
