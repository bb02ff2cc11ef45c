"""One LoRA training step (forward, backward, AdamW) on equal-size vs mixed-resolution batches, per backend. Not a test.

LoRA rank 16 on every token-wise linear layer of the transformer blocks (attention Q/K/V/out of both streams, the
MLPs, FLUX's single-block proj_mlp/proj_out; not the adaLN modulation), base weights frozen, LoRA weights and
AdamW states in float32 as the diffusers LoRA scripts keep them. Full size (default): the real FLUX.1 Kontext
(19 double + 38 single blocks) and Qwen-Image-Edit (60 blocks) transformer configs, 24 heads x 128, random weights,
bfloat16 on CUDA, gradient checkpointing on. `--tiny`: small configs (like bench/mixed_forward.py), float32 on CPU,
every token count 16x smaller, gradient checkpointing off.

Data: a synthetic dataset (bench/padding_ratio.py's image sizes, sized per model with multi_resolutions
512*512 768*768 1024*1024); each sample is a target plus a reference of the same size, (H/16)*(W/16) tokens each,
Kontext references appended with image_ids index 1, Qwen img_shapes [(1, h, w), (1, h, w)]. Text: FLUX T = 512
(the pipeline pads T5 to 512), Qwen 100-300 tokens per sample. Cases: an equal-size batch (stock forward; a
square size with about the dataset's mean tokens, so real tokens/s compare fairly), and the first batches of
`RandomBatchSampler` ("mixed random") and `LengthGroupedBatchSampler` ("mixed grouped") through `padded_forward`
with each attention backend. The loss is `masked_mse_loss` over the target tokens.

Columns: s/step is the median of the timed steps (CUDA synchronised); real tok/s is the real text + image tokens
of the timed steps over their total time; padding is the mean share of padded joint-sequence slots per batch;
TFLOP/s and MFU count model FLOPs (below) over total time; peak mem is torch.cuda.max_memory_allocated (n/a on
CPU); rope+mask is the share of step time spent building per-sample rotary tables (the stock position embedder,
`common.qwen.per_sample_rope`) and `MixedAttention.from_segments`, each timed between device synchronisations.

Model FLOPs of one step, per sample with L = T + N real tokens (text + target + reference), D = heads x head_dim,
LoRA rank r, summed over the transformer blocks:
    forward = 2*12*D^2*L (base matmuls: Q, K, V, out 4*D^2 + MLP 8*D^2, also FLUX's fused single block)
              + 2*a*r*D*L (LoRA A and B; a = 18 per double-stream/Qwen block, 17 per FLUX single block)
              + 4*D*L^2 (Q K^T and P V)
    train   = 2x base matmuls (forward + activation gradients; frozen base weights get no weight gradients)
              + 3x LoRA matmuls (forward, activation and weight gradients) + 3x attention (backward = 2x forward)
            = 48*D^2*L + 6*a*r*D*L + 12*D*L^2   per block.
Padding, embedders, adaLN modulation and the output projection (< 1%), and the gradient-checkpointing recompute
(hardware, not model, FLOPs) are not counted. On the tiny models this matches torch.utils.flop_counter to ~1%
once its flash-attention backward (2.5x forward: it recomputes Q K^T) is counted as 2x. MFU divides by the dense
bf16 peak of the GPU (H100 SXM / H200 989 TFLOP/s, H100 PCIe 756, A100 312) or `--peak_tflops`.

    python -m bench.train_step --tiny                        # CPU, float32, both models, about a minute
    python -m bench.train_step --device cuda --model both    # full size, bf16, gradient checkpointing
    python -m bench.train_step --model qwen_edit --backends split varlen --steps 10 --no-gradient_checkpointing
"""

import argparse
import gc
import itertools
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from unittest import mock

import torch
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel
from peft import LoraConfig
from torch import Tensor, nn

from bench.mixed_forward import TINY_CONFIG
from bench.padding_ratio import synthetic_sizes
from bench.random_weights import build_random
from common import flux, qwen
from common.attention import BACKENDS, MixedAttention, available_backends, base_model
from common.compile import compile_blocks
from common.loss import masked_mse_loss
from common.models import get_model
from common.padding import lengths_mask
from common.sampler import LengthGroupedBatchSampler, RandomBatchSampler
from common.sdpa import sdpa_kernels
from common.tiny import tiny_transformer

MODELS = ("flux_kontext", "qwen_edit")
NAMES = {"flux_kontext": "FLUX.1 Kontext", "qwen_edit": "Qwen-Image-Edit"}
FULL_CONFIG: dict[str, dict] = {"flux_kontext": {"guidance_embeds": True}, "qwen_edit": {}}
AREAS = (512, 768, 1024)  # square sides of the multi_resolutions pixel areas
FLUX_TEXT_LEN = 512
QWEN_TEXT_LEN = (100, 300)
TINY_SHRINK = 4  # --tiny divides image sides by this, so every token count by its square
LORA_RANK = 16
LORA_PER_BLOCK = {"double": 18, "single": 17}  # LoRA weights per token per block, in units of r * D (see above)
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))  # dense bf16


@dataclass(frozen=True)
class Sample:
    """One training sample: target token grid (h, w), a reference of the same size, and its text length."""

    grid: tuple[int, int]
    text_len: int

    @property
    def image_tokens(self) -> int:
        """Target plus reference tokens."""
        return 2 * self.grid[0] * self.grid[1]


@dataclass
class Batch:
    """Device tensors of one batch and how to run it; `run` returns the padded output (B, N_max, C_out)."""

    run: Callable[[nn.Module], Tensor]
    target: Tensor  # (B, N_max, C_out) flow-matching target
    valid: Tensor  # (B, N_max) True on target tokens (references and padding get no loss)
    lengths: list[int]  # real text + image tokens of each sample
    slots: int  # B x padded joint sequence length

    @property
    def padding(self) -> float:
        """Share of padded joint-sequence slots."""
        return 1.0 - sum(self.lengths) / self.slots


@dataclass
class Result:
    """One case (batches and backend) and what its timed steps measured."""

    case: str
    backend: str
    batches: list[Batch]
    padding: float  # mean over the timed batches
    seconds: list[float] = field(default_factory=list)
    tokens: int = 0
    flops: float = 0.0
    bookkeeping: float = 0.0  # seconds in rotary tables and attention bookkeeping
    peak_bytes: int | None = None

    @property
    def token_rate(self) -> float:
        """Real text + image tokens per second over the timed steps."""
        return self.tokens / sum(self.seconds)

    @property
    def flop_rate(self) -> float:
        """Model FLOP/s over the timed steps."""
        return self.flops / sum(self.seconds)


class Stopwatch:
    """Accumulates the time of wrapped calls, measured between device synchronisations."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0

    def sync(self) -> None:
        """Wait for queued device work (CUDA only)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, fn: Callable) -> Callable:
        """`fn`, with its duration added to `seconds`."""

        def timed(*args: object, **kwargs: object) -> object:
            self.sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.seconds += time.perf_counter() - start
            return out

        return timed


def dataset(model: str, num_samples: int, shrink: int, seed: int) -> list[Sample]:
    """Synthetic samples sized like `model`'s pipeline, image sides (and text) shrunk for --tiny."""
    areas = [f"{side // shrink}*{side // shrink}" for side in AREAS]
    policy = get_model(model).policy(multi_resolutions=areas)
    rng = random.Random(seed)
    samples = []
    for w, h in synthetic_sizes(num_samples, seed):
        pw, ph = policy.plan(w // shrink, h // shrink).size
        text = FLUX_TEXT_LEN if model == "flux_kontext" else rng.randint(*QWEN_TEXT_LEN)
        samples.append(Sample((ph // 16, pw // 16), max(1, text // shrink**2)))
    return samples


def equal_sample(samples: list[Sample]) -> Sample:
    """A square sample with about the dataset's mean image tokens and text length."""
    side = round((statistics.mean(s.image_tokens for s in samples) / 2) ** 0.5)
    return Sample((side, side), round(statistics.mean(s.text_len for s in samples)))


def flux_batch(model: nn.Module, samples: list[Sample], device: torch.device, dtype: torch.dtype) -> Batch:
    """A FLUX.1 Kontext batch: target then reference tokens (ids index 1), T5 text padded to the same length."""
    config = base_model(model).config
    text_len = samples[0].text_len
    hidden = [torch.randn(s.image_tokens, config.in_channels, device=device, dtype=dtype) for s in samples]
    ids = [torch.cat([flux.image_ids(*s.grid), flux.image_ids(*s.grid, index=1)]).to(device) for s in samples]
    batch = len(samples)
    text = torch.randn(batch, text_len, config.joint_attention_dim, device=device, dtype=dtype)
    pooled = torch.randn(batch, config.pooled_projection_dim, device=device, dtype=dtype)
    timestep = torch.rand(batch, device=device, dtype=dtype)
    txt_ids = torch.zeros(text_len, 3, device=device)
    guidance = torch.ones(batch, device=device, dtype=dtype)

    def run(transformer: nn.Module) -> Tensor:
        return flux.padded_forward(transformer, hidden, ids, text, pooled, timestep, txt_ids, guidance)[0]

    image_len = max(s.image_tokens for s in samples)
    return _batch(run, model, samples, device, dtype, batch * (text_len + image_len))


def qwen_batch(model: nn.Module, samples: list[Sample], device: torch.device, dtype: torch.dtype) -> Batch:
    """A Qwen-Image-Edit batch: target then reference image, each sample with its own text length."""
    config = base_model(model).config
    hidden = [torch.randn(s.image_tokens, config.in_channels, device=device, dtype=dtype) for s in samples]
    shapes = [[(1, *s.grid), (1, *s.grid)] for s in samples]
    text = [torch.randn(s.text_len, config.joint_attention_dim, device=device, dtype=dtype) for s in samples]
    timestep = torch.rand(len(samples), device=device, dtype=dtype)

    def run(transformer: nn.Module) -> Tensor:
        return qwen.padded_forward(transformer, hidden, shapes, text, timestep)[0]

    seq_len = max(s.text_len for s in samples) + max(s.image_tokens for s in samples)
    return _batch(run, model, samples, device, dtype, len(samples) * seq_len)


def _batch(
    run: Callable[[nn.Module], Tensor],
    model: nn.Module,
    samples: list[Sample],
    device: torch.device,
    dtype: torch.dtype,
    slots: int,
) -> Batch:
    """Add the loss target and mask (target tokens only) and the token counts to a batch."""
    image_len = max(s.image_tokens for s in samples)
    target = torch.randn(len(samples), image_len, base_model(model).proj_out.out_features, device=device, dtype=dtype)
    valid = lengths_mask([s.image_tokens // 2 for s in samples], image_len, device)
    return Batch(run, target, valid, [s.text_len + s.image_tokens for s in samples], slots)


def build(model: str, tiny: bool, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Random-weight transformer in `dtype` on the device, with a rank-16 LoRA adapter: tiny ones built there, full
    size ones from `meta` with their weights made on the device (`bench.random_weights`, no CPU initialisation)."""
    cls = FluxTransformer2DModel if model == "flux_kontext" else QwenImageTransformer2DModel
    if tiny:
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                transformer = tiny_transformer(model, **TINY_CONFIG[model])
        finally:
            torch.set_default_dtype(default)
    else:
        transformer = build_random(lambda: cls(**FULL_CONFIG[model]), dtype, device)
    transformer.requires_grad_(False)
    targets = [
        name
        for name, module in transformer.named_modules()
        if isinstance(module, nn.Linear) and "blocks." in name and "norm" not in name and "_mod." not in name
    ]
    transformer.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=targets))
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    transformer.train()
    return transformer


def block_counts(model: nn.Module) -> dict[str, int]:
    """Number of double-stream and single-stream blocks."""
    config = base_model(model).config
    return {"double": config.num_layers, "single": getattr(config, "num_single_layers", 0)}


def step_flops(model: nn.Module, lengths: list[int]) -> float:
    """Model FLOPs of one LoRA training step over samples with `lengths` real tokens (formula in the docstring)."""
    config = base_model(model).config
    dim = config.num_attention_heads * config.attention_head_dim
    total = 0.0
    for kind, blocks in block_counts(model).items():
        lora = LORA_PER_BLOCK[kind] * LORA_RANK * dim
        total += blocks * sum(48 * dim**2 * n + 6 * lora * n + 12 * dim * n**2 for n in lengths)
    return total


def peak_tflops(device: torch.device, dtype: torch.dtype, override: float | None) -> float | None:
    """Dense peak TFLOP/s for MFU: `override`, else the bf16/fp16 peak of a known GPU, else None."""
    if override is not None:
        return override
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


@contextmanager
def timed_bookkeeping(model: nn.Module, watch: Stopwatch) -> Iterator[None]:
    """Time rotary-table and attention-mask construction: stock embedder, `per_sample_rope`, `from_segments`."""
    embed = base_model(model).pos_embed.stock
    with (
        mock.patch.object(embed, "forward", watch.wrap(embed.forward)),
        mock.patch.object(qwen, "per_sample_rope", watch.wrap(qwen.per_sample_rope)),
        mock.patch.object(MixedAttention, "from_segments", watch.wrap(MixedAttention.from_segments)),
    ):
        yield


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
    """Forward, masked flow-matching loss, backward, AdamW step."""
    masked_mse_loss(batch.run(model), batch.target, batch.valid).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_cases(
    model: nn.Module, install: Callable, optimizer: torch.optim.Optimizer, results: list[Result], warmup: int
) -> None:
    """Step i of every case in turn, so load changes hit all cases alike; the first `warmup` rounds are untimed."""
    device = next(model.parameters()).device
    watch = Stopwatch(device)
    with timed_bookkeeping(model, watch):
        for step in range(len(results[0].batches)):
            for result in results:
                if result.backend != "stock":
                    install(model, result.backend)
                batch = result.batches[step]
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                watch.seconds = 0.0
                watch.sync()
                start = time.perf_counter()
                train_step(model, optimizer, batch)
                watch.sync()
                if step >= warmup:
                    result.seconds.append(time.perf_counter() - start)
                    result.tokens += sum(batch.lengths)
                    result.flops += step_flops(model, batch.lengths)
                    result.bookkeeping += watch.seconds
                    if device.type == "cuda":
                        result.peak_bytes = max(result.peak_bytes or 0, torch.cuda.max_memory_allocated(device))


def compile_works(device: torch.device) -> str | None:
    """None if torch.compile can build and run a small forward + backward here, else why not."""
    try:
        layer = nn.Linear(8, 8).to(device)
        torch.compile(layer)(torch.randn(2, 8, device=device)).sum().backward()
    except Exception as error:  # noqa: BLE001 - any compiler/toolchain failure means: skip compilation
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def bench_model(model_name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """Build one model, run every case and print its table."""
    torch.manual_seed(args.seed)
    shrink = TINY_SHRINK if args.tiny else 1
    model = build(model_name, args.tiny, device, dtype)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    is_flux = model_name == "flux_kontext"
    install, make = (flux.install_mixed, flux_batch) if is_flux else (qwen.install_mixed, qwen_batch)
    install(model)
    if args.compile:
        problem = compile_works(device)
        if problem is None:
            compile_blocks(model)
        else:
            print(f"--compile skipped, torch.compile does not work on {device}: {problem}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    samples = dataset(model_name, args.num_samples, shrink, args.seed)
    lengths = [s.image_tokens for s in samples]
    samplers = {
        "random": RandomBatchSampler(lengths, args.batch_size, seed=args.seed, drop_last=True),
        "grouped": LengthGroupedBatchSampler(lengths, args.batch_size, seed=args.seed, drop_last=True),
    }
    count = args.warmup + args.steps
    if len(samplers["random"]) < count:
        raise SystemExit(f"--num_samples must be at least (warmup + steps) x batch_size = {count * args.batch_size}")
    equal = equal_sample(samples)
    cases = [("equal size", ["stock"], [make(model, [equal] * args.batch_size, device, dtype)] * count)]
    for order, sampler in samplers.items():
        batches = [make(model, [samples[i] for i in b], device, dtype) for b in itertools.islice(sampler, count)]
        cases.append((f"mixed {order}", args.backends, batches))
    results = [
        Result(case, backend, batches, statistics.mean(b.padding for b in batches[args.warmup :]))
        for case, backends, batches in cases
        for backend in backends
    ]

    config = base_model(model).config
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    threads = f" ({torch.get_num_threads()} CPU threads)" if device.type == "cpu" else ""
    blocks = " + ".join(f"{n} {kind}" for kind, n in block_counts(model).items() if n)
    print(
        f"\n{NAMES[model_name]}: {blocks} blocks, {config.num_attention_heads} heads x {config.attention_head_dim}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params, LoRA r={LORA_RANK} "
        f"{trainable / 1e6:.2f} M trainable; {dtype} on {device}{threads}, batch {args.batch_size}, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}"
    )
    text = [s.text_len for s in samples]
    print(
        f"dataset: {len(samples)} samples, image tokens (target + reference) {min(lengths)}..{max(lengths)}, "
        f"mean {statistics.mean(lengths):.0f}, text {min(text)}..{max(text)}; equal-size case: "
        f"{equal.grid[0]}x{equal.grid[1]} token grids ({equal.image_tokens} image + {equal.text_len} text tokens); "
        f"image-token padding over an epoch: random {samplers['random'].padding_ratio():.1%}, "
        f"grouped {samplers['grouped'].padding_ratio():.1%}"
    )
    run_cases(model, install, optimizer, results, args.warmup)
    print_table(results, peak_tflops(device, dtype, args.peak_tflops))
    del model, optimizer, cases, results
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_table(results: list[Result], peak: float | None) -> None:
    """Markdown table of the cases, then grouped-vs-equal throughput per backend."""
    print("| case | backend | s/step | real tok/s | padding | TFLOP/s | MFU | peak mem | rope+mask |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        tflops = r.flop_rate / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "n/a"
        memory = f"{r.peak_bytes / 2**30:.1f} GiB" if r.peak_bytes is not None else "n/a"
        print(
            f"| {r.case} | {r.backend} | {statistics.median(r.seconds):.4f} | {r.token_rate:,.0f} | {r.padding:.1%} | "
            f"{tflops:.3f} | {mfu} | {memory} | {r.bookkeeping / sum(r.seconds):.2%} |"
        )
    equal = next(r for r in results if r.case == "equal size")
    grouped = [r for r in results if r.case == "mixed grouped"]
    tokens = ", ".join(f"{r.backend} {r.token_rate / equal.token_rate:.1%}" for r in grouped)
    flops = ", ".join(f"{r.backend} {r.flop_rate / equal.flop_rate:.1%}" for r in grouped)
    print(f"mixed grouped / equal size: real tok/s {tokens} (target >= 90%); model TFLOP/s {flops}")


@sdpa_kernels()  # the trainers' default kernels (no cuDNN attention)
def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="both", choices=[*MODELS, "both"])
    parser.add_argument("--tiny", action="store_true", help="small models, float32 on CPU, 16x fewer tokens")
    parser.add_argument("--device", help="default: cpu with --tiny, else cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 tiny, else bf16")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, help="default: all that run on device/dtype")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case before timing")
    parser.add_argument(
        "--gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        help="default: on at full size, off with --tiny",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the repeated transformer blocks (common.compile; bench/compile.py compares with eager)",
    )
    parser.add_argument("--peak_tflops", type=float, help="device peak for MFU (default: known GPUs' dense bf16)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    dtype = getattr(torch, args.dtype or ("float32" if args.tiny else "bfloat16"))
    args.backends = args.backends or available_backends(device, dtype)
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = not args.tiny
    for model_name in MODELS if args.model == "both" else [args.model]:
        bench_model(model_name, args, device, dtype)
    print(
        "\nMFU/TFLOP/s count model FLOPs per block and sample of L real tokens: 48*D^2*L (frozen base matmuls: "
        "forward + activation grads) + 6*a*r*D*L (LoRA: forward, activation and weight grads; a = 18 double, "
        "17 single) + 12*D*L^2 (attention, backward 2x forward); no padding, recompute, embedders or modulation."
    )


if __name__ == "__main__":
    main()
