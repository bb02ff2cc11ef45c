"""The training loop every trainer shares; a script supplies a `Recipe` with what is specific to its model.

One optimizer step = `--gradient_accumulation_steps` micro-batches per process. Each sample draws its own noise,
sigma and dropout coins from a generator keyed by (seed, epoch, dataset index) (`common.flow_matching`), batches
come from a resumable sampler that splits every global batch across ranks, and the loss is normalised by the
target tokens of all micro-batches of the step on all ranks. Together these make a 2-process run equal a
1-process run with the same global batch, accumulation equal a larger batch, and a resumed run bitwise equal an
uninterrupted one on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.optimization import get_scheduler
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from common.checkpoints import checkpoints, save_checkpoint, step_of
from common.encoders import pack_latents
from common.errors import UserError, configure_logging
from common.flow_matching import noisy_and_target, sample_generator, sample_sigma
from common.lora import COMFYUI_FILE, LORA_FILE, add_lora, load_lora, save_lora
from common.loss import edit_mask_weights, masked_mse_loss
from common.padding import pad_sequences, padding_ratio
from common.run_guard import METRICS_FILE, run_identity, start_run, write_run
from common.sampler import LengthGroupedBatchSampler, RandomBatchSampler, collate_ragged
from common.training_data import TrainingData, open_training_data

logger = get_logger(__name__)
CONFIG_FILE = "training_config.json"
PADDING_WARNING = 0.30


@dataclass
class NoisyBatch:
    """One micro-batch as the model sees it: ragged per-sample tokens, each sample with its own sigma."""

    sample_ids: list[str]
    noisy: list[Tensor]  # (N_i, C) noisy packed target tokens
    references: list[list[Tensor]]  # packed reference tokens of each sample, in img_shapes order
    img_shapes: list[list[tuple[int, int, int]]]  # packed grids, target first
    prompt_embeds: list[Tensor]  # (T_i, D), after caption dropout
    pooled_prompt_embeds: list[Tensor] | None  # FLUX only
    sigmas: Tensor  # (B,)
    attend: list[int]  # image tokens each sample attends to (its target only when its references were dropped)


@dataclass(frozen=True)
class Recipe:
    """What a training script contributes: its model's classes, default LoRA targets and prediction."""

    model: str  # a key of common.cli.MODELS
    pipeline_class: type[DiffusionPipeline]
    transformer_class: type[nn.Module]
    lora_targets: tuple[str, ...]
    install_mixed: Callable[[nn.Module, str], None]
    predict: Callable[[nn.Module, NoisyBatch, argparse.Namespace], list[Tensor]]  # -> (N_i, C) target predictions
    unused_modules: Callable[[nn.Module], list[str]] = lambda transformer: []  # outputs that never reach the loss


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; raised before the step is applied, so saved state stays good."""


class TrainState:
    """Where training stands, saved in every checkpoint: optimizer steps done and the sampler position."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.batches_done = 0  # micro-batches of `epoch` already trained on

    def state_dict(self) -> dict[str, int]:
        """Plain values for `accelerator.save_state`."""
        return {"step": self.step, "epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore from `accelerator.load_state`."""
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]


def micro_batches(loader: DataLoader, state: TrainState) -> Iterator[tuple[int, dict]]:
    """Endless (epoch, batch) stream from the resume point on; `state` counts what was handed out."""
    sampler = loader.batch_sampler
    while True:
        sampler.load_state_dict({"epoch": state.epoch, "batches_done": state.batches_done})
        for batch in loader:
            state.batches_done += 1
            yield state.epoch, batch
        state.epoch += 1
        state.batches_done = 0


def make_noisy_batch(
    batch: dict,
    epoch: int,
    args: argparse.Namespace,
    scheduler: FlowMatchEulerDiscreteScheduler,
    data: TrainingData,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[NoisyBatch, list[Tensor], list[Tensor] | None]:
    """Noise each sample of a collated batch; returns the model inputs, velocity targets and optional loss weights."""
    noisy, targets, references, prompts, pooled, sigmas, attend, weights = [], [], [], [], [], [], [], []
    for i, index in enumerate(batch["index"]):
        generator = sample_generator(args.seed, epoch, int(index))
        drop_caption, drop_control = (
            torch.rand(2, generator=generator) < torch.tensor([args.caption_dropout, args.control_dropout])
        ).tolist()
        x0 = pack_latents(batch["target_latents"][i].float())
        sigma = sample_sigma(
            args.timestep_sampling,
            generator,
            x0.shape[0],
            scheduler,
            args.logit_mean,
            args.logit_std,
            args.sigmoid_scale,
        )
        x_t, target = noisy_and_target(x0, torch.randn(x0.shape, generator=generator), sigma)
        refs = [pack_latents(c).to(device, dtype) for c in batch["control_latents"][i]]
        noisy.append(x_t.to(device, dtype))
        targets.append(target.to(device))
        references.append(refs)
        sigmas.append(sigma)
        attend.append(x0.shape[0] + (0 if drop_control else sum(r.shape[0] for r in refs)))
        if drop_caption:
            empty = data.empty_prompt or {"prompt_embeds": batch["empty_prompt_embeds"][i]}
            prompts.append(empty["prompt_embeds"].to(device, dtype))
            pooled.append(empty.get("pooled_prompt_embeds"))
        else:
            prompts.append(batch["prompt_embeds"][i].to(device, dtype))
            pooled.append(batch.get("pooled_prompt_embeds", [None] * len(batch["index"]))[i])
        mask = batch["mask"][i] if "mask" in batch else None
        if args.mask_loss_weight != 1.0 and mask is not None:
            weights.append(edit_mask_weights(mask.flatten().float(), args.mask_loss_weight, 1.0).to(device))
        else:
            weights.append(torch.ones(x0.shape[0], device=device))
    has_pooled = pooled[0] is not None
    return (
        NoisyBatch(
            sample_ids=list(batch["sample_id"]),
            noisy=noisy,
            references=references,
            img_shapes=[[tuple(int(d) for d in s) for s in shapes] for shapes in batch["img_shapes"]],
            prompt_embeds=prompts,
            pooled_prompt_embeds=[p.to(device, dtype) for p in pooled] if has_pooled else None,
            sigmas=torch.tensor(sigmas, device=device, dtype=dtype),
            attend=attend,
        ),
        targets,
        weights if args.mask_loss_weight != 1.0 else None,
    )


def _weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """Dtype of the frozen base weights under accelerate's mixed precision (LoRA weights stay float32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)


def _optimizer(args: argparse.Namespace, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW) over the LoRA parameters."""
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def _sampler(args: argparse.Namespace, data: TrainingData, accelerator: Accelerator) -> RandomBatchSampler:
    """Random or `--group_by_length` batches of this rank, from one global order shared by all ranks."""
    sampler_class = LengthGroupedBatchSampler if args.group_by_length else RandomBatchSampler
    return sampler_class(
        data.lengths,
        args.train_batch_size,
        seed=args.seed,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )


class _Metrics:
    """Per-step logging: trackers (W&B / TensorBoard), `metrics.jsonl` next to the outputs, and the tqdm bar."""

    def __init__(self, accelerator: Accelerator, args: argparse.Namespace, initial_step: int) -> None:
        self.accelerator = accelerator
        self.args = args
        self.path = Path(args.output_dir) / METRICS_FILE
        self.warned = False
        if accelerator.is_main_process and self.path.exists():
            # A resumed run continues the record from its checkpoint; a fresh run starts a new one.
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line)["step"] <= initial_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.bar = tqdm(
            total=args.max_train_steps,
            initial=initial_step,
            desc="steps",
            disable=not accelerator.is_local_main_process,
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        """Record one optimizer step's values everywhere they go."""
        if values["padding_ratio"] > PADDING_WARNING and not self.args.group_by_length and not self.warned:
            self.warned = True
            logger.warning(
                f"{values['padding_ratio']:.0%} of this batch is padding; --group_by_length batches samples of "
                "similar sizes together and wastes less compute",
                main_process_only=True,
            )
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", pad=f"{values['padding_ratio']:.0%}")


def _register_lora_hooks(accelerator: Accelerator, recipe: Recipe) -> None:
    """Checkpoints hold the LoRA weights in the pipeline's format instead of the whole transformer."""

    def save_hook(models: list[nn.Module], weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            save_lora(recipe.pipeline_class, models[0], output_dir)
        weights.clear()

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        load_lora(recipe.pipeline_class, models.pop(), input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _summary(args: argparse.Namespace, recipe: Recipe, accelerator: Accelerator) -> str:
    """One line with the settings a user checks first (the full set is in output_dir/training_config.json)."""
    global_batch = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    data = f"cache {args.cache_dir}" if args.cache_dir else f"dataset {args.dataset} (encoded on the fly)"
    return (
        f"{recipe.model} from {args.pretrained_model_name_or_path}; {data}; {args.max_train_steps} steps of "
        f"{global_batch} samples ({args.train_batch_size} x {args.gradient_accumulation_steps} accumulation x "
        f"{accelerator.num_processes} processes); lr {args.learning_rate:g} ({args.lr_scheduler}); LoRA rank "
        f"{args.rank}, alpha {args.lora_alpha:g}; precision {accelerator.mixed_precision}; output {args.output_dir}"
    )


def train(args: argparse.Namespace, recipe: Recipe) -> Path:
    """Train a LoRA for `recipe` as the parsed flags say; returns the path of the saved LoRA weights."""
    configure_logging(getattr(args, "quiet", False))
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    weight_dtype = _weight_dtype(accelerator)
    # Everything the user can get wrong is checked before any weights load or anything is written: the output
    # folder (another run's results, the checkpoint to resume), then the data (rows validated, or the cache checked).
    resume, run = start_run(args, run_identity(args, recipe.model, accelerator.num_processes))
    data = open_training_data(args, recipe.model, accelerator.device, weight_dtype)
    if args.validation_steps:
        from common.validation import validation_rows

        validation_rows(args.validation_prompts, args.validation_images, recipe.model)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_run(output_dir, run)
        (output_dir / CONFIG_FILE).write_text(json.dumps(vars(args), indent=2, default=str))
    logger.info(f"configuration: {_summary(args, recipe, accelerator)}", main_process_only=True)
    set_seed(args.seed)

    # Models: the stock transformer with a LoRA adapter and the mixed-batch hooks; the scheduler for sigma shifts.
    transformer = recipe.transformer_class.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="transformer", revision=args.revision, torch_dtype=weight_dtype
    ).to(accelerator.device)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision
    )
    recipe.install_mixed(transformer, args.attention_backend)
    params = add_lora(
        transformer, args.rank, args.lora_alpha, args.lora_target_modules, recipe.unused_modules(transformer)
    )
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()

    # Optimizer and schedule count optimizer steps (the scheduler is not wrapped, so it steps once per step).
    optimizer = _optimizer(args, params)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps,
    )

    # Data: cached or encoded on the fly, in the same row format; the sampler splits global batches across ranks.
    sampler = _sampler(args, data, accelerator)
    loader = DataLoader(
        data.dataset,
        batch_sampler=sampler,
        collate_fn=collate_ragged,
        num_workers=args.dataloader_num_workers if data.cached else 0,
    )
    logger.info(
        f"{len(data.lengths)} samples, {len(sampler)} global batches per epoch, expected padding ratio "
        f"{sampler.padding_ratio():.1%} ({'grouped by length' if args.group_by_length else 'random order'})",
        main_process_only=True,
    )
    validation = None
    if args.validation_steps and accelerator.is_main_process:  # only the main process samples (see the loop)
        from common.validation import Validation

        shared = None if data.cached else data.dataset.encoders  # on-the-fly data already holds the encoders
        validation = Validation(args, recipe.model, accelerator.device, weight_dtype, shared)

    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(lr_scheduler, state)
    _register_lora_hooks(accelerator, recipe)
    if resume is not None:
        accelerator.load_state(str(resume))
        logger.info(f"resumed from {resume} at step {step_of(resume)}/{args.max_train_steps}", main_process_only=True)
    if accelerator.is_main_process and accelerator.log_with:
        # Trackers take scalars; lists (target modules, resolutions) are logged as their text.
        config = {k: str(v) if isinstance(v, list | tuple) else v for k, v in vars(args).items()}
        accelerator.init_trackers(args.tracker_project_name, config=config)

    metrics = _Metrics(accelerator, args, state.step)
    batches = micro_batches(loader, state)
    while state.step < args.max_train_steps:
        started = time.perf_counter()
        totals = {"loss": 0.0, "tokens": 0.0, "padding_ratio": 0.0}
        # The step's micro-batches are fetched first so the loss can be normalised by the target tokens of all of
        # them on all ranks: accumulating k micro-batches then equals one k times larger batch.
        step_batches = [next(batches) for _ in range(args.gradient_accumulation_steps)]
        target_tokens = sum(prod(shapes[0]) for _, batch in step_batches for shapes in batch["img_shapes"])
        global_target_tokens = accelerator.reduce(torch.tensor(float(target_tokens), device=accelerator.device))
        for micro, (epoch, batch) in enumerate(step_batches):
            last = micro == args.gradient_accumulation_steps - 1
            with nullcontext() if last else accelerator.no_sync(transformer):
                loss, stats = _micro_step(
                    accelerator, transformer, recipe, args, scheduler, data, batch, epoch, state, global_target_tokens
                )
                accelerator.backward(loss)
            for key in totals:
                totals[key] += stats[key] / (args.gradient_accumulation_steps if key == "padding_ratio" else 1)
        grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        elapsed = time.perf_counter() - started
        metrics.log(
            state.step,
            {
                "loss": totals["loss"],
                "lr": lr_scheduler.get_last_lr()[0],
                "padding_ratio": totals["padding_ratio"],
                "tokens_per_second": totals["tokens"] / elapsed,
                "grad_norm": float(grad_norm),
                "epoch": state.epoch,
            },
        )
        if args.validation_steps and state.step % args.validation_steps == 0:
            if validation is not None:  # a no-grad forward of the unwrapped model; the other ranks wait
                images = validation.sample(accelerator.unwrap_model(transformer), recipe, args)
                validation.save(images, state.step, accelerator)
            accelerator.wait_for_everyone()
        if state.step % args.checkpointing_steps == 0 or state.step == args.max_train_steps:
            save_checkpoint(accelerator, output_dir, state.step, args.checkpoints_total_limit, run)

    metrics.bar.close()
    accelerator.wait_for_everyone()
    lora_file = output_dir / LORA_FILE
    if accelerator.is_main_process:
        try:
            lora_file = save_lora(recipe.pipeline_class, transformer, output_dir)
            if args.export_comfyui:
                from common.comfyui import save_comfyui_lora

                save_comfyui_lora(recipe.model, lora_file, output_dir / COMFYUI_FILE)
        except OSError as error:
            kept = checkpoints(output_dir)
            where = f"{kept[-1]} holds the trained LoRA" if kept else "no checkpoint could be written either"
            raise UserError(f"could not write the LoRA weights to {output_dir} ({error}); {where}") from error
        logger.info(f"LoRA weights written to {lora_file}", main_process_only=True)
    accelerator.end_training()
    return lora_file


def _micro_step(
    accelerator: Accelerator,
    transformer: nn.Module,
    recipe: Recipe,
    args: argparse.Namespace,
    scheduler: FlowMatchEulerDiscreteScheduler,
    data: TrainingData,
    batch: dict,
    epoch: int,
    state: TrainState,
    global_target_tokens: Tensor,
) -> tuple[Tensor, dict[str, float]]:
    """This micro-batch's share of the step loss (squared errors over the target tokens of the whole step on all
    ranks), scaled so DDP's gradient average gives the global-token mean; stops on NaN/inf before backward."""
    dtype = _weight_dtype(accelerator)
    noisy_batch, targets, weights = make_noisy_batch(batch, epoch, args, scheduler, data, accelerator.device, dtype)
    predictions = recipe.predict(transformer, noisy_batch, args)
    pred, valid = pad_sequences(predictions)
    target, _ = pad_sequences(targets)
    weight = pad_sequences(weights)[0] if weights is not None else None
    loss = masked_mse_loss(pred, target, valid, weight, global_valid_tokens=global_target_tokens)
    loss = loss * accelerator.num_processes
    # One all-reduce for everything logged: loss and padding ratio are averaged over ranks, real tokens summed.
    local_tokens = sum(batch["lengths"]) + sum(p.shape[0] for p in noisy_batch.prompt_embeds)
    logged = torch.tensor([padding_ratio(batch["lengths"]), float(local_tokens)], device=loss.device)
    summed = accelerator.reduce(torch.cat([loss.detach().float()[None], logged])).tolist()
    reported, pad, global_tokens = (
        summed[0] / accelerator.num_processes,
        summed[1] / accelerator.num_processes,
        summed[2],
    )
    if not math.isfinite(reported):
        sample_ids = gather_object(noisy_batch.sample_ids)
        raise TrainingDiverged(
            f"loss is {reported} at step {state.step + 1} (epoch {epoch}); samples in this batch: {sample_ids}. "
            f"Nothing was applied from this step; checkpoints already saved in {args.output_dir} are intact."
        )
    return loss, {"loss": reported, "tokens": global_tokens, "padding_ratio": pad}
