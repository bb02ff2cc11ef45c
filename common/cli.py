"""Command-line flags shared by `precompute_cache.py` and the training scripts, defined once with the same names."""

import argparse

from common.resolution import ResolutionPolicy

MODELS = ("flux_kontext", "qwen_edit", "qwen_edit_plus")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--pretrained_model_name_or_path and --revision, as in the diffusers examples."""
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="hub name or local folder")
    parser.add_argument("--revision", default=None, help="model revision on the hub")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Where the edit pairs come from and how each image is sized."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help="folder, JSONL/CSV manifest, `save_to_disk` folder or hub dataset name")
    data.add_argument("--image_column", default="image")
    data.add_argument("--control_column", default="control")
    data.add_argument("--caption_column", default="prompt")
    data.add_argument("--mask_column", default=None)
    data.add_argument("--cache_dir", default=None, help="Arrow cache written by precompute_cache.py")
    data.add_argument("--skip_bad_samples", action="store_true", help="skip unreadable rows and report them")
    size = parser.add_argument_group("resolution (priority: --resolution > --multi_resolutions > --target_area)")
    size.add_argument("--resolution", default=None, help="fixed size WxH for every image, e.g. 1024x768")
    size.add_argument("--multi_resolutions", nargs="+", default=None, help="candidate areas, e.g. 512*512 768*768")
    size.add_argument("--target_area", default="1024*1024", help="single area when no other size is given")
    size.add_argument("--max_aspect_ratio", type=float, default=3.0, help="centre-crop images beyond this ratio")


def resolution_policy(args: argparse.Namespace, model: str) -> ResolutionPolicy:
    """The ResolutionPolicy the flags describe, with the multiple and rounding of `model`'s pipeline."""
    fixed = None
    if args.resolution:
        width, _, height = args.resolution.lower().partition("x")
        if not (width.isdecimal() and height.isdecimal()):
            raise ValueError(f"--resolution must look like 1024x768, got {args.resolution!r}")
        fixed = (int(width), int(height))
    return ResolutionPolicy.for_model(
        model,
        fixed_size=fixed,
        multi_resolutions=args.multi_resolutions,
        target_area=args.target_area,
        max_aspect_ratio=args.max_aspect_ratio,
    )
