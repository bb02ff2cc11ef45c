"""Mixed-resolution forward for a stock diffusers `Flux2Transformer2DModel` (FLUX.2 [klein] and [dev]).

Same layout as FLUX.1 (`common.flux.run_padded`): [text (T, same for every sample: the pipelines pad prompts to
`max_sequence_length`) | sample i's target tokens, then its references' tokens (N_i) | padding]. Ids have four
axes (t, h, w, l): the target has t = 0, reference k has t = 10 (k + 1), text tokens count along l.

The stock forward calls its position embedder twice (image ids, then text ids) and concatenates the two tables
along dim 0, its sequence axis. The override hands it per-sample tables laid out sequence-major, (S, B, D), so
that this concatenation still joins text and image along the sequence; the installed processors turn them back
into (B, S, D). Double-stream blocks reuse the FLUX.1 processor (FLUX.2's attention has the same projections);
single-stream blocks, whose attention is fused with the MLP, get their own.
"""

import torch
from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor
from torch import Tensor, nn

from common.attention import (
    MixedAttention,
    RopeOverride,
    WrappingProcessor,
    apply_rope_real,
    install,
    mixed_attention,
)
from common.flux import FluxMixedAttnProcessor, run_padded
from common.padding import unpad

REFERENCE_TIME_SCALE = 10  # the pipelines' `_prepare_image_ids(scale=10)`: reference k sits at t = 10 (k + 1)


def _batch_major(rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(S, B, D) sequence-major per-sample tables, as the stock forward concatenated them, to (B, S, D)."""
    return rope[0].transpose(0, 1), rope[1].transpose(0, 1)


class Flux2MixedAttnProcessor(FluxMixedAttnProcessor):
    """`Flux2AttnProcessor` (double-stream blocks) with per-sample rotary tables and padding-aware attention."""

    batch_major = staticmethod(_batch_major)


class Flux2MixedParallelSelfAttnProcessor(WrappingProcessor):
    """`Flux2ParallelSelfAttnProcessor` (single-stream blocks) with per-sample rotary tables and padding-aware
    attention; stock behaviour when called without `mixed`."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        mixed: MixedAttention | None = None,
    ) -> Tensor:
        if mixed is None:
            return self.stock(attn, hidden_states, attention_mask, image_rotary_emb)
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = hidden_states.split([local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)

        cos, sin = _batch_major(image_rotary_emb)
        query = apply_rope_real(query, cos, sin)
        key = apply_rope_real(key, cos, sin)
        hidden_states = mixed_attention(query, key, value, mixed).flatten(2, 3).to(query.dtype)
        hidden_states = torch.cat([hidden_states, attn.mlp_act_fn(mlp_hidden_states)], dim=-1)
        return attn.to_out(hidden_states)


def install_mixed(transformer: nn.Module, backend: str = "auto") -> None:
    """Install the mixed-batch processors and position embedder on a stock FLUX.2 transformer (idempotent)."""
    install(
        transformer,
        {
            Flux2AttnProcessor: Flux2MixedAttnProcessor,
            Flux2ParallelSelfAttnProcessor: Flux2MixedParallelSelfAttnProcessor,
        },
        backend,
    )


def _arm_sequence_major(embedder: RopeOverride, rope: tuple[Tensor, Tensor], text_len: int) -> None:
    """Arm the override for the stock forward's two embedder calls: image tables first, then text tables."""
    cos, sin = (t.transpose(0, 1) for t in rope)
    embedder.arm((cos[text_len:], sin[text_len:]), (cos[:text_len], sin[:text_len]))


def image_ids(height: int, width: int, t: int = 0) -> Tensor:
    """(height*width, 4) int64 ids (t, h, w, 0) of a packed latent grid, as the pipelines' `_prepare_latent_ids`."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(height), torch.arange(width), torch.arange(1))


def reference_ids(grids: list[tuple[int, int]]) -> Tensor:
    """Ids of a sample's references, packed one after another: reference k at t = 10 (k + 1), as the pipelines'
    `_prepare_image_ids`. `grids`: each reference's packed (height, width); (0, 4) when there are none."""
    ids = [image_ids(h, w, REFERENCE_TIME_SCALE * (k + 1)) for k, (h, w) in enumerate(grids)]
    return torch.cat(ids) if ids else torch.zeros(0, 4, dtype=torch.int64)


def sample_ids(target: tuple[int, int], references: list[tuple[int, int]]) -> Tensor:
    """(N_i, 4) ids of one sample's tokens, target grid first then its references, as the pipelines concatenate."""
    return torch.cat([image_ids(*target), reference_ids(references)])


def text_ids(length: int) -> Tensor:
    """(length, 4) int64 ids (0, 0, 0, l) of the prompt tokens, as the pipelines' `_prepare_text_ids`."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))


def padded_forward(
    transformer: nn.Module,
    hidden_states: list[Tensor],
    img_ids: list[Tensor],
    encoder_hidden_states: Tensor,
    txt_ids: Tensor,
    timestep: Tensor,
    guidance: Tensor | None = None,
    attend: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """`mixed_forward` that returns the padded output (B, N_max, C_out), zero on padding, and its (B, N_max) mask.

    Equal layouts take the stock forward unchanged; mixed layouts are padded, padding is excluded from attention
    and each sample gets its own rotary positions (see `common.flux.run_padded`). `timestep` is sigma in [0, 1] per
    sample, as the pipelines pass it (t / 1000); `guidance` only for checkpoints with a guidance embedder ([dev]).
    `attend[i]`: only sample i's first attend[i] image tokens take part in attention (control dropout).
    """
    return run_padded(
        transformer,
        hidden_states,
        img_ids,
        txt_ids,
        attend,
        install_mixed,
        _arm_sequence_major,
        encoder_hidden_states=encoder_hidden_states,
        timestep=timestep,
        guidance=guidance,
    )


def mixed_forward(
    transformer: nn.Module,
    hidden_states: list[Tensor],
    img_ids: list[Tensor],
    encoder_hidden_states: Tensor,
    txt_ids: Tensor,
    timestep: Tensor,
    guidance: Tensor | None = None,
    attend: list[int] | None = None,
) -> list[Tensor]:
    """Run sample i's packed tokens (N_i, C), target first then its references, with their (N_i, 4) ids as if
    alone; text (B, T, D) with (T, 4) ids. Returns sample i's output (N_i, C_out). See `padded_forward`."""
    out, _ = padded_forward(
        transformer, hidden_states, img_ids, encoder_hidden_states, txt_ids, timestep, guidance, attend
    )
    return unpad(out, [h.shape[0] for h in hidden_states])
