"""Mixed-resolution forward for a stock diffusers `QwenImageTransformer2DModel` (Qwen-Image-Edit, Edit-Plus, 2511).

The joint sequence is [text of sample i (T_i) | text padding | image tokens (N_i) | image padding]. Stock
`QwenEmbedRope` uses sample 0's `img_shapes` for the whole batch, and the text positions start after the
largest image half-extent, so both image and text rotary tables differ per sample; they are computed here with
the stock embedder's own per-image tables and handed to the blocks once per forward.
"""

from math import prod

import torch
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0, QwenEmbedRope
from torch import Tensor, nn

from common.attention import (
    MixedAttention,
    WrappingProcessor,
    apply_rope_complex,
    base_model,
    install,
    mixed_attention,
    resolve_backend,
)
from common.padding import pad_sequences, unpad

ImgShapes = list[tuple[int, int, int]]


class QwenMixedAttnProcessor(WrappingProcessor):
    """`QwenDoubleStreamAttnProcessor2_0` with per-sample rotary tables and padding-aware attention."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        encoder_hidden_states_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        mixed: MixedAttention | None = None,
    ) -> tuple[Tensor, Tensor]:
        if mixed is None:
            return self.stock(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                encoder_hidden_states_mask=encoder_hidden_states_mask,
                attention_mask=attention_mask,
                image_rotary_emb=image_rotary_emb,
            )
        head_dim = attn.inner_dim // attn.heads
        img_q, img_k, img_v = (
            proj(hidden_states).unflatten(-1, (-1, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        txt_q, txt_k, txt_v = (
            proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
            for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)

        img_freqs, txt_freqs = image_rotary_emb
        query = torch.cat([apply_rope_complex(txt_q, txt_freqs), apply_rope_complex(img_q, img_freqs)], dim=1)
        key = torch.cat([apply_rope_complex(txt_k, txt_freqs), apply_rope_complex(img_k, img_freqs)], dim=1)
        value = torch.cat([txt_v, img_v], dim=1)
        joint = mixed_attention(query, key, value, mixed).flatten(2, 3).to(query.dtype)

        text_len = encoder_hidden_states.shape[1]
        img_out = attn.to_out[0](joint[:, text_len:].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(joint[:, :text_len].contiguous())
        return img_out, txt_out


def install_mixed(transformer: nn.Module, backend: str = "auto") -> None:
    """Install the mixed-batch processors and position embedder on a stock Qwen-Image transformer (idempotent)."""
    model = base_model(transformer)
    embed = model.pos_embed.stock if hasattr(model.pos_embed, "stock") else model.pos_embed
    if type(embed) is not QwenEmbedRope:
        raise TypeError(f"mixed batches need QwenEmbedRope, this model uses {type(embed).__name__}")
    install(model, {QwenDoubleStreamAttnProcessor2_0: QwenMixedAttnProcessor}, backend)


def per_sample_rope(
    embed: QwenEmbedRope, img_shapes: list[ImgShapes], img_len: int, text_len: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Per-sample complex rotary tables, image (B, img_len, D/2) and text (B, text_len, D/2), as stock builds each."""
    img = [
        torch.cat([embed._compute_video_freqs(f, h, w, idx, device) for idx, (f, h, w) in enumerate(shapes)])
        for shapes in img_shapes
    ]
    img_freqs = torch.nn.utils.rnn.pad_sequence(img, batch_first=True)
    if img_freqs.shape[1] < img_len:
        raise ValueError(f"img_shapes describe {img_freqs.shape[1]} tokens, hidden states have {img_len}")
    half = 2 if embed.scale_rope else 1
    offsets = torch.tensor([max(max(h // half, w // half) for _, h, w in shapes) for shapes in img_shapes])
    positions = (offsets[:, None] + torch.arange(text_len)[None, :]).to(device, non_blocking=True)
    pos_freqs, _ = embed._get_device_freqs(device)
    return img_freqs, pos_freqs[positions]


def padded_forward(
    transformer: nn.Module,
    hidden_states: list[Tensor],
    img_shapes: list[ImgShapes],
    encoder_hidden_states: list[Tensor],
    timestep: Tensor,
    attend: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """`mixed_forward` that returns the padded output (B, N_max, C_out), zero on padding, and its (B, N_max) mask.

    Equal image layouts and text lengths take the stock forward
    unchanged. Otherwise image and text are padded, padding is excluded from attention, every sample gets its own
    image and text rotary positions, and for `zero_cond_t` checkpoints the reference tokens of every sample are
    modulated with t = 0 as stock does for one sample. `transformer` may be wrapped by DDP/accelerate or PEFT.
    `attend[i]`: only sample i's first attend[i] image tokens take part in attention (control dropout keeps the
    reference tokens in place, so the layout is unchanged, but nothing attends to them).
    """
    model = base_model(transformer)
    for i, (h, shapes) in enumerate(zip(hidden_states, img_shapes, strict=True)):
        if h.shape[0] != sum(prod(s) for s in shapes):
            raise ValueError(
                f"sample {i}: {h.shape[0]} tokens but img_shapes {shapes} describe {sum(map(prod, shapes))}"
            )
    text_lengths = [e.shape[0] for e in encoder_hidden_states]
    lengths = [h.shape[0] for h in hidden_states]
    attend = lengths if attend is None else attend
    if attend == lengths and all(s == img_shapes[0] for s in img_shapes) and len(set(text_lengths)) == 1:
        out = transformer(
            hidden_states=torch.stack(hidden_states),
            encoder_hidden_states=torch.stack(encoder_hidden_states),
            encoder_hidden_states_mask=None,
            timestep=timestep,
            img_shapes=img_shapes,
            return_dict=False,
        )[0]
        return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)

    install_mixed(model, getattr(model, "_mixed_attention_backend", "auto"))
    padded, valid = pad_sequences(hidden_states)
    text, _ = pad_sequences(encoder_hidden_states)
    img_len, text_len = padded.shape[1], text.shape[1]
    rope = per_sample_rope(model.pos_embed.stock, img_shapes, img_len, text_len, padded.device)
    segments = [[(0, t), (text_len, text_len + n)] for t, n in zip(text_lengths, attend, strict=True)]
    backend = resolve_backend(model._mixed_attention_backend, padded.device, padded.dtype)
    mixed = MixedAttention.from_segments(segments, text_len + img_len, backend, padded.device)
    if model.zero_cond_t:
        # The stock forward reads img_shapes here only to build modulate_index (target tokens 0, the rest 1), which
        # needs one length for all samples; these shapes give that index for the padded layout.
        img_shapes = [[(1, 1, prod(s[0])), (1, 1, img_len - prod(s[0]))] for s in img_shapes]
    model.pos_embed.arm(rope)
    try:
        out = transformer(
            hidden_states=padded,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=None,
            timestep=timestep,
            img_shapes=img_shapes,
            attention_kwargs={"mixed": mixed},
            return_dict=False,
        )[0]
    finally:
        model.pos_embed.disarm()
    return torch.where(valid[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device)), valid


def mixed_forward(
    transformer: nn.Module,
    hidden_states: list[Tensor],
    img_shapes: list[ImgShapes],
    encoder_hidden_states: list[Tensor],
    timestep: Tensor,
    attend: list[int] | None = None,
) -> list[Tensor]:
    """Run sample i's tokens (N_i, C), its images (target first, then references) and text (T_i, D) as if alone.

    Returns each sample's output (N_i, C_out); see `padded_forward` for how the batch is run.
    """
    out, _ = padded_forward(transformer, hidden_states, img_shapes, encoder_hidden_states, timestep, attend)
    return unpad(out, [h.shape[0] for h in hidden_states])
