"""Mixed-resolution forward for a stock diffusers `QwenImage21Transformer2DModel` (Qwen-Image 2.1).

Sample i is the joint sequence the stock forward builds for it alone: its prompt's Qwen3-VL tokens with each
condition image's latent tokens substituted at that image's slots (one slot = 2x2 latent tokens), then its target's
tokens; the batch pads these sequences at the end. The stock forward reads one layout for the whole batch
(`img_mask[0]`, `img_shapes[0]`, one target mask), so mixed batches run `_mixed_forward` instead, installed as a
per-instance `forward` that defers to stock without a `Qwen21Layout` (it must be the model's own forward so that
DDP and accelerate's autocast wrappers see the call). It is the stock forward's orchestration per sample, calling
the stock submodules: each sample's rotary table from the stock `QwenImage21Rope` on its own mask and shapes, its
own `build_token_metadata` and block-causal segments; every block is the stock block.

Two stock pieces take a batch-shared (S,) target mask for the `causal_condition` rows (text and condition tokens
modulated at t = 0) and get a per-instance override that also accepts a per-sample (B, S) mask: the blocks'
`_modulate` and `norm_out`. Attention runs the stock `QwenImage21AttnProcessor` once per sample on that sample's
unpadded sequence, with its rotary table, segments and key padding: exact by construction (the stock segment
decomposition: one SDPA call per image block and per text run, small causal tiles for text, no (B, S, S) mask),
padding costs no attention or projection work, and no flex/compile is needed. A flex `BlockMask` with per-sample
document masks would be one kernel call per layer but needs a compiled model to avoid a dense fp32 score matrix,
and the trainers run eager by default; the per-sample loop is kept out of compiled graphs (`--compile` compiles
the blocks around it).
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.models.transformers.transformer_qwenimage21 import (
    QwenImage21AttnProcessor,
    _qwenimage21_prefix_segments,
)
from torch import Tensor, nn

from common.attention import BACKENDS, WrappingProcessor, base_model
from common.padding import lengths_mask, unpad

ImgShapes = list[tuple[int, int, int]]
TOKENS_PER_SLOT = 4  # one Qwen3-VL image slot stands for 2x2 latent tokens (the stock `_IMG_TOKENS_PER_SLOT`)


@dataclass
class Qwen21Layout:
    """Each sample's joint-sequence structure, built once per forward on the CPU and read by every block."""

    lengths: list[int]  # S_i, joint tokens of sample i
    gather: Tensor  # (B, S_max) row of each joint position in [text rows | image rows | one zero row]
    rotary: list[Tensor]  # (S_i, D/2) complex, the stock rope of sample i alone
    segments: list[list[tuple[int, int, bool]]]  # stock prefix segments of sample i
    key_valid: list[Tensor | None]  # (1, S_i) valid keys of sample i (padded prompt tokens excluded), or None
    target: Tensor  # (B, S_max) bool, each sample's target-image tokens

    def valid(self) -> Tensor:
        """(B, S_max) bool, True on each sample's joint tokens."""
        return lengths_mask(self.lengths, self.gather.shape[1], self.target.device)


def target_slots(text_slots: Tensor, target_tokens: int) -> Tensor:
    """The transformer's `img_mask` of one sample: its prompt's image slots then one slot per 2x2 target tokens, as
    the pipeline's `append_target_slots`."""
    return torch.cat([text_slots.bool(), text_slots.new_ones(target_tokens // TOKENS_PER_SLOT, dtype=torch.bool)])


def per_sample_rows(params: Tensor, target_mask: Tensor) -> Tensor:
    """The stock `_select_modulation_rows` with a per-sample (B, S) mask: sample b's target tokens take row b, all
    other tokens the trailing t = 0 row."""
    real, zero = params[:-1].unsqueeze(1), params[-1:].unsqueeze(0)
    return torch.where(target_mask.unsqueeze(-1), real, zero)


def _modulate(
    self: nn.Module, hidden_states: Tensor, mod_params: Tensor, target_token_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-instance `QwenImage21TransformerBlock._modulate`: stock, except a (B, S) mask selects rows per sample."""
    if target_token_mask is None or target_token_mask.dim() == 1:
        return type(self)._modulate(self, hidden_states, mod_params, target_token_mask)
    scale, gate = per_sample_rows(mod_params, target_token_mask).chunk(2, dim=-1)
    return hidden_states * (1 + scale), gate


def _norm_out(
    self: nn.Module, hidden_states: Tensor, conditioning: Tensor, target_token_mask: Tensor | None = None
) -> Tensor:
    """Per-instance `QwenImage21AdaLayerNormContinuous.forward`: stock, except a (B, S) mask selects rows per sample."""
    if target_token_mask is None or target_token_mask.dim() == 1:
        return type(self).forward(self, hidden_states, conditioning, target_token_mask)
    scale = self.linear(self.silu(conditioning).to(hidden_states.dtype))
    return self.norm(hidden_states) * (1 + per_sample_rows(scale, target_token_mask))


class Qwen21MixedAttnProcessor(WrappingProcessor):
    """Runs the stock `QwenImage21AttnProcessor` on each sample's unpadded sequence when handed a `Qwen21Layout`
    as `segments`; padded rows come out zero. Without a layout it is the stock processor."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        attention_mask: object | None = None,
        rotary_emb: Tensor | None = None,
        layer_cache: object | None = None,
        kv_cache_mode: str | None = None,
        cache_write_slice: slice | None = None,
        segments: list[tuple[int, int, bool]] | Qwen21Layout | None = None,
        key_valid: Tensor | None = None,
    ) -> Tensor:
        if not isinstance(segments, Qwen21Layout):
            return self.stock(
                attn,
                hidden_states,
                attention_mask,
                rotary_emb,
                layer_cache,
                kv_cache_mode,
                cache_write_slice,
                segments,
                key_valid,
            )
        return _per_sample_attention(self.stock, attn, hidden_states, segments)


@torch.compiler.disable
def _per_sample_attention(stock: object, attn: nn.Module, hidden_states: Tensor, layout: Qwen21Layout) -> Tensor:
    """The stock processor on sample i's first S_i tokens, re-padded with zeros (kept eager: it loops over the
    batch's Python layout, which would make every new layout a recompile)."""
    outputs = [
        stock(attn, hidden_states[i : i + 1, :n], rotary_emb=rope, segments=segs, key_valid=valid)[0]
        for i, (n, rope, segs, valid) in enumerate(
            zip(layout.lengths, layout.rotary, layout.segments, layout.key_valid, strict=True)
        )
    ]
    padded = torch.nn.utils.rnn.pad_sequence(outputs, batch_first=True)
    if padded.shape[1] < hidden_states.shape[1]:
        padded = torch.nn.functional.pad(padded, (0, 0, 0, hidden_states.shape[1] - padded.shape[1]))
    return padded


def _forward(self: nn.Module, *args: object, qwen21_layout: Qwen21Layout | None = None, **kwargs: object) -> object:
    """Per-instance `forward`: the stock forward, or `_mixed_forward` when handed a layout."""
    if qwen21_layout is None:
        return type(self).forward(self, *args, **kwargs)
    return _mixed_forward(self, layout=qwen21_layout, **kwargs)


def install_mixed(transformer: nn.Module, backend: str = "auto") -> None:
    """Install the mixed-batch forward, processors and modulation overrides on a stock 2.1 transformer (idempotent),
    before accelerate wraps its forward (as the trainer does).

    Every backend runs the stock segment decomposition per sample (module doc): it is exact and mask-free for image
    blocks; `masked` would need a dense block-causal mask, which is what it avoids."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    model = base_model(transformer)
    if getattr(model, "_qwen21_mixed", False):
        return
    processors = {}
    for name, proc in model.attn_processors.items():
        if type(proc) is not QwenImage21AttnProcessor:
            raise TypeError(f"{name}: cannot run mixed batches with processor {type(proc).__name__}")
        processors[name] = Qwen21MixedAttnProcessor(proc)
    model.set_attn_processor(processors)
    for block in model.transformer_blocks:
        block._modulate = types.MethodType(_modulate, block)
    model.norm_out.forward = types.MethodType(_norm_out, model.norm_out)
    model.forward = types.MethodType(_forward, model)
    model._qwen21_mixed = True


def build_layout(
    model: nn.Module,
    img_mask: Sequence[Tensor],
    img_shapes: Sequence[ImgShapes],
    text_lengths: Sequence[int],
    image_lengths: Sequence[int],
    text_masks: Sequence[Tensor | None],
    drop_references: Sequence[bool],
    device: torch.device,
) -> Qwen21Layout:
    """Each sample's structure as the stock forward derives it for that sample alone (its `img_mask` row, its
    `img_shapes`), plus the gather index that assembles the padded joint sequence from padded text and image rows.
    A sample with `drop_references` keeps its condition tokens in place but excludes them as keys."""
    batch = len(img_mask)
    text_max, image_max = max(text_lengths), max(image_lengths)
    zero_row = batch * (text_max + image_max)
    pad_masks, gathers, rotary, segments, key_valid, targets = [], [], [], [], [], []
    for i, (slots, shapes, text_mask, drop) in enumerate(
        zip(img_mask, img_shapes, text_masks, drop_references, strict=True)
    ):
        slots = slots.bool().cpu()
        image_pad_mask = torch.repeat_interleave(slots, torch.where(slots, TOKENS_PER_SLOT, 1))
        target_slots_count = math.prod(shapes[-1]) // TOKENS_PER_SLOT
        if slots.shape[0] != text_lengths[i] + target_slots_count or image_pad_mask.sum() != image_lengths[i]:
            raise ValueError(f"sample {i}: img_mask does not match its {text_lengths[i]} text and image tokens")
        # Joint position -> VL position: text rows are the VL rows that are not image slots (stock overwrites the
        # image slots' text rows with latents); image rows are taken in order.
        vl_index = torch.repeat_interleave(torch.arange(slots.shape[0]), torch.where(slots, TOKENS_PER_SLOT, 1))
        image_rank = torch.cumsum(image_pad_mask, 0) - 1
        gathers.append(
            torch.where(
                image_pad_mask,
                batch * text_max + i * image_max + image_rank,
                i * text_max + vl_index,
            )
        )
        pad_masks.append(image_pad_mask)
        rotary.append(model.pos_embed(shapes, image_pad_mask.to(device), device=device))
        image_ids, target = model.build_token_metadata(image_pad_mask, shapes)
        targets.append(target)
        segments.append(_qwenimage21_prefix_segments(image_ids, int((~target).sum())))
        valid = torch.ones(1, image_pad_mask.shape[0], dtype=torch.bool)
        if text_mask is not None:  # as the stock forward: the joint sequence's text positions take the prompt's mask
            valid[0, ~image_pad_mask] = text_mask.bool().cpu()[~slots[: text_mask.shape[0]]]
        if drop:
            valid[0, image_pad_mask & ~target] = False
        key_valid.append(None if text_mask is None and not drop else valid.to(device))
    gather = torch.nn.utils.rnn.pad_sequence(gathers, batch_first=True, padding_value=zero_row)
    target = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True)
    return Qwen21Layout(
        lengths=[m.shape[0] for m in pad_masks],
        gather=gather.to(device, non_blocking=True),
        rotary=rotary,
        segments=segments,
        key_valid=key_valid,
        target=target.to(device, non_blocking=True),
    )


def _mixed_forward(
    model: nn.Module,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor,
    timestep: Tensor,
    layout: Qwen21Layout,
) -> tuple[Tensor]:
    """The stock forward's orchestration with per-sample layouts: padded image (B, N_max, C) and text (B, T_max, D)
    rows -> padded joint output (B, S_max, C_out), zero on padding."""
    batch = hidden_states.shape[0]
    images = model.img_in(hidden_states).flatten(0, 1)
    text = model.txt_in(encoder_hidden_states).flatten(0, 1)
    rows = torch.cat([text, images, images.new_zeros(1, images.shape[1])])
    joint = rows[layout.gather.flatten()].view(batch, -1, images.shape[1])

    timestep = timestep.to(hidden_states.dtype)
    modulation_mask = None
    if model.config.causal_condition:  # the extra t = 0 row of text and condition tokens, as stock
        timestep = torch.cat([timestep, timestep.new_zeros(1)], dim=0)
        modulation_mask = layout.target
    temb = model.time_text_embed(timestep, hidden_states)
    modulation = model.modulation(temb)

    for block in model.transformer_blocks:
        if torch.is_grad_enabled() and model.gradient_checkpointing:
            joint = model._gradient_checkpointing_func(
                block, joint, modulation, None, None, modulation_mask, None, None, None, layout, None
            )
        else:
            joint = block(
                hidden_states=joint,
                modulation=modulation,
                target_token_mask=modulation_mask,
                segments=layout,
            )
    output = model.proj_out(model.norm_out(joint, temb, modulation_mask))
    return (torch.where(layout.valid()[..., None], output, output.new_zeros(())),)


def padded_forward(
    transformer: nn.Module,
    hidden_states: list[Tensor],
    encoder_hidden_states: list[Tensor],
    img_mask: list[Tensor],
    img_shapes: list[ImgShapes],
    timestep: Tensor,
    encoder_hidden_states_mask: list[Tensor] | None = None,
    drop_references: list[bool] | None = None,
) -> tuple[Tensor, Tensor]:
    """`mixed_forward` returning the padded joint output (B, S_max, C_out), zero on padding, and its (B, S_max) mask.

    Samples sharing one layout (same `img_mask`, `img_shapes`, text length) take the stock forward, stacked.
    `drop_references[i]` (control dropout): sample i's condition tokens stay in place but nothing attends to them,
    which the stock forward cannot express. `transformer` may be wrapped by DDP/accelerate or PEFT."""
    model = base_model(transformer)
    for i, (h, shapes) in enumerate(zip(hidden_states, img_shapes, strict=True)):
        if h.shape[0] != sum(math.prod(s) for s in shapes):
            raise ValueError(f"sample {i}: {h.shape[0]} tokens but img_shapes {shapes} describe another count")
    masks = encoder_hidden_states_mask or [None] * len(hidden_states)
    drop = drop_references or [False] * len(hidden_states)
    same = not any(drop) and (
        all(
            s == img_shapes[0] and m.shape == img_mask[0].shape and torch.equal(m, img_mask[0])
            for s, m in zip(img_shapes, img_mask, strict=True)
        )
        and len({e.shape[0] for e in encoder_hidden_states}) == 1
    )
    if same:
        stacked_mask = None
        if any(m is not None for m in masks):
            stacked_mask = torch.stack(
                [
                    torch.ones(e.shape[0], dtype=torch.bool, device=e.device) if m is None else m.bool()
                    for m, e in zip(masks, encoder_hidden_states, strict=True)
                ]
            )
        out = transformer(
            hidden_states=torch.stack(hidden_states),
            encoder_hidden_states=torch.stack(encoder_hidden_states),
            encoder_hidden_states_mask=stacked_mask,
            timestep=timestep,
            img_shapes=img_shapes,
            img_mask=torch.stack(img_mask),
            return_dict=False,
        )[0]
        return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)

    install_mixed(model)
    device = hidden_states[0].device
    layout = build_layout(
        model,
        img_mask,
        img_shapes,
        [e.shape[0] for e in encoder_hidden_states],
        [h.shape[0] for h in hidden_states],
        masks,
        drop,
        device,
    )
    out = transformer(
        hidden_states=torch.nn.utils.rnn.pad_sequence(hidden_states, batch_first=True),
        encoder_hidden_states=torch.nn.utils.rnn.pad_sequence(encoder_hidden_states, batch_first=True),
        timestep=timestep,
        qwen21_layout=layout,
    )[0]
    return out, layout.valid()


def mixed_forward(
    transformer: nn.Module,
    hidden_states: list[Tensor],
    encoder_hidden_states: list[Tensor],
    img_mask: list[Tensor],
    img_shapes: list[ImgShapes],
    timestep: Tensor,
    encoder_hidden_states_mask: list[Tensor] | None = None,
    drop_references: list[bool] | None = None,
) -> list[Tensor]:
    """Run each sample as the stock transformer runs it alone: its image tokens (N_i, C) (condition images first,
    the target last), text (T_i, D), `img_mask` (its prompt's slots then the target's, `target_slots`), `img_shapes`
    and optional text mask (T_i,). Returns sample i's joint output (S_i, C_out), as stock returns it."""
    out, valid = padded_forward(
        transformer,
        hidden_states,
        encoder_hidden_states,
        img_mask,
        img_shapes,
        timestep,
        encoder_hidden_states_mask,
        drop_references,
    )
    return unpad(out, valid.sum(1).tolist())
