"""The training loop every trainer shares; a script supplies the `EditModel` that says what is specific to its model.

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
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from math import prod
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, gather_object, set_seed
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.optimization import get_scheduler
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from common.base_weights import is_placed_by_hooks, load_transformer, place_base_weights
from common.batch import NoisyBatch, pack_latents
from common.checkpoints import checkpoints, load_checkpoint, remove_partial_checkpoints, save_checkpoint, step_of
from common.cli import checkpoint_model, public_config
from common.comfyui import save_comfyui_lora
from common.errors import Interrupted, UserError, configure_logging
from common.flow_matching import noisy_and_target, sample_generator, sample_sigma
from common.hub import create_hub_repo, push_outputs
from common.lora import COMFYUI_FILE, LORA_FILE, add_lora, load_lora, save_lora, save_lora_state
from common.loss import edit_mask_weights, masked_mse_loss
from common.model_card import CARD_FILE, command_line, model_card, write_model_card
from common.models import EditModel
from common.padding import pad_sequences, padding_ratio
from common.plots import CURVES_FILE, save_training_curves
from common.run_guard import METRICS_FILE, run_identity, start_run, write_run
from common.sampler import LengthGroupedBatchSampler, RandomBatchSampler, TokenBudgetBatchSampler, collate_ragged
from common.sdpa import sdpa_kernels
from common.trackers import tracker_init_kwargs
from common.training_data import TrainingData, open_training_data, real_token_counts
from common.validation import Validation, validation_rows

logger = get_logger(__name__)
CONFIG_FILE = "training_config.json"
PADDING_WARNING = 0.30


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; raised before the step is applied, so saved state stays good."""


class TrainState:
    """Where training stands, saved in every checkpoint: optimizer steps done and the sampler position."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.batches_done = 0  # micro-batches of `epoch` already trained on

    def state_dict(self) -> dict[str, int]:
        """Plain values for the checkpoint's training_state.json."""
        return {"step": self.step, "epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore from a checkpoint's training_state.json."""
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
    mu: Callable[[int, FlowMatchEulerDiscreteScheduler], float] | None = None,
) -> tuple[NoisyBatch, list[Tensor], list[Tensor] | None]:
    """Noise each sample of a collated batch; returns the model inputs, velocity targets and optional loss weights.

    `mu`: the model's dynamic-shift rule for `--timestep_sampling shift` (`EditModel.timestep_mu`)."""
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
            mu,
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


def _sampler(
    args: argparse.Namespace, model: EditModel, data: TrainingData, accelerator: Accelerator
) -> RandomBatchSampler:
    """Random or `--group_by_length` batches of this rank, of `--train_batch_size` samples or filled up to
    `--max_tokens_per_batch` real tokens, from one global order shared by all ranks."""
    ranks = dict(seed=args.seed, num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    if args.max_tokens_per_batch:
        tokens = real_token_counts(args, model, data)
        return TokenBudgetBatchSampler(
            data.lengths, args.max_tokens_per_batch, tokens=tokens, group_by_length=args.group_by_length, **ranks
        )
    sampler_class = LengthGroupedBatchSampler if args.group_by_length else RandomBatchSampler
    return sampler_class(data.lengths, args.train_batch_size, **ranks)


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


def _register_lora_hooks(accelerator: Accelerator, model: EditModel, metrics_file: Path) -> None:
    """Checkpoints hold the LoRA (in the pipeline's format, and as trained for resume) instead of the whole
    transformer, and the training curves so far."""

    def save_hook(models: list[nn.Module], weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            save_lora(model.pipeline_class, models[0], output_dir)
            save_lora_state(models[0], output_dir)
            save_training_curves(metrics_file, Path(output_dir) / CURVES_FILE)
        weights.clear()

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        load_lora(models.pop(), input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _summary(args: argparse.Namespace, model: EditModel, accelerator: Accelerator) -> str:
    """One line with the settings a user checks first (the full set is in output_dir/training_config.json)."""
    global_batch = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    data = f"cache {args.cache_dir}" if args.cache_dir else f"dataset {args.dataset} (encoded on the fly)"
    steps = f"{args.gradient_accumulation_steps} accumulation x {accelerator.num_processes} processes"
    if args.max_tokens_per_batch:
        batch = f"up to {args.max_tokens_per_batch} real tokens per micro-batch and process (samples per step vary; "
    else:
        batch = f"{global_batch} samples ({args.train_batch_size} x "
    training_dtype = {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)
    base = {"auto": training_dtype, "fp8": "fp8 (e4m3, per-row scales)"}
    compiled = (
        "--compile: the first steps and each new batch layout compile first" if args.compile else "eager (no --compile)"
    )
    return (
        f"{model.name} from {args.pretrained_model_name_or_path}; {data}; {args.max_train_steps} steps of {batch}"
        f"{steps}); lr {args.learning_rate:g} ({args.lr_scheduler}); LoRA rank {args.rank}, alpha "
        f"{args.lora_alpha:g}; precision {accelerator.mixed_precision}; base weights "
        f"{base.get(args.base_precision, f'{args.base_precision} (bitsandbytes)')}; "
        f"{'blocks offloaded to CPU memory' if args.offload_blocks else 'no block offloading'}; "
        f"{compiled}; output {args.output_dir}"
    )


def train(args: argparse.Namespace, model: EditModel) -> Path:
    """Train a LoRA for `model` as the parsed flags say; returns the path of the saved LoRA weights. Every attention
    call of the run (on-the-fly encoding, training steps, validation) may use the --sdpa_kernels only."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        with sdpa_kernels(args.sdpa_kernels):
            return _train(args, model)
    finally:  # the Ctrl-C handler of the training loop (`_stop_on_interrupt`) ends with the run, however it ends
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _train(args: argparse.Namespace, model: EditModel) -> Path:
    """The run of `train`."""
    configure_logging(getattr(args, "quiet", False))
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=model.ddp_find_unused_parameters)],
    )
    if args.push_to_hub and accelerator.is_main_process:  # the Hub is checked before anything is written or loaded
        args.hub_model_id = create_hub_repo(args)
    weight_dtype = _weight_dtype(accelerator)
    # Everything the user can get wrong is checked before any weights load or anything is written: the output
    # folder (another run's results, the checkpoint to resume), the base checkpoint's pipeline, then the data (rows
    # validated, or the cache checked).
    resume, run = start_run(args, run_identity(args, model.name, accelerator.num_processes), public_config(args))
    checkpoint_model(args.pretrained_model_name_or_path, args.revision, [model], model.script)
    data = open_training_data(args, model, accelerator.device, weight_dtype)
    sampler = _sampler(args, model, data, accelerator)  # a --max_tokens_per_batch below a sample's tokens fails here
    if args.validation_steps:
        validation_rows(args.validation_prompts, args.validation_images, model)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_run(output_dir, run)
        remove_partial_checkpoints(output_dir)  # what a SIGKILL cut short
        (output_dir / CONFIG_FILE).write_text(json.dumps(public_config(args), indent=2, default=str))
    logger.info(f"configuration: {_summary(args, model, accelerator)}", main_process_only=True)
    set_seed(args.seed)

    # Models: the stock transformer with a LoRA adapter and the mixed-batch hooks; the scheduler for sigma shifts.
    transformer = load_transformer(model.transformer_class, args, accelerator.device, weight_dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision
    )
    model.install_mixed(transformer, args.attention_backend)
    params = add_lora(
        transformer, args.rank, args.lora_alpha, args.lora_target_modules, model.unused_modules(transformer)
    )
    place_base_weights(transformer, args, accelerator.device)  # --base_precision fp8, --offload_blocks
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    compile_watch = None
    if args.compile:
        from common.compile import CompileWatch, compile_blocks

        compile_blocks(transformer)
        compile_watch = CompileWatch()

    # Optimizer and schedule count optimizer steps (the scheduler is not wrapped, so it steps once per step).
    optimizer = _optimizer(args, params)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps,
    )

    # Data: cached or encoded on the fly, in the same row format; the sampler splits global batches across ranks.
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
        shared = None if data.cached else data.dataset.encoders  # on-the-fly data already holds the encoders
        validation = Validation(args, model, accelerator.device, weight_dtype, shared)

    transformer, optimizer = accelerator.prepare(
        transformer, optimizer, device_placement=[not is_placed_by_hooks(args), True]
    )
    state = TrainState()
    _register_lora_hooks(accelerator, model, output_dir / METRICS_FILE)
    if resume is not None:
        saved = load_checkpoint(accelerator, resume)
        state.load_state_dict(saved["train"])
        lr_scheduler.load_state_dict(saved["lr_scheduler"])
        logger.info(f"resumed from {resume} at step {step_of(resume)}/{args.max_train_steps}", main_process_only=True)
    if accelerator.is_main_process and accelerator.log_with:
        # Trackers take scalars; lists (target modules, resolutions) are logged as their text.
        config = {k: str(v) if isinstance(v, list | tuple) else v for k, v in public_config(args).items()}
        accelerator.init_trackers(args.tracker_project_name, config=config, init_kwargs=tracker_init_kwargs(output_dir))

    metrics = _Metrics(accelerator, args, state.step)
    batches = micro_batches(loader, state)
    _stop_on_interrupt(args, model, state)
    while state.step < args.max_train_steps:
        started = time.perf_counter()
        step_batches = [next(batches) for _ in range(args.gradient_accumulation_steps)]
        totals = accumulate_step(accelerator, transformer, model, args, scheduler, data, step_batches, state)
        grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        elapsed = time.perf_counter() - started
        if compile_watch is not None:
            compile_watch.after_step(state.step, elapsed)
        metrics.log(
            state.step,
            {
                "loss": totals["loss"],
                "lr": lr_scheduler.get_last_lr()[0],
                "padding_ratio": totals["padding_ratio"],
                "tokens": totals["tokens"],  # real tokens of the step on all ranks
                "tokens_per_second": totals["tokens"] / elapsed,
                "grad_norm": float(grad_norm),
                "epoch": state.epoch,
            },
        )
        if args.validation_steps and state.step % args.validation_steps == 0:
            if validation is not None:  # a no-grad forward of the unwrapped model; the other ranks wait
                images = validation.sample(accelerator.unwrap_model(transformer), args)
                validation.save(images, state.step, accelerator)
            accelerator.wait_for_everyone()
        if state.step % args.checkpointing_steps == 0 or state.step == args.max_train_steps:
            loop_state = {"train": state.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}
            save_checkpoint(accelerator, output_dir, state.step, args.checkpoints_total_limit, run, loop_state)

    metrics.bar.close()
    accelerator.wait_for_everyone()
    lora_file = output_dir / LORA_FILE
    if accelerator.is_main_process:
        try:
            lora_file = save_lora(model.pipeline_class, transformer, output_dir)
            if args.export_comfyui:
                save_comfyui_lora(model, lora_file, output_dir / COMFYUI_FILE)
        except OSError as error:
            kept = checkpoints(output_dir)
            where = f"{kept[-1]} holds the trained LoRA" if kept else "no checkpoint could be written either"
            raise UserError(f"could not write the LoRA weights to {output_dir} ({error}); {where}") from error
        logger.info(f"LoRA weights written to {lora_file}", main_process_only=True)
        _finish_outputs(args, model, data, accelerator)
    accelerator.end_training()
    return lora_file


def resume_command(args: argparse.Namespace, model: EditModel) -> str:
    """The run's launch command with `--resume_from_checkpoint latest` in place of any resume flag it had."""
    words, given = shlex.split(command_line(args, model)), []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word == "--resume_from_checkpoint":
            skip = True
        elif not word.startswith("--resume_from_checkpoint="):
            given.append(word)
    return shlex.join([*given, "--resume_from_checkpoint", "latest"])


def _stop_on_interrupt(args: argparse.Namespace, model: EditModel, state: TrainState) -> None:
    """Ctrl-C (SIGINT) stops training at once with `Interrupted`: the step reached, the last complete checkpoint and
    the command that resumes from it (no new checkpoint: the interrupt may land inside an optimizer step, and a
    checkpoint of a large run takes minutes, during which a second Ctrl-C is likely). `train` restores the handler
    it replaces."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum: int, frame: object) -> None:
        kept = checkpoints(args.output_dir)
        where = f"at step {state.step} of {args.max_train_steps}"
        if args.demo:
            raise Interrupted(f"{where}; the demo starts afresh in a new folder when run again")
        if not kept:
            raise Interrupted(
                f"{where}, before the first checkpoint (--checkpointing_steps {args.checkpointing_steps}): nothing "
                "to resume; start again with a new --output_dir"
            )
        raise Interrupted(
            f"{where}; the last complete checkpoint is {kept[-1]}; resume with: {resume_command(args, model)}"
        )

    signal.signal(signal.SIGINT, interrupt)


def _finish_outputs(args: argparse.Namespace, model: EditModel, data: TrainingData, accelerator: Accelerator) -> None:
    """training_curves.png and the model card README.md next to the final LoRA, then the --push_to_hub upload
    (main process)."""
    output_dir = Path(args.output_dir)
    save_training_curves(output_dir / METRICS_FILE, output_dir / CURVES_FILE)
    repo_id = args.hub_model_id if args.push_to_hub else None
    card = model_card(args, model, data, accelerator.num_processes, accelerator.mixed_precision, repo_id)
    if write_model_card(output_dir, card) is None:
        logger.warning(
            f"{output_dir / CARD_FILE} was not written by this trainer: it is kept and no model card is written",
            main_process_only=True,
        )
    if args.push_to_hub:
        logger.info(f"pushed to {push_outputs(output_dir, repo_id, args.hub_token)}", main_process_only=True)


def target_token_count(step_batches: list[tuple[int, dict]]) -> int:
    """Target tokens of all (epoch, batch) micro-batches of a step, references and text excluded: the loss's
    denominator on this rank."""
    return sum(prod(shapes[0]) for _, batch in step_batches for shapes in batch["img_shapes"])


def accumulate_step(
    accelerator: Accelerator,
    transformer: nn.Module,
    model: EditModel,
    args: argparse.Namespace,
    scheduler: FlowMatchEulerDiscreteScheduler,
    data: TrainingData,
    step_batches: list[tuple[int, dict]],
    state: TrainState,
) -> dict[str, float]:
    """Forward and backward of one optimizer step's micro-batches (gradients synchronised on the last); returns the
    logged loss, real tokens and padding ratio of the step. Attention uses the --sdpa_kernels only, in backward too.

    The loss is normalised by the target tokens of all the step's micro-batches on all ranks (fetched before the
    first forward), so accumulating k micro-batches equals one k times larger batch, whatever their sizes."""
    totals = {"loss": 0.0, "tokens": 0.0, "padding_ratio": 0.0}
    count = torch.tensor(float(target_token_count(step_batches)), device=accelerator.device)
    global_target_tokens = accelerator.reduce(count)
    for micro, (epoch, batch) in enumerate(step_batches):
        last = micro == len(step_batches) - 1
        with sdpa_kernels(args.sdpa_kernels), nullcontext() if last else accelerator.no_sync(transformer):
            loss, stats = _micro_step(
                accelerator, transformer, model, args, scheduler, data, batch, epoch, state, global_target_tokens
            )
            accelerator.backward(loss)
        for key in totals:
            totals[key] += stats[key] / (len(step_batches) if key == "padding_ratio" else 1)
    return totals


def _micro_step(
    accelerator: Accelerator,
    transformer: nn.Module,
    model: EditModel,
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
    noisy_batch, targets, weights = make_noisy_batch(
        batch, epoch, args, scheduler, data, accelerator.device, dtype, lambda n, s: model.timestep_mu(n, s, None)
    )
    predictions = model.predict(transformer, noisy_batch, args)
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
