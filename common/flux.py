"""Mixed-resolution forward for a stock diffusers `FluxTransformer2DModel` (FLUX.1 / FLUX.1 Kontext).

The joint sequence is [text (T, same for every sample) | image tokens of sample i (N_i) | padding], so each
sample's real tokens are the prefix of length T + N_i. Rotary tables come from the stock `FluxPosEmbed` applied
to every sample's own ids at once; the installed processor applies them per sample and attends with the
selected mask-free backend (see `common.attention`).
"""

import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections
from torch import Tensor, nn

from common.attention import (
    MixedAttention,
    WrappingProcessor,
    apply_rope_real,
    base_model,
    install,
    mixed_attention,
    resolve_backend,
)
from common.padding import pad_sequences, unpad


class FluxMixedAttnProcessor(WrappingProcessor):
    """`FluxAttnProcessor` with per-sample rotary tables and padding-aware attention; stock behaviour otherwise."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        mixed: MixedAttention | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if mixed is None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        cos, sin = image_rotary_emb
        query = apply_rope_real(query, cos, sin)
        key = apply_rope_real(key, cos, sin)
        hidden_states = mixed_attention(query, key, value, mixed).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        text_len = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states[:, :text_len], hidden_states[:, text_len:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def image_ids(height: int, width: int, index: int = 0) -> Tensor:
    """(height*width, 3) position ids of a packed token grid, as the pipelines build them; index 1 marks references."""
    ids = torch.zeros(height, width, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def install_mixed(transformer: nn.Module, backend: str = "auto") -> None:
    """Install the mixed-batch processors and position embedder on a stock FLUX transformer (idempotent)."""
    install(transformer, FluxMixedAttnProcessor, FluxAttnProcessor, backend)


def _stack_if_uniform(hidden_states: list[Tensor], img_ids: list[Tensor]) -> tuple[Tensor, Tensor] | None:
    """Stacked inputs when every sample has the same token layout (the stock path), else None."""
    first = img_ids[0]
    if all(ids.shape == first.shape and torch.equal(ids, first) for ids in img_ids[1:]):
        return torch.stack(hidden_states), first
    return None


def padded_forward(
    transformer: nn.Module,
    hidden_states: list[Tensor],
    img_ids: list[Tensor],
    encoder_hidden_states: Tensor,
    pooled_projections: Tensor,
    timestep: Tensor,
    txt_ids: Tensor,
    guidance: Tensor | None = None,
    attend: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """`mixed_forward` that returns the padded output (B, N_max, C_out), zero on padding, and its (B, N_max) mask.

    Equal layouts take the stock forward unchanged. Mixed layouts are padded; padding is excluded from attention,
    each sample gets its own rotary positions, and padded outputs are zero. `transformer` may be wrapped by
    DDP/accelerate (the call goes through the wrapper so gradients synchronise) and carry a PEFT adapter.
    `attend[i]`: only sample i's first attend[i] image tokens take part in attention (control dropout: the
    reference tokens stay in the sequence, so its layout is unchanged, but nothing attends to them).
    """
    model = base_model(transformer)
    common_kwargs = dict(
        encoder_hidden_states=encoder_hidden_states,
        pooled_projections=pooled_projections,
        timestep=timestep,
        txt_ids=txt_ids,
        guidance=guidance,
        return_dict=False,
    )
    lengths = [h.shape[0] for h in hidden_states]
    attend = lengths if attend is None else attend
    uniform = _stack_if_uniform(hidden_states, img_ids) if attend == lengths else None
    if uniform is not None:
        stacked, ids = uniform
        out = transformer(hidden_states=stacked, img_ids=ids, **common_kwargs)[0]
        return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)

    install_mixed(model, getattr(model, "_mixed_attention_backend", "auto"))
    padded, valid = pad_sequences(hidden_states)
    ids, _ = pad_sequences(img_ids)
    batch, text_len = encoder_hidden_states.shape[:2]
    joint_ids = torch.cat([txt_ids.to(ids).expand(batch, -1, -1), ids], dim=1)
    cos, sin = model.pos_embed.stock(joint_ids.flatten(0, 1))
    rope = (cos.view(*joint_ids.shape[:2], -1), sin.view(*joint_ids.shape[:2], -1))

    backend = resolve_backend(model._mixed_attention_backend, padded.device, padded.dtype)
    mixed = MixedAttention.from_segments(
        [[(0, text_len + n)] for n in attend], joint_ids.shape[1], backend, padded.device
    )
    model.pos_embed.arm(rope)
    try:
        out = transformer(
            hidden_states=padded, img_ids=ids[0], joint_attention_kwargs={"mixed": mixed}, **common_kwargs
        )[0]
    finally:
        model.pos_embed.disarm()
    return torch.where(valid[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device)), valid


def mixed_forward(
    transformer: nn.Module,
    hidden_states: list[Tensor],
    img_ids: list[Tensor],
    encoder_hidden_states: Tensor,
    pooled_projections: Tensor,
    timestep: Tensor,
    txt_ids: Tensor,
    guidance: Tensor | None = None,
    attend: list[int] | None = None,
) -> list[Tensor]:
    """Run sample i's packed tokens (N_i, C) with its ids (N_i, 3) as if alone; return its output (N_i, C_out).

    Target tokens come first, then Kontext reference tokens. See `padded_forward` for how the batch is run.
    """
    out, _ = padded_forward(
        transformer,
        hidden_states,
        img_ids,
        encoder_hidden_states,
        pooled_projections,
        timestep,
        txt_ids,
        guidance,
        attend,
    )
    return unpad(out, [h.shape[0] for h in hidden_states])
