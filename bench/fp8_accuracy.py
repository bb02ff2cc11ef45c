"""How close an fp8 base is to the full-precision one: unscaled e4m3 (diffusers' layerwise casting) vs scaled e4m3
(one scale per tensor, or per output row as `--base_precision fp8` does). Not a test.

Real checkpoints are not available offline, so the model is the real width (FLUX.1 Kontext / Qwen-Image: 24 heads
x 128 = 3072, real text widths) with a few blocks, and every linear weight of the blocks is redrawn with the spread
of trained DiT weights: Student-t (4 degrees of freedom, heavy tails) entries with std 1/sqrt(fan_in) times a
log-normal scale per output row (sigma 0.5) and per input column (sigma 0.3), plus 0.1% outliers at 20x the row's
std. Everything is computed in float32 so only the storage differs; each variant stores the blocks' linear weights as:
  bf16          the training dtype of a real run (the reference point for "as good as the base dtype")
  fp8 unscaled  weight (and bias).to(float8_e4m3fn), computed in float32: exactly diffusers'
                LayerwiseCastingHook on every linear layer, compute_dtype float32 (checked against the hook)
  fp8 tensor    one float32 scale per tensor, amax -> 448
  fp8 row       one float32 scale per output row (common.base_weights.quantize_fp8; checked against the hook path)
Reported: the relative L2 error of the blocks' weights, and of the transformer's output (one block of each kind by
default) on one 128x128 target + 128x128 reference (64 + 64 image tokens, 16 text tokens: a 2-core CPU budget; the
per-token error of a linear layer does not depend on the token count) at t = 0.5, vs the float32 model.

    python -m bench.fp8_accuracy            # both models, a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy

import torch
from diffusers.hooks import apply_layerwise_casting
from diffusers.models.normalization import RMSNorm
from torch import nn

from bench.memory import model_inputs, real_transformer
from common.base_weights import FP8, FP8_MAX, blocks, place_base_weights, quantize_fp8

VARIANTS = ("bf16", "fp8 unscaled", "fp8 tensor", "fp8 row")


def realistic_(linear: nn.Linear, generator: torch.Generator) -> None:
    """Redraw a linear weight with heavy tails, per-row/column scale spread and rare outliers (module doc)."""
    out_features, in_features = linear.weight.shape
    w = torch.distributions.StudentT(4.0).sample((out_features, in_features)) / 2**0.5  # unit std
    row = torch.exp(0.5 * torch.randn(out_features, 1, generator=generator))
    col = torch.exp(0.3 * torch.randn(1, in_features, generator=generator))
    w = w * row * col / in_features**0.5
    outliers = torch.rand(w.shape, generator=generator) < 1e-3
    w = torch.where(outliers, 20 * w.std(dim=1, keepdim=True) * torch.sign(w), w)
    linear.weight.data.copy_(w)


def stored(weight: torch.Tensor, variant: str) -> torch.Tensor:
    """The float32 weight a variant computes with."""
    if variant == "bf16":
        return weight.to(torch.bfloat16).float()
    if variant == "fp8 unscaled":
        return weight.to(FP8).float()
    if variant == "fp8 tensor":
        scale = weight.abs().max() / FP8_MAX
        return (weight / scale).to(FP8).float() * scale
    q, scale = quantize_fp8(weight)
    return q.float() * scale


def measure(model: str, num_blocks: int) -> dict[str, tuple[float, float]]:
    """{variant: (weight relative error, output relative error)} for `model` at real width with a few blocks."""
    torch.manual_seed(0)
    reference = real_transformer(model, num_blocks).eval()
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    linears = [m for block in blocks(reference) for m in block.modules() if isinstance(m, nn.Linear)]
    for linear in linears:
        realistic_(linear, generator)
    inputs = model_inputs(model, 1, 1, torch.Generator().manual_seed(2), grid=8, text=16)
    with torch.no_grad():
        expected = reference(**inputs, return_dict=False)[0]
        results = {}
        for variant in VARIANTS:
            variant_model = copy.deepcopy(reference)
            errors = []
            for linear in (m for b in blocks(variant_model) for m in b.modules() if isinstance(m, nn.Linear)):
                w = linear.weight.data
                errors.append(((stored(w, variant) - w).norm() / w.norm()).item())
                linear.weight.data = stored(w, variant)
                if variant == "fp8 unscaled" and linear.bias is not None:  # diffusers' hook casts the whole layer
                    linear.bias.data = linear.bias.data.to(FP8).float()
            out = variant_model(**inputs, return_dict=False)[0]
            results[variant] = (sum(errors) / len(errors), ((out - expected).norm() / expected.norm()).item())
            if variant == "fp8 unscaled":  # the same numbers through diffusers' own hook
                hooked = copy.deepcopy(reference)
                for block in blocks(hooked):
                    apply_layerwise_casting(block, FP8, torch.float32, None, skip_modules_classes=(RMSNorm,))
                assert torch.equal(hooked(**inputs, return_dict=False)[0], out)
            if variant == "fp8 row":  # the same numbers through --base_precision fp8's hooks
                hooked = copy.deepcopy(reference)
                hooked.requires_grad_(False)
                place_base_weights(hooked, argparse.Namespace(base_precision="fp8", offload_blocks=False), "cpu")
                assert torch.equal(hooked(**inputs, return_dict=False)[0], out)
            del variant_model
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    """Print the table; returns its rows."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["flux_kontext", "qwen_edit_plus"])
    parser.add_argument("--num_blocks", type=int, default=1)
    args = parser.parse_args(argv)
    rows = []
    print("| model | storage | weight rel. error | output rel. error |")
    print("|---|---|---:|---:|")
    for model in args.model:
        for variant, (weight_error, output_error) in measure(model, args.num_blocks).items():
            rows.append(dict(model=model, variant=variant, weight_error=weight_error, output_error=output_error))
            print(f"| {model} | {variant} | {weight_error:.2e} | {output_error:.2e} |")
    return rows


if __name__ == "__main__":
    main()
