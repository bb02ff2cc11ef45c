"""Attention over a padded mixed batch without a dense mask, and the hooks that install it on stock models.

A mixed batch travels through the stock diffusers forward as one padded tensor. The stock model is left
untouched except for two installed pieces: attention processors that, when handed a `MixedAttention`
through the attention kwargs, attend over each sample's valid tokens only, and a `RopeOverride` that
hands the blocks per-sample rotary tables computed once per forward. Without those kwargs both pieces
delegate to the stock objects they replaced, so stock calls (pipelines, same-size batches) are unchanged.

Backends:
- ``masked``: SDPA with a broadcast (B, 1, 1, S) key-padding mask; works on every device. Never cuDNN attention
  (`common.sdpa.without_cudnn`): with a mask it gave padded positions NaN or nonzero gradients (torch 2.11, H200).
- ``split``: one unmasked SDPA call per sample over its valid tokens only; exact and mask-free.
- ``varlen``: PyTorch's variable-length flash attention over the packed valid tokens (CUDA, fp16/bf16).
- ``auto``: ``varlen`` where it can run, else ``split``.
"""

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import Tensor, nn

from common.sdpa import without_cudnn

BACKENDS = ("auto", "masked", "split", "varlen")


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether PyTorch's variable-length flash attention can run for this device and dtype."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The concrete backends that run for this device and dtype (what tests and benchmarks iterate over)."""
    return ["masked", "split"] + (["varlen"] if varlen_available(device, dtype) else [])


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn a requested backend into the one that runs here: ``auto`` picks the fastest exact one available."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "varlen" if varlen_available(device, dtype) else "split"
    if backend == "varlen" and not varlen_available(device, dtype):
        return "split"
    return backend


@dataclass
class MixedAttention:
    """Which tokens of a padded joint sequence are real, in the forms each backend needs (built once per forward)."""

    backend: str
    key_mask: Tensor  # (B, 1, 1, S) bool, True on real tokens
    index: Tensor  # (sum L_i,) positions of real tokens in the flattened (B*S) sequence, sample-major
    lengths: list[int]  # L_i, real tokens of each sample
    cu_seqlens: Tensor  # (B+1,) int32 cumulative L_i, for varlen kernels

    @functools.cached_property
    def attend_mask(self) -> Tensor:
        """`key_mask` for the `masked` backend (built once per layout, not per layer): a sample without real tokens
        in this stream (FLUX.3's references of a sample that has none) attends to its padding instead of to
        nothing; its rows are zeroed after, and no kernel meets a fully masked row, whose output and gradients are
        kernel-dependent (NaN in some)."""
        return self.key_mask | ~self.key_mask.any(-1, keepdim=True)

    @classmethod
    def from_segments(
        cls, segments: Sequence[Sequence[tuple[int, int]]], seq_len: int, backend: str, device: torch.device
    ) -> "MixedAttention":
        """Build from each sample's real (start, stop) ranges in a joint sequence of length `seq_len`."""
        ranges = [
            [torch.arange(b * seq_len + lo, b * seq_len + hi) for lo, hi in segs] for b, segs in enumerate(segments)
        ]
        index = torch.cat([r for rs in ranges for r in rs])
        lengths = [sum(hi - lo for lo, hi in segs) for segs in segments]
        key_mask = torch.zeros(len(segments), seq_len, dtype=torch.bool)
        key_mask.view(-1)[index] = True
        cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        return cls(
            backend=backend,
            key_mask=key_mask[:, None, None, :].to(device, non_blocking=True),
            index=index.to(device, non_blocking=True),
            lengths=lengths,
            cu_seqlens=cu_seqlens.to(device, non_blocking=True),
        )

    @classmethod
    def from_mask(cls, valid: Tensor, backend: str) -> "MixedAttention":
        """Build from a (B, S) bool mask of real tokens on the device (reading the lengths back: one device sync)."""
        lengths = valid.sum(1)
        return cls(
            backend=backend,
            key_mask=valid[:, None, None, :],
            index=valid.flatten().nonzero().squeeze(1),
            lengths=lengths.tolist(),
            cu_seqlens=torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32),
        )


def _scatter_packed(packed: Tensor, like: Tensor, index: Tensor) -> Tensor:
    """Place packed (sum L_i, H, D) rows back into a zero (B, S, H, D) tensor shaped like `like`."""
    batch, seq = like.shape[:2]
    out = packed.new_zeros(batch * seq, *packed.shape[1:]).index_copy(0, index, packed)
    return out.view(batch, seq, *packed.shape[1:])


@torch.compiler.disable
def mixed_attention(query: Tensor, key: Tensor, value: Tensor, mixed: MixedAttention) -> Tensor:
    """Joint attention of (B, S, H, D) tensors where each sample sees only its own real keys; padded rows are 0.

    Kept out of compiled graphs (`--compile`): it branches and loops on the batch's Python lengths, which would make
    every new batch layout a recompile; the attention kernels themselves gain nothing from tracing.
    """
    if mixed.backend == "masked":
        with without_cudnn():
            out = dispatch_attention_fn(query, key, value, attn_mask=mixed.attend_mask)
        return torch.where(mixed.key_mask[:, 0, 0, :, None, None], out, out.new_zeros(()))
    flat = [t.flatten(0, 1).index_select(0, mixed.index) for t in (query, key, value)]
    if mixed.backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        longest = max(mixed.lengths)
        packed = varlen_attn(*flat, mixed.cu_seqlens, mixed.cu_seqlens, longest, longest)
    else:
        chunks = zip(*(t.split(mixed.lengths) for t in flat), strict=True)
        packed = torch.cat([dispatch_attention_fn(q[None], k[None], v[None])[0] for q, k, v in chunks])
    return _scatter_packed(packed, query, mixed.index)


class WrappingProcessor:
    """Base of the mixed-batch processors: keeps the stock processor it replaced, for calls without `mixed`."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, stock: object) -> None:
        self.stock = stock


class RopeOverride(nn.Module):
    """Stands in for a model's position embedder: returns the armed per-sample tables, else defers to stock.

    Armed with one value per embedder call of the coming forward, in call order (FLUX.1 and Qwen call it once,
    FLUX.2 twice: image ids, then text ids); each call consumes the next, later calls go to the stock embedder.
    """

    def __init__(self, stock: nn.Module) -> None:
        super().__init__()
        self.stock = stock
        self._armed: list[object] = []

    def arm(self, *tables: object) -> None:
        """Make the next forward calls return `tables` in order (per-sample tables for the coming mixed batch)."""
        self._armed = list(tables)

    def disarm(self) -> None:
        """Drop tables that were not consumed, e.g. after a failed forward."""
        self._armed = []

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003 - mirrors whatever the stock embedder takes
        if not self._armed:
            return self.stock(*args, **kwargs)
        return self._armed.pop(0)


def base_model(model: nn.Module) -> nn.Module:
    """The diffusers model inside DDP/compile/PEFT wrappers, where processors and embedders live."""
    model = extract_model_from_parallel(model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def install(model: nn.Module, wrappers: Mapping[type, type], backend: str) -> nn.Module:
    """Wrap the stock processors and position embedder of `model` once (idempotent); set the mixed backend.

    `wrappers` maps each stock processor class the model may hold to the mixed-batch processor that wraps it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    model = base_model(model)
    if not isinstance(model.pos_embed, RopeOverride):
        processors = {}
        for name, proc in model.attn_processors.items():
            wrapper = wrappers.get(type(proc))
            if wrapper is None:
                raise TypeError(f"{name}: cannot run mixed batches with processor {type(proc).__name__}")
            processors[name] = wrapper(proc)
        model.set_attn_processor(processors)
        model.pos_embed = RopeOverride(model.pos_embed)
    model._mixed_attention_backend = backend
    return model


def rotate_pairs(x: Tensor) -> Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the partner term of interleaved rotary embeddings."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    return torch.stack([-x_imag, x_real], dim=-1).flatten(-2)


def apply_rope_real(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Interleaved real rotary embedding with per-sample (B, S, D) tables on (B, S, H, D) inputs (FLUX)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.float() * cos + rotate_pairs(x).float() * sin).to(x.dtype)


def apply_rope_complex(x: Tensor, freqs: Tensor) -> Tensor:
    """Complex rotary embedding with per-sample (B, S, D/2) tables on (B, S, H, D) inputs (Qwen-Image)."""
    x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_complex * freqs[:, :, None, :]).flatten(3).type_as(x)
