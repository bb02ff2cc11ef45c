"""What a mixed-resolution batch costs: forward + backward of `mixed_forward` per attention backend, against the
sum of stock single-sample calls and a padded call with a dense (B, 1, S, S) mask. Not a test.

    python -m bench.mixed_forward            # CPU, small-but-not-trivial FLUX and Qwen-Image transformers
    python -m bench.mixed_forward --device cuda --dtype bfloat16 --scale 4
"""

import argparse
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch

from common import flux, qwen
from common.attention import MixedAttention, available_backends
from common.padding import padding_ratio
from common.tiny import tiny_transformer

# Target grids (packed tokens) of a 4-sample batch; each has a reference of about half its side.
TARGETS = [(16, 16), (24, 20), (32, 24), (20, 12)]
TEXT_LEN = 32

# Small transformer configurations (also used by bench/train_step.py --tiny): a few blocks of width 128.
TINY_CONFIG: dict[str, dict] = {
    "flux_kontext": dict(
        num_layers=2,
        num_single_layers=4,
        num_attention_heads=4,
        attention_head_dim=32,
        axes_dims_rope=[8, 12, 12],
        joint_attention_dim=64,
        pooled_projection_dim=64,
    ),
    "qwen_edit": dict(
        num_layers=4, num_attention_heads=4, attention_head_dim=32, axes_dims_rope=[8, 12, 12], joint_attention_dim=64
    ),
}


def _time(cases: dict[str, Callable[[], torch.Tensor]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of forward + backward of each case, measured in interleaved rounds after a warm-up round."""
    times: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(repeats + 1):
        for case, step in cases.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[case].append(time.perf_counter() - start)
    return {case: statistics.median(t[1:]) for case, t in times.items()}


def _dense_from_segments(segments, seq_len, backend, device):  # noqa: ANN001, ANN202 - same as the wrapped method
    """`MixedAttention.from_segments` with its broadcast mask expanded to a dense (B, 1, S, S) one: the naive way."""
    mixed = _from_segments(segments, seq_len, "masked", device)
    mixed.key_mask = mixed.key_mask.expand(-1, 1, seq_len, -1).contiguous()
    return mixed


_from_segments = MixedAttention.from_segments


def _grids(scale: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    return [((h * scale // 2, w * scale // 2), (h * scale // 4, w * scale // 4)) for h, w in TARGETS]


def flux_cases(device: torch.device, dtype: torch.dtype, scale: int) -> tuple[dict[str, Callable], list[int]]:
    """Callables returning a scalar loss for each way of running the FLUX batch, and the token counts."""
    model = tiny_transformer("flux_kontext", **TINY_CONFIG["flux_kontext"]).to(device, dtype)
    g = torch.Generator().manual_seed(0)
    grids = _grids(scale)
    hidden = [torch.randn(t[0] * t[1] + r[0] * r[1], 64, generator=g).to(device, dtype) for t, r in grids]
    ids = [torch.cat([flux.image_ids(*t), flux.image_ids(*r, index=1)]).to(device) for t, r in grids]
    text = torch.randn(len(grids), TEXT_LEN, 64, generator=g).to(device, dtype)
    pooled = torch.randn(len(grids), 64, generator=g).to(device, dtype)
    timestep = torch.rand(len(grids), generator=g).to(device, dtype)
    txt_ids = torch.zeros(TEXT_LEN, 3, device=device)
    guidance = torch.ones(len(grids), device=device, dtype=dtype)

    def stock() -> torch.Tensor:
        return sum(
            model(
                hidden_states=hidden[i][None],
                encoder_hidden_states=text[i : i + 1],
                pooled_projections=pooled[i : i + 1],
                timestep=timestep[i : i + 1],
                img_ids=ids[i],
                txt_ids=txt_ids,
                guidance=guidance[i : i + 1],
                return_dict=False,
            )[0]
            .float()
            .square()
            .mean()
            for i in range(len(grids))
        )

    def mixed(backend: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            flux.install_mixed(model, backend)
            out = flux.mixed_forward(model, hidden, ids, text, pooled, timestep, txt_ids, guidance)
            return sum(o.float().square().mean() for o in out)

        return run

    return _cases(model, stock, mixed, device, dtype), [h.shape[0] for h in hidden]


def qwen_cases(device: torch.device, dtype: torch.dtype, scale: int) -> tuple[dict[str, Callable], list[int]]:
    """Callables returning a scalar loss for each way of running the Qwen-Image batch, and the token counts."""
    model = tiny_transformer("qwen_edit", **TINY_CONFIG["qwen_edit"]).to(device, dtype)
    g = torch.Generator().manual_seed(0)
    shapes = [[(1, *t), (1, *r)] for t, r in _grids(scale)]
    hidden = [torch.randn(sum(h * w for _, h, w in s), 64, generator=g).to(device, dtype) for s in shapes]
    text = [torch.randn(TEXT_LEN + 5 * i, 64, generator=g).to(device, dtype) for i in range(len(shapes))]
    timestep = torch.rand(len(shapes), generator=g).to(device, dtype)

    def stock() -> torch.Tensor:
        return sum(
            model(
                hidden_states=hidden[i][None],
                encoder_hidden_states=text[i][None],
                timestep=timestep[i : i + 1],
                img_shapes=[shapes[i]],
                return_dict=False,
            )[0]
            .float()
            .square()
            .mean()
            for i in range(len(shapes))
        )

    def mixed(backend: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            qwen.install_mixed(model, backend)
            return sum(o.float().square().mean() for o in qwen.mixed_forward(model, hidden, shapes, text, timestep))

        return run

    return _cases(model, stock, mixed, device, dtype), [h.shape[0] for h in hidden]


def _cases(model, stock, mixed, device, dtype) -> dict[str, Callable]:  # noqa: ANN001 - local plumbing
    model.requires_grad_(True)
    cases = {"stock, one sample at a time": stock}
    cases.update({f"mixed_forward [{b}]": mixed(b) for b in available_backends(device, dtype)})
    dense = mixed("masked")

    def dense_masked() -> torch.Tensor:
        with mock.patch.object(MixedAttention, "from_segments", _dense_from_segments):
            return dense()

    cases["padded + dense (B,1,S,S) mask"] = dense_masked
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--scale", type=int, default=2, help="multiply every grid side by this")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    for name, build in (("FLUX.1 Kontext", flux_cases), ("Qwen-Image-Edit", qwen_cases)):
        cases, lengths = build(device, dtype, args.scale)
        times = _time(cases, device, args.repeats)
        base = times["stock, one sample at a time"]
        print(f"\n{name}: image tokens per sample {lengths}, padding ratio {padding_ratio(lengths):.1%}")
        print(f"| {'case':<32} | {'s / fwd+bwd':>11} | {'vs stock':>8} |")
        print(f"|{'-' * 34}|{'-' * 13}|{'-' * 10}|")
        for case, seconds in times.items():
            print(f"| {case:<32} | {seconds:>11.4f} | {seconds / base:>7.2f}x |")


if __name__ == "__main__":
    main()
