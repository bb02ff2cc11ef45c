"""common.attention: every backend equals per-sample attention over the real tokens, with no dense mask."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from common.attention import (
    BACKENDS,
    MixedAttention,
    apply_rope_real,
    available_backends,
    mixed_attention,
    resolve_backend,
)
from common.sdpa import enabled_sdpa_kernels, sdpa_kernels

CPU = torch.device("cpu")


def test_from_segments_marks_real_tokens():
    mixed = MixedAttention.from_segments([[(0, 2), (4, 5)], [(0, 6)]], 6, "split", CPU)
    assert mixed.key_mask.shape == (2, 1, 1, 6), "a broadcast key mask, never a dense (B, 1, S, S) one"
    assert mixed.key_mask[:, 0, 0].tolist() == [[True, True, False, False, True, False], [True] * 6]
    assert mixed.index.tolist() == [0, 1, 4, 6, 7, 8, 9, 10, 11]
    assert mixed.lengths == [3, 6]
    assert mixed.cu_seqlens.tolist() == [0, 3, 9]
    assert mixed.cu_seqlens.dtype == torch.int32


def test_auto_is_split_on_cpu_and_varlen_falls_back():
    assert available_backends(CPU, torch.float32) == ["masked", "split"]
    assert resolve_backend("auto", CPU, torch.float32) == "split"
    assert resolve_backend("varlen", CPU, torch.bfloat16) == "split"
    assert resolve_backend("masked", CPU, torch.float32) == "masked"
    with pytest.raises(ValueError, match="flash"):
        resolve_backend("flash", CPU, torch.float32)
    assert set(BACKENDS) == {"auto", "masked", "split", "varlen"}


@pytest.mark.parametrize("backend", available_backends(CPU, torch.float32))
def test_backends_equal_attention_over_real_tokens(backend):
    g = torch.Generator().manual_seed(0)
    segments = [[(0, 3), (5, 9)], [(0, 10)], [(0, 1), (5, 6)]]
    q, k, v = (torch.randn(3, 10, 2, 8, generator=g) for _ in range(3))
    out = mixed_attention(q, k, v, MixedAttention.from_segments(segments, 10, backend, CPU))
    for b, segs in enumerate(segments):
        idx = torch.cat([torch.arange(lo, hi) for lo, hi in segs])
        expected = F.scaled_dot_product_attention(*(t[b, idx].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
        assert (out[b, idx] - expected).abs().max().item() <= 1e-6
        pad = torch.ones(10, dtype=torch.bool)
        pad[idx] = False
        assert torch.equal(out[b, pad], torch.zeros_like(out[b, pad]))


class _WatchSdpa(TorchFunctionMode):
    """Records the SDPA kernels enabled at each scaled_dot_product_attention call, and its boolean masks."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[str]] = []
        self.masks: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "scaled_dot_product_attention":
            self.seen.append(enabled_sdpa_kernels())
            mask = (kwargs or {}).get("attn_mask", args[3] if len(args) > 3 else None)
            if mask is not None:
                self.masks.append(mask)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", available_backends(CPU, torch.float32))
def test_padded_positions_get_zero_outputs_and_zero_gradients(backend, dtype):
    """Every padded query, key and value position: output exactly 0, gradient exactly 0 (so finite), also for a
    sample without any real token (sample 3). `masked` never runs cuDNN attention, even when the user allows it: on
    an H200 (torch 2.11, bf16) it gave padded positions NaN or nonzero gradients; nor does it hand any kernel a row
    with every key masked (kernel-dependent results). CPU has no cuDNN attention and no CPU kernel shows the NaN:
    this checks the exclusions."""
    g = torch.Generator().manual_seed(0)
    segments = [[(0, 3), (5, 9)], [(0, 10)], [(0, 1), (5, 6)], []]
    q, k, v = (torch.randn(4, 10, 2, 8, generator=g).to(dtype).requires_grad_() for _ in range(3))
    mixed = MixedAttention.from_segments(segments, 10, backend, CPU)
    with sdpa_kernels(["cudnn", "flash", "efficient", "math"]), _WatchSdpa() as watch:
        out = mixed_attention(q, k, v, mixed)
    out.float().square().sum().backward()
    pad = ~mixed.key_mask[:, 0, 0]
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))
    for t in (q, k, v):
        assert t.grad[~pad].abs().sum() > 0 and torch.equal(t.grad[pad], torch.zeros_like(t.grad[pad]))
    assert watch.seen and all(("cudnn" in kernels) == (backend != "masked") for kernels in watch.seen)
    assert all(mask.any(-1).all() for mask in watch.masks), "a query row with every key masked"


def test_apply_rope_real_matches_diffusers_per_sample():
    from diffusers.models.embeddings import apply_rotary_emb

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=g)
    cos, sin = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    out = apply_rope_real(x, cos, sin)
    for b in range(2):
        assert torch.equal(out[b : b + 1], apply_rotary_emb(x[b : b + 1], (cos[b], sin[b]), sequence_dim=1))
