"""Command-line flags shared by `precompute_cache.py` and the training scripts, defined once with the same names."""

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from diffusers import DiffusionPipeline, ModularPipeline
from diffusers.optimization import SchedulerType

from common.base_weights import add_memory_args, check_memory_args
from common.cache import FINGERPRINT_FILE
from common.errors import UserError
from common.flow_matching import TIMESTEP_SAMPLING
from common.models import MODELS, EditModel, get_model
from common.resolution import ResolutionPolicy, parse_resolution, size_for_area
from common.run_guard import resume_recorded_flags
from common.sdpa import add_sdpa_args
from common.trackers import check_wandb_login

CONTROL_RESOLUTIONS = ("target", "pipeline")
SIZE_CHOICE_FLAGS = ("resolution", "multi_resolutions", "target_area")  # one of them picks the size mode
SECRET_FLAGS = ("hub_token",)  # never written to files, trackers or logs
SECRET_OPTIONS = tuple(f"--{flag}" for flag in SECRET_FLAGS)


def add_model_args(parser: argparse.ArgumentParser, demo: bool = False) -> None:
    """--pretrained_model_name_or_path and --revision, as in the diffusers examples (optional with a --demo)."""
    parser.add_argument("--pretrained_model_name_or_path", required=not demo, help="hub name or local folder")
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
    data.add_argument(
        "--allow_target_only",
        action="store_true",
        help="train rows without a control image alongside rows with one (refused otherwise, naming the rows: a "
        "forgotten control file would train silently on the target alone)",
    )
    size = parser.add_argument_group("resolution (priority: --resolution > --multi_resolutions > --target_area)")
    size.add_argument("--resolution", default=None, help="fixed size WxH for every image, e.g. 1024x768")
    size.add_argument("--multi_resolutions", nargs="+", default=None, help="candidate areas, e.g. 512*512 768*768")
    size.add_argument("--target_area", default="1024*1024", help="single area when no other size is given")
    size.add_argument("--max_aspect_ratio", type=float, default=3.0, help="centre-crop images beyond this ratio")
    size.add_argument(
        "--control_resolution",
        default="target",
        type=_control_resolution,
        help="control images: 'target' (sized like targets), 'pipeline' (as the model's pipeline sizes them at "
        "inference, about 1 MP) or an area such as 768*768",
    )


def _control_resolution(value: str) -> str:
    """--control_resolution: 'target', 'pipeline' or an area ("768*768", "768x768", a pixel count)."""
    if value in CONTROL_RESOLUTIONS:
        return value
    try:
        parse_resolution(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected 'target', 'pipeline' or an area like 768*768: {error}") from error
    return value


def resolution_policy(args: argparse.Namespace, model: EditModel | str) -> ResolutionPolicy:
    """The ResolutionPolicy the flags describe, with the multiple and rounding of `model`'s pipeline."""
    model = get_model(model)
    fixed = None
    if args.resolution:
        width, _, height = args.resolution.lower().partition("x")
        if not (width.isdecimal() and height.isdecimal() and int(width) > 0 and int(height) > 0):
            raise UserError(f"--resolution must look like 1024x768, got {args.resolution!r}")
        fixed = (int(width), int(height))
    control = getattr(args, "control_resolution", "target")
    try:
        if control == "target":
            control_size = None
        elif control == "pipeline":
            control_size = model.inference_reference_size
        else:
            control_size = partial(
                size_for_area, area=parse_resolution(control), multiple=model.multiple, rounding=model.rounding
            )
        return model.policy(
            fixed_size=fixed,
            multi_resolutions=args.multi_resolutions,
            target_area=args.target_area,
            max_aspect_ratio=args.max_aspect_ratio,
            control_size=control_size,
        )
    except ValueError as error:  # a malformed size flag: name it as the user typed it
        flags = "--resolution/--multi_resolutions/--target_area/--max_aspect_ratio/--control_resolution"
        raise UserError(f"size flags ({flags}): {error}") from error


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """--quiet, shared by every script (INFO lines are shown by default)."""
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors, no INFO lines")


# Valid range of every numeric flag: (low, high, low excluded, high excluded); None = unbounded. Flags a script
# does not define are not checked.
FLAG_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "seed": (0, 2**32 - 1, False, False),  # numpy's seed range (set_seed seeds numpy too)
    "train_batch_size": (1, None, False, False),
    "gradient_accumulation_steps": (1, None, False, False),
    "max_train_steps": (1, None, False, False),
    "checkpointing_steps": (1, None, False, False),
    "checkpoints_total_limit": (1, None, False, False),
    "validation_steps": (1, None, False, False),
    "validation_inference_steps": (1, None, False, False),
    "learning_rate": (0, None, True, False),
    "lr_warmup_steps": (0, None, False, False),
    "adam_beta1": (0, 1, False, True),
    "adam_beta2": (0, 1, False, True),
    "adam_weight_decay": (0, None, False, False),
    "adam_epsilon": (0, None, True, False),
    "max_grad_norm": (0, None, True, False),
    "dataloader_num_workers": (0, None, False, False),
    "rank": (1, None, False, False),
    "lora_alpha": (0, None, True, False),
    "logit_mean": (None, None, False, False),
    "logit_std": (0, None, True, False),
    "sigmoid_scale": (0, None, True, False),
    "caption_dropout": (0, 1, False, False),
    "control_dropout": (0, 1, False, False),
    "mask_loss_weight": (0, None, False, False),
    "guidance_scale": (0, None, False, False),
    "max_sequence_length": (1, 512, False, False),  # T5's limit in FluxKontextPipeline
    "max_aspect_ratio": (1, None, False, False),
    "shard_size": (1, None, False, False),
    "max_tokens_per_batch": (1, None, False, False),
}


def check_ranges(args: argparse.Namespace) -> None:
    """UserError naming the first numeric flag outside its FLAG_RANGES interval (NaN and inf included)."""
    for flag, (low, high, low_open, high_open) in FLAG_RANGES.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        bad = not math.isfinite(value)
        bad |= low is not None and (value <= low if low_open else value < low)
        bad |= high is not None and (value >= high if high_open else value > high)
        if bad:
            left = "unbounded" if low is None else f"{'>' if low_open else '>='} {low}"
            right = "" if high is None else f" and {'<' if high_open else '<='} {high}"
            raise UserError(f"--{flag} must be {left}{right}, got {value}")


def check_local_path(flag: str, value: str | None, kind: str = "folder") -> None:
    """UserError when `value` does not exist locally and cannot be a hub name ("org/name") either."""
    if not value:
        return
    looks_local = os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") != 1
    if looks_local and not Path(value).expanduser().exists():
        raise UserError(f"--{flag} {value}: no such {kind}")


def pipeline_class_name(path: str, revision: str | None) -> str | None:
    """The pipeline class a checkpoint's model_index.json names, else its modular_model_index.json (a checkpoint of
    a model with only modular pipelines); OSError when it has neither."""
    try:
        return DiffusionPipeline.load_config(path, revision=revision).get("_class_name")
    except OSError:
        return ModularPipeline.load_config(path, revision=revision).get("_class_name")


def checkpoint_model(path: str, revision: str | None, accepted: Sequence[EditModel], user: str) -> EditModel:
    """The model of `accepted` whose pipeline class the checkpoint's model_index.json names (read before any weights
    load); else a UserError naming the class found, the classes `user` (a script) takes, and what trains it."""
    check_local_path("pretrained_model_name_or_path", path)
    try:
        name = pipeline_class_name(path, revision)
    except OSError as error:  # no model_index.json there, or the hub cannot be reached
        raise UserError(f"--pretrained_model_name_or_path {path}: {error}") from error
    for model in accepted:
        if model.pipeline_class.__name__ == name:
            return model
    expected = " or ".join(dict.fromkeys(model.pipeline_class.__name__ for model in accepted))
    owner = next((model for model in MODELS.values() if model.pipeline_class.__name__ == name), None)
    hint = (
        f"; it is {owner.title}: {owner.script} trains it (precompute_cache.py --model {owner.name})" if owner else ""
    )
    raise UserError(
        f"--pretrained_model_name_or_path {path}: its model_index.json names {name!r}; {user} takes {expected} "
        f"checkpoints{hint}"
    )


def add_training_args(parser: argparse.ArgumentParser, lora_targets: tuple[str, ...]) -> None:
    """The trainers' shared flags, named as in the diffusers examples; `lora_targets` is the model's default set."""
    out = parser.add_argument_group("output and logging")
    out.add_argument("--output_dir", default="output", help="LoRA weights, checkpoints, metrics and config")
    out.add_argument("--report_to", default="wandb", choices=["wandb", "tensorboard", "none"])
    out.add_argument("--tracker_project_name", default="edit-lora")
    out.add_argument("--checkpointing_steps", type=int, default=500, help="save the training state every N steps")
    out.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    out.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder')
    out.add_argument("--export_comfyui", action="store_true", help="also write the LoRA with ComfyUI keys")
    out.add_argument("--validation_steps", type=int, default=None, help="sample validation images every N steps")
    out.add_argument("--validation_prompts", nargs="+", default=None, help="one prompt per validation image")
    out.add_argument("--validation_images", nargs="+", default=None, help="control image(s) of the validation set")
    out.add_argument("--validation_inference_steps", type=int, default=28)
    out.add_argument("--push_to_hub", action="store_true", help="upload LoRA, model card and images to the Hub")
    out.add_argument("--hub_model_id", default=None, help="Hub repository (default: the --output_dir folder name)")
    out.add_argument("--hub_token", default=None, help="Hub token (default: the one `hf auth login` stored)")
    add_output_args(out)

    train = parser.add_argument_group("training")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train_batch_size", type=int, default=1, help="samples per process and micro-step")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--max_train_steps", type=int, default=1000, help="optimizer steps")
    train.add_argument("--learning_rate", type=float, default=1e-4)
    train.add_argument("--lr_scheduler", default="constant", help="any diffusers.optimization scheduler name")
    train.add_argument("--lr_warmup_steps", type=int, default=0)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=1e-4)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit")
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--mixed_precision", default=None, choices=["no", "bf16", "fp16"], help="default: accelerate's")
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--attention_backend", default="auto", choices=["auto", "masked", "split", "varlen"])
    add_sdpa_args(train)
    train.add_argument("--group_by_length", action="store_true", help="batch samples of similar token counts")
    train.add_argument(
        "--max_tokens_per_batch",
        type=int,
        default=None,
        help="fill each micro-batch up to this many real tokens (target + references + text) per process, "
        "instead of --train_batch_size samples",
    )
    train.add_argument("--compile", action="store_true", help="torch.compile each transformer block (regional)")
    train.add_argument("--dataloader_num_workers", type=int, default=0)

    add_memory_args(parser)

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=16)
    lora.add_argument("--lora_alpha", type=float, default=None, help="default: equal to --rank")
    lora.add_argument("--lora_target_modules", nargs="+", default=list(lora_targets))

    flow = parser.add_argument_group("flow matching")
    flow.add_argument("--timestep_sampling", default="shift", choices=TIMESTEP_SAMPLING)
    flow.add_argument("--logit_mean", type=float, default=0.0)
    flow.add_argument("--logit_std", type=float, default=1.0)
    flow.add_argument("--sigmoid_scale", type=float, default=1.0)
    flow.add_argument("--caption_dropout", type=float, default=0.0, help="train on the empty prompt this often")
    flow.add_argument("--control_dropout", type=float, default=0.0, help="mask out the references this often")
    flow.add_argument("--mask_loss_weight", type=float, default=1.0, help="loss weight of edit-mask tokens (rest 1)")
    flow.add_argument("--demo", action="store_true", help="build a tiny model and data set under ./demo and train")


def public_config(args: argparse.Namespace) -> dict:
    """The flags without secrets (`--hub_token`), for configuration files, trackers, logs and the model card."""
    return {k: v for k, v in vars(args).items() if k not in SECRET_FLAGS}


def check_training_args(args: argparse.Namespace, argv: list[str] | None = None) -> None:
    """Reject, naming the flag, everything that cannot work and needs no model weights (called right after parsing
    `argv`, None meaning sys.argv[1:]); records those flags, secrets dropped, as `args.training_command` for the
    model card."""
    given = sys.argv[1:] if argv is None else list(argv)
    args.training_command = [
        word
        for i, word in enumerate(given)
        if word.split("=")[0] not in SECRET_OPTIONS and (i == 0 or given[i - 1] not in SECRET_OPTIONS)
    ]
    if not args.demo and not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required (or use --demo)")
    if not args.demo and not (args.dataset or args.cache_dir):
        raise UserError("give --dataset (encoded on the fly) or --cache_dir (from precompute_cache.py)")
    check_ranges(args)
    if args.lr_scheduler not in {s.value for s in SchedulerType}:
        raise UserError(f"--lr_scheduler {args.lr_scheduler!r}: expected one of {[s.value for s in SchedulerType]}")
    if not args.demo:
        check_local_path("pretrained_model_name_or_path", args.pretrained_model_name_or_path)
    if args.validation_steps and not (args.validation_prompts and args.validation_images):
        raise UserError("--validation_steps needs --validation_prompts and --validation_images")
    if (
        args.validation_prompts
        and args.validation_images
        and len(args.validation_prompts) != len(args.validation_images)
    ):
        raise UserError("--validation_prompts and --validation_images must have one entry per validation sample")
    check_memory_args(args)
    if not args.demo:  # the demo logs W&B offline
        check_wandb_login(args.report_to)
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)


def _area_flag(area: int) -> str:
    """An area as a size flag takes it: "512*512" for a square, else the pixel count."""
    side = math.isqrt(area)
    return f"{side}*{side}" if side * side == area else str(area)


def cache_size_flags(args: argparse.Namespace, given: set[str]) -> None:
    """With --cache_dir, set the size flags the user did not give to the cache's own (its fingerprint.json names
    them by flag): --resolution/--multi_resolutions/--target_area together, the others one by one."""
    path = Path(args.cache_dir or "") / FINGERPRINT_FILE
    if not args.cache_dir or not path.is_file():
        return  # no cache there: opening it says so
    stored = json.loads(path.read_text())
    values = {
        "max_aspect_ratio": stored.get("max_aspect_ratio"),
        "control_resolution": stored.get("control_resolution"),
        "max_sequence_length": stored.get("max_sequence_length"),
    }
    if not given & set(SIZE_CHOICE_FLAGS):
        resolution, areas, area = stored.get("resolution"), stored.get("multi_resolutions"), stored.get("target_area")
        values["resolution"] = f"{resolution[0]}x{resolution[1]}" if resolution else None
        values["multi_resolutions"] = [_area_flag(a) for a in areas] if areas else None
        values["target_area"] = _area_flag(area) if area else None
    for flag, value in values.items():
        if value is not None and flag not in given and flag in vars(args):  # None: a setting the cache does not use
            setattr(args, flag, value)


def _training_parser(model: EditModel | None, description: str = "") -> argparse.ArgumentParser:
    """The parser of a trainer's flags: the shared ones, `model`'s default LoRA targets and its own flags (None: the
    shared ones only, without --help)."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=description, add_help=model is not None)
    add_model_args(parser, demo=True)
    add_data_args(parser)
    add_training_args(parser, model.lora_targets if model else ())
    if model is not None:
        model.add_args(parser)
    return parser


def _given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Names of the flags `argv` sets explicitly (`parser` is consumed: its defaults are suppressed)."""
    for action in parser._actions:  # argparse's documented SUPPRESS default: unset flags stay out of the namespace
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(argv)[0]))


def _parse(model: EditModel | None, description: str, argv: list[str] | None) -> argparse.Namespace:
    """The flags of `argv` (with a model: all of them, else the shared ones, others ignored); those the user does
    not give come from the record of the run resumed, then (sizes and text length) from the cache at --cache_dir,
    before the defaults."""
    parser = _training_parser(model, description)
    args = parser.parse_args(argv) if model is not None else parser.parse_known_args(argv)[0]
    given = _given_flags(_training_parser(model, description), argv)
    given |= set(resume_recorded_flags(args, given))
    cache_size_flags(args, given)
    return args


def known_training_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The shared trainer flags of `argv` (others ignored) as `parse_training_args` completes them, unchecked: for a
    script that picks its model from them."""
    return _parse(None, "", argv)


def parse_training_args(model: EditModel, description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """A trainer's flags (`model`'s included), completed from the run resumed and the cache (`_parse`), checked."""
    args = _parse(model, description, argv)
    check_training_args(args, argv)
    if args.export_comfyui and model.comfyui_keys is None:
        raise UserError(f"--export_comfyui: ComfyUI's LoRA key names for {model.title} are not known")
    return args
