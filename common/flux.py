"""Mixed-resolution forward for a stock diffusers `FluxTransformer2DModel` (FLUX.1 / FLUX.1 Kontext).

The joint sequence is [text (T, same for every sample) | image tokens of sample i (N_i) | padding], so each
sample's real tokens are the prefix of length T + N_i. Rotary tables come from the stock `FluxPosEmbed` applied
to every sample's own ids at once; the installed processor applies them per sample and attends with the
selected mask-free backend (see `common.attention`).
"""

from collections.abc import Callable

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

    @staticmethod
    def batch_major(rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """The per-sample (B, S, D) cos/sin tables from what the model hands the blocks (FLUX.1: exactly those)."""
        return rope

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

        cos, sin = self.batch_major(image_rotary_emb)
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
    install(transformer, {FluxAttnProcessor: FluxMixedAttnProcessor}, backend)


def _stack_if_uniform(hidden_states: list[Tensor], img_ids: list[Tensor]) -> tuple[Tensor, Tensor] | None:
    """Stacked inputs when every sample has the same token layout (the stock path), else None."""
    first = img_ids[0]
    if all(ids.shape == first.shape and torch.equal(ids, first) for ids in img_ids[1:]):
        return torch.stack(hidden_states), first
    return None


def run_padded(
    transformer: nn.Module,
    hidden_states: list[Tensor],
    img_ids: list[Tensor],
    txt_ids: Tensor,
    attend: list[int] | None,
    install_fn: Callable[[nn.Module, str], None],
    arm_rope: Callable[[nn.Module, tuple[Tensor, Tensor], int], None],
    **model_kwargs: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The FLUX-family padded forward: [text | image tokens of sample i | padding], text shared by all samples.

    Equal layouts call the stock forward on the stacked batch. Otherwise the batch is padded, rotary tables of every
    sample's own ids are computed in one call of the stock embedder and handed to the installed override with
    `arm_rope(embedder, (cos, sin) each (B, T + N_max, D), T)`, and attention runs over each sample's text and its
    first attend[i] image tokens. Returns the output (B, N_max, C_out), zero on padding, and its (B, N_max) mask.
    """
    model = base_model(transformer)
    lengths = [h.shape[0] for h in hidden_states]
    attend = lengths if attend is None else attend
    uniform = _stack_if_uniform(hidden_states, img_ids) if attend == lengths else None
    if uniform is not None:
        stacked, ids = uniform
        out = transformer(hidden_states=stacked, img_ids=ids, txt_ids=txt_ids, return_dict=False, **model_kwargs)[0]
        return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)

    install_fn(model, getattr(model, "_mixed_attention_backend", "auto"))
    padded, valid = pad_sequences(hidden_states)
    ids, _ = pad_sequences(img_ids)
    batch, text_len = padded.shape[0], txt_ids.shape[0]
    joint_ids = torch.cat([txt_ids.to(ids).expand(batch, -1, -1), ids], dim=1)
    cos, sin = model.pos_embed.stock(joint_ids.flatten(0, 1))
    rope = (cos.view(*joint_ids.shape[:2], -1), sin.view(*joint_ids.shape[:2], -1))

    backend = resolve_backend(model._mixed_attention_backend, padded.device, padded.dtype)
    mixed = MixedAttention.from_segments(
        [[(0, text_len + n)] for n in attend], joint_ids.shape[1], backend, padded.device
    )
    arm_rope(model.pos_embed, rope, text_len)
    try:
        out = transformer(
            hidden_states=padded,
            img_ids=ids[0],
            txt_ids=txt_ids,
            joint_attention_kwargs={"mixed": mixed},
            return_dict=False,
            **model_kwargs,
        )[0]
    finally:
        model.pos_embed.disarm()
    return torch.where(valid[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device)), valid


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
    return run_padded(
        transformer,
        hidden_states,
        img_ids,
        txt_ids,
        attend,
        install_mixed,
        lambda embedder, rope, _text_len: embedder.arm(rope),
        encoder_hidden_states=encoder_hidden_states,
        pooled_projections=pooled_projections,
        timestep=timestep,
        guidance=guidance,
    )


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
