"""Run a trainer (or any script) on a full-size checkpoint with random weights, built on the GPU in seconds. Not a test.

    python -m bench.random_weights --write flux_kontext /tmp/kontext     # configs, tokenizers and a data set (KB)
    python -m bench.random_weights train_flux_kontext.py --pretrained_model_name_or_path /tmp/kontext/model ...

`--write MODEL FOLDER` writes FOLDER/model, the model's checkpoint in the hub layout with its real full-size
configs (FULL_SIZE) and the tiny tokenizers, processors and scheduler of `common.tiny` but no weight files, and
FOLDER/data, a few edit pairs of mixed sizes up to 1024^2 (noise images) with REFERENCES controls each.

Then the script runs with diffusers' `ModelMixin.from_pretrained` and transformers' `PreTrainedModel.from_pretrained`
patched: a folder with a config and no weight files gives the model built as from_pretrained builds it (default dtype
the requested one, parameters on `meta`, buffers computed as usual), each parameter then made on the GPU (the CPU
without one) in the requested dtype (float32 in `_keep_in_fp32_modules`) with random values: matrices uniform in
+-1/sqrt(fan_in) (torch's Linear/Conv range), vectors named `weight` 1 (norm scales), other vectors 0; tied weights
stay tied. It is returned where from_pretrained returns it (CPU, eval mode), so the script's own placement
(offloading, `.to(device)`) runs as with real weights. A 20B transformer takes seconds instead of minutes of CPU
initialisation, and nothing is written to disk. Other folders load as usual. Quantized loading (nf4/int8) is refused.
"""

from __future__ import annotations

import argparse
import json
import runpy
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import init_empty_weights
from PIL import Image
from torch import nn

# Component config overrides that turn `common.tiny`'s configs into the released ones (token ids stay the tiny
# tokenizers', which are within every full vocabulary).
FULL_SIZE: dict[str, dict[str, dict[str, Any]]] = {
    "flux_kontext": {  # black-forest-labs/FLUX.1-Kontext-dev: 12B transformer, CLIP-L, T5-XXL (4.8B)
        "transformer": dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                            joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=[16, 56, 56]),
        "vae": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32, sample_size=1024),
        "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, projection_dim=768),
        "text_encoder_2": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                               relative_attention_num_buckets=32, relative_attention_max_distance=128),
    },
    "qwen_edit_plus": {  # Qwen/Qwen-Image-Edit-2509: 20B transformer, Qwen2.5-VL-7B
        "transformer": dict(num_layers=60, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                            axes_dims_rope=[16, 56, 56]),
        "vae": dict(base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2),
        "text_encoder": dict(
            text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                             rms_norm_eps=1e-6, layer_types=["full_attention"] * 28,
                             rope_parameters=dict(rope_type="default", mrope_section=[16, 24, 24],
                                                  rope_theta=1000000.0)),
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                               fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        ),
    },
    "flux2_klein": {  # black-forest-labs/FLUX.2-klein-base-4B: 4B transformer, Qwen3-4B
        "transformer": dict(in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
                            axes_dims_rope=[32, 32, 32, 32]),
        "vae": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=32,
                    norm_num_groups=32, sample_size=1024),
        "text_encoder": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                             max_position_embeddings=40960, rms_norm_eps=1e-6, layer_types=["full_attention"] * 36),
    },
}  # fmt: skip
REFERENCES = {"flux_kontext": 1, "qwen_edit_plus": 2, "flux2_klein": 2}  # control images per data row
SIZES = ((1024, 1024), (768, 768), (1216, 832), (512, 512))  # target (width, height) of the data rows
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.safetensors.index.json")
PROMPT = "make the first shape red"


def write_checkpoint(model: str, folder: Path, full_size: bool = True) -> Path:
    """`common.tiny`'s checkpoint of `model` without its weight files, its model configs made full size (FULL_SIZE)
    unless `full_size` is False; returns the folder."""
    from common.tiny import write_tiny

    if folder.exists():
        shutil.rmtree(folder)
    write_tiny(model, folder)
    for weights in [f for pattern in WEIGHT_FILES for f in folder.glob(f"*/{pattern}")]:
        weights.unlink()
    for component, overrides in (FULL_SIZE[model] if full_size else {}).items():
        path = folder / component / "config.json"
        path.write_text(json.dumps(_merged(json.loads(path.read_text()), overrides), indent=2))
    return folder


def _merged(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`config` with `overrides` applied, nested dicts (sub-configs) merged key by key."""
    out = dict(config)
    for key, value in overrides.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def control_names(stem: str, references: int) -> list[str]:
    """File names of a row's control images, as the data loader pairs them with stem.png."""
    return [f"{stem}_control.png"] if references == 1 else [f"{stem}_control_{k}.png" for k in range(references)]


def write_pairs(folder: Path, references: int, sizes: tuple[tuple[int, int], ...] = SIZES) -> None:
    """Edit pairs stem.png / stem_control[_k].png / stem.txt of noise images, one row per target size, `references`
    controls each (the first the target's size, the others the next rows' sizes)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, size in enumerate(sizes):
        controls = [(name, sizes[(i + k) % len(sizes)]) for k, name in enumerate(control_names(f"{i:03d}", references))]
        for name, (width, height) in [(f"{i:03d}.png", size), *controls]:
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name)
        (folder / f"{i:03d}.txt").write_text(PROMPT)


def has_no_weights(folder: Path) -> bool:
    """A local folder with a config and no weight files (what `write_checkpoint` writes per model)."""
    return (folder / "config.json").is_file() and not any(f for pattern in WEIGHT_FILES for f in folder.glob(pattern))


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype set to `dtype` inside (from_pretrained builds its models this way)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _fill_(value: torch.Tensor, name: str, generator: torch.Generator) -> None:
    """Random matrices in +-1/sqrt(fan_in), norm scales 1, other vectors 0 (module doc)."""
    if value.ndim >= 2:
        bound = value[0].numel() ** -0.5
        value.uniform_(-bound, bound, generator=generator)
    elif name == "weight":
        value.fill_(1)
    else:
        value.zero_()


def build_random(
    build: Callable[[], nn.Module],
    dtype: torch.dtype,
    device: torch.device,
    home: torch.device | None = None,
    keep_fp32: Sequence[str] = (),
) -> nn.Module:
    """`build()` with default dtype `dtype`, its parameters on `meta` (buffers computed as usual), then each made on
    `device` with random values (module doc) and kept there, or moved to `home`; float32 for names containing a
    `keep_fp32` entry; shared parameters once. Buffers end on `home` or `device`."""
    with _default_dtype(dtype), init_empty_weights():
        model = build()
    generator = torch.Generator(device).manual_seed(0)
    made: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:
                kind = torch.float32 if any(k in f"{module_name}.{name}" for k in keep_fp32) else dtype
                value = torch.empty(param.shape, dtype=kind if param.is_floating_point() else param.dtype,
                                    device=device)  # fmt: skip
                _fill_(value, name, generator)
                made[id(param)] = nn.Parameter(value.to(home or device), requires_grad=param.requires_grad)
            module._parameters[name] = made[id(param)]
    return model.to(home or device)


def random_model(cls: type[nn.Module], folder: Path, kwargs: dict[str, Any]) -> nn.Module:
    """`cls` as from_pretrained would load it from `folder`, with random weights made on the GPU (module doc)."""
    for refused in ("quantization_config", "device_map"):
        if kwargs.get(refused) is not None:
            raise ValueError(f"bench.random_weights: {refused} is not supported (loading {cls.__name__} from {folder})")
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    start = time.perf_counter()
    if hasattr(cls, "load_config"):  # diffusers

        def build() -> nn.Module:
            return cls.from_config(cls.load_config(folder))
    else:  # transformers

        def build() -> nn.Module:
            return cls(cls.config_class.from_pretrained(folder))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keep = list(getattr(cls, "_keep_in_fp32_modules", None) or [])
    model = build_random(build, dtype, device, home=torch.device("cpu"), keep_fp32=keep)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    count = sum(p.numel() for p in model.parameters())
    print(f"random weights: {cls.__name__} ({folder}) {count / 1e9:.2f} B params, {dtype}, "
          f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    return model.eval()


def _random_from_pretrained(loader: classmethod) -> classmethod:
    """`loader` (a from_pretrained), except for folders without weights: those give `random_model`."""

    def from_pretrained(cls: type, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any) -> Any:
        folder = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        if has_no_weights(folder):
            return random_model(cls, folder, kwargs)
        return loader.__func__(cls, pretrained_model_name_or_path, *args, **kwargs)

    return classmethod(from_pretrained)


@contextmanager
def random_weights() -> Iterator[None]:
    """diffusers' and transformers' from_pretrained give random weights for folders without weights, inside."""
    from diffusers.models.modeling_utils import ModelMixin
    from transformers import PreTrainedModel

    loaders = {base: base.__dict__["from_pretrained"] for base in (ModelMixin, PreTrainedModel)}
    for base, loader in loaders.items():
        base.from_pretrained = _random_from_pretrained(loader)
    try:
        yield
    finally:
        for base, loader in loaders.items():
            base.from_pretrained = loader


def main(argv: list[str] | None = None) -> None:
    """Write a checkpoint and data (--write), then run the script, if given, as `python SCRIPT ARGS` would."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", nargs=2, metavar=("MODEL", "FOLDER"), help=f"one of {sorted(FULL_SIZE)}")
    parser.add_argument("--tiny", action="store_true", help="--write keeps common.tiny's configs (CPU tests)")
    parser.add_argument("script", nargs="?", help="then run this script with random weights")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    args = parser.parse_args(argv)
    if args.write:
        model, folder = args.write[0], Path(args.write[1])
        if model not in FULL_SIZE:
            parser.error(f"--write: model must be one of {sorted(FULL_SIZE)}, not {model!r}")
        write_checkpoint(model, folder / "model", full_size=not args.tiny)
        write_pairs(folder / "data", REFERENCES[model])
        print(f"random weights: wrote {folder / 'model'} and {folder / 'data'}", flush=True)
    if args.script:
        saved = sys.argv, sys.path
        sys.argv, sys.path = [args.script, *args.args], [str(Path(args.script).resolve().parent), *sys.path]
        try:
            with random_weights():
                runpy.run_path(args.script, run_name="__main__")
        finally:
            sys.argv, sys.path = saved


if __name__ == "__main__":
    main()
