"""Mixed-resolution forward for a stock diffusers `Flux3Transformer2DModel` (FLUX.3 [klein]).

FLUX.3 keeps three token streams apart: the text (`encoder_hidden_states`), the noisy target (`hidden_states`) and
the references (`image_cond_hidden_states`). Each stream runs its own per-mode blocks (attention within the stream),
then the joint single blocks attend over [text | target | references]. In a mixed batch each stream is padded on its
own: sample i has T_i text tokens (the pipeline pads each prompt to a multiple of 80 tokens and the transformer
attends to that padding, so all T_i are real to the model), N_i target tokens and M_i reference tokens (0 without
references).

Positions and padding reach the processors in band. The stock forward calls its position embedder once per stream
(text, target, references), hands each stream's tables to its per-mode blocks and concatenates them along dim 0 for
the joint blocks. The installed override returns per-sample tables laid out sequence-major, cos (S, B, D + 1) whose
last channel is 1 on real tokens and 0 on padding, and sin (S, B, D). So every processor finds its own sequence's
rotary tables and real tokens in its arguments, also when gradient checkpointing recomputes a block during the
backward pass; nothing armed for one forward has to outlive it.
"""

from __future__ import annotations

import functools

import torch
from diffusers.models.transformers.transformer_flux3 import Flux3AttnProcessor, _get_qkv_projections
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
from common.padding import pad_sequences

IMAGE_ROPE_SCALE = 0.5  # `Flux3PrepareLatentsStep(image_rope_scale=0.5)`: the h/w position ids are scaled by it


class MixedLayouts:
    """The requested backend, and the `MixedAttention` of each rotary table met in the current forward (shared by
    the processors of one model, so each stream's layout is read back from the device once per forward)."""

    def __init__(self) -> None:
        self.backend = "auto"
        self._seen: dict[int, tuple[Tensor, MixedAttention]] = {}

    @torch.compiler.disable
    def attention(self, cos: Tensor, dtype: torch.dtype) -> MixedAttention:
        """The layout a (S, B, D + 1) table marks in its last channel, built once per table object (kept out of
        compiled blocks, `--compile`: it reads lengths back to the host and keys on Python object identity)."""
        seen = self._seen.get(id(cos))
        if seen is None or seen[0] is not cos:  # the table is held in the entry, so its id cannot be reused
            valid = cos[..., -1].transpose(0, 1) > 0
            seen = (cos, MixedAttention.from_mask(valid, resolve_backend(self.backend, cos.device, dtype)))
            self._seen[id(cos)] = seen
        return seen[1]

    def clear(self) -> None:
        """Forget the tables of earlier forwards (a recomputation that meets one again rebuilds its layout)."""
        self._seen.clear()


class Flux3MixedAttnProcessor(WrappingProcessor):
    """`Flux3AttnProcessor` with per-sample rotary tables and padding-aware attention when the tables are per
    sample (3-D); stock behaviour for the stock (S, D) tables."""

    def __init__(self, stock: object, layouts: MixedLayouts) -> None:
        super().__init__(stock)
        self.layouts = layouts

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        if image_rotary_emb is None or image_rotary_emb[0].dim() == 2:
            return self.stock(attn, hidden_states, attention_mask, image_rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states)
        query = attn.norm_q(query.unflatten(-1, (attn.heads, -1)).float())
        key = attn.norm_k(key.unflatten(-1, (attn.heads, -1)).float())
        value = value.unflatten(-1, (attn.heads, -1))

        cos, sin = image_rotary_emb
        mixed = self.layouts.attention(cos, value.dtype)
        cos, sin = cos[..., :-1].transpose(0, 1), sin.transpose(0, 1)
        query = apply_rope_real(query, cos, sin).to(value.dtype)
        key = apply_rope_real(key, cos, sin).to(value.dtype)
        hidden_states = mixed_attention(query, key, value, mixed).flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def install_mixed(transformer: nn.Module, backend: str = "auto") -> None:
    """Install the mixed-batch processors and position embedder on a stock FLUX.3 transformer (idempotent)."""
    model = base_model(transformer)
    layouts = getattr(model, "_mixed_layouts", None) or MixedLayouts()
    install(model, {Flux3AttnProcessor: functools.partial(Flux3MixedAttnProcessor, layouts=layouts)}, backend)
    layouts.backend = backend
    model._mixed_layouts = layouts


def image_ids(height: int, width: int, reference: int = 0) -> Tensor:
    """(height*width, 4) float32 ids (0, h/2, w/2, l) of a packed grid, as the pipeline's `_prepare_image_ids`:
    l = 0 for the target, -(k + 1) for reference k."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.tensor([-reference]))
    ids = ids.to(torch.float32)
    ids[:, 1:3] *= IMAGE_ROPE_SCALE
    return ids


def reference_ids(grids: list[tuple[int, int]]) -> Tensor:
    """Ids of a sample's references packed one after another, reference k at l = -(k + 1), as
    `Flux3PrepareImageCondLatentsStep`; (0, 4) when there are none."""
    ids = [image_ids(h, w, k + 1) for k, (h, w) in enumerate(grids)]
    return torch.cat(ids) if ids else torch.zeros(0, 4)


def text_ids(length: int) -> Tensor:
    """(length, 4) float32 ids (0, 0, 0, l) of the prompt tokens, as `Flux3TextRoPEInputsStep._prepare_text_ids`."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length)).float()


def _same(tensors: list[Tensor]) -> bool:
    """Whether every tensor equals the first, shape included."""
    return all(t.shape == tensors[0].shape and torch.equal(t, tensors[0]) for t in tensors[1:])


def _tables(embedder: nn.Module, ids: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-sample tables of one stream, sequence-major with the validity channel: cos (S, B, D + 1), sin (S, B, D)."""
    padded, valid = pad_sequences(ids)
    cos, sin = embedder(padded.flatten(0, 1))
    shape = (*padded.shape[:2], -1)
    cos = torch.cat([cos.view(shape), valid[..., None].to(cos.dtype)], dim=-1)
    return cos.transpose(0, 1), sin.view(shape).transpose(0, 1)


def padded_forward(
    transformer: nn.Module,
    hidden_states: list[Tensor],
    img_ids: list[Tensor],
    encoder_hidden_states: list[Tensor],
    txt_ids: list[Tensor],
    timestep: Tensor,
    image_cond_hidden_states: list[Tensor] | None = None,
    image_cond_ids: list[Tensor] | None = None,
    target_timestep: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Run sample i's streams as if alone: target (N_i, C) with ids (N_i, 4), text (T_i, D) with (T_i, 4), references
    (M_i, C) with (M_i, 4), M_i = 0 for none. Returns the target output (B, N_max, C_out), zero on padding, and its
    (B, N_max) mask. Equal layouts take the stock forward on the stacked batch; `timestep` is sigma per sample.

    `transformer` may be wrapped by DDP/accelerate (the call goes through the wrapper) and carry a PEFT adapter.
    """
    model = base_model(transformer)
    refs = image_cond_hidden_states or [h[:0] for h in hidden_states]
    ref_ids = image_cond_ids or [i[:0] for i in img_ids]
    has_refs = any(len(r) for r in refs)
    kwargs = {"timestep": timestep, "target_timestep": target_timestep, "return_dict": False}
    if _same(img_ids) and _same(txt_ids) and _same(ref_ids):
        if has_refs:
            kwargs |= {"image_cond_hidden_states": torch.stack(refs), "image_cond_ids": ref_ids[0]}
        out = transformer(
            hidden_states=torch.stack(hidden_states),
            encoder_hidden_states=torch.stack(encoder_hidden_states),
            img_ids=img_ids[0],
            txt_ids=txt_ids[0],
            **kwargs,
        )[0]
        return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)

    if not hasattr(model, "_mixed_layouts"):
        install_mixed(model)
    embedder = model.pos_embed
    streams = [(encoder_hidden_states, txt_ids), (hidden_states, img_ids)] + [(refs, ref_ids)] * has_refs
    tables = [_tables(embedder.stock, ids) for _, ids in streams]
    padded, valid = zip(*(pad_sequences(tokens) for tokens, _ in streams), strict=True)
    if has_refs:
        kwargs |= {"image_cond_hidden_states": padded[2], "image_cond_ids": ref_ids[0]}
    model._mixed_layouts.clear()
    embedder.arm(*tables)  # the stock forward embeds text, target, then reference ids
    try:
        out = transformer(
            hidden_states=padded[1],
            encoder_hidden_states=padded[0],
            img_ids=img_ids[0],
            txt_ids=txt_ids[0],
            **kwargs,
        )[0]
    finally:
        embedder.disarm()
    zero = torch.zeros((), dtype=out.dtype, device=out.device)
    return torch.where(valid[1][..., None], out, zero), valid[1]


def mixed_forward(
    transformer: nn.Module,
    hidden_states: list[Tensor],
    img_ids: list[Tensor],
    encoder_hidden_states: list[Tensor],
    txt_ids: list[Tensor],
    timestep: Tensor,
    image_cond_hidden_states: list[Tensor] | None = None,
    image_cond_ids: list[Tensor] | None = None,
    target_timestep: Tensor | None = None,
) -> list[Tensor]:
    """`padded_forward` returning sample i's target output (N_i, C_out) alone."""
    out, _ = padded_forward(
        transformer,
        hidden_states,
        img_ids,
        encoder_hidden_states,
        txt_ids,
        timestep,
        image_cond_hidden_states,
        image_cond_ids,
        target_timestep,
    )
    return [out[i, : len(h)] for i, h in enumerate(hidden_states)]
