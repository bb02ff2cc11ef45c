"""Everything a short GPU session should run, in one command, into one markdown report. Not a test.

    PYTHONPATH=$PWD/.gpu_site python -m bench.gpu_check      # on a CUDA machine: at most 8 minutes (BUDGET_S)

Stages, in priority order, each a subprocess with its own time limit cut from the total `--budget_s`, so a
crash, an out-of-memory error or a hang in one stage still leaves the others and the report:
1. `pytest -m cuda`: mixed batch vs each sample alone through the stock model and LoRA gradients for every
   attention backend (varlen included) in fp32 and bf16, and one bf16 trainer run per trainer (tiny models).
2. The trainer scripts themselves, 2 steps each on a full-size checkpoint with random weights (`bench.random_weights`:
   the released configs, weights made on the GPU), as a user runs them: bf16, gradient checkpointing, mixed sizes up
   to 1024^2 in batches of 2, validation at step 2, no tracker; FLUX.1 Kontext, Qwen-Image-Edit-2509 with 2
   references per sample, FLUX.2 [klein] with 2 references.
3. `bench.memory --device cuda`, one process per option (auto, fp8, nf4, int8, auto+offload, fp8+offload) for
   FLUX.1 Kontext and Qwen-Image-Edit-2509 with 1 and 2 references, batch 1, gradient checkpointing on, peak and
   step time; the cells the README's memory targets name first (Kontext fp8 and fp8+offload, Edit-2509 fp8+offload).
4. `bench.train_step` (full-size FLUX.1 Kontext, every backend) and `bench.compile` (eager vs `--compile`), cut to
   fit: whatever budget is left.

A stage starts only with at least MIN_STAGE_S left, and runs for at most its limit or what is left. The report is
written after every stage to `--report` (default: `$OUT/gpu_check.md` when OUT is set, else `gpu_check.md`), and its
path is printed first and last: one table row per stage with its status, time and, for a failed stage, the last line
of its traceback or error; then per stage its command and output, with the last lines of stderr where it failed.
Without CUDA it prints that it needs a GPU, runs nothing and exits 0. It imports neither `datasets`, `wandb` nor
`bitsandbytes` itself (README, "Benchmarks": `bash bench/fetch_wheels.sh` makes the folder to carry).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BUDGET_S = 465  # the stages together: inside a device command's 8 minutes (480 s), after imports and CUDA start
MIN_STAGE_S = 20  # a stage needs at least this much of the budget to start
STDERR_LINES = 40  # stderr lines kept in the report for a failed stage
PROGRESS = re.compile(r"\d+%\|")  # tqdm progress bars, dropped from stderr tails
TABLE = re.compile(r"^\|[ :]*---", re.MULTILINE)  # a markdown table's separator row
EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b|error:)")  # a traceback's last line
# A trainer run (stage 2): the flags a user would use, 2 steps of 2 samples, validated at the last step.
TRAINER_FLAGS = (
    "--multi_resolutions", "512*512", "768*768", "1024*1024", "--train_batch_size", "2", "--max_train_steps", "2",
    "--mixed_precision", "bf16", "--gradient_checkpointing", "--report_to", "none", "--validation_steps", "2",
    "--validation_inference_steps", "2", "--seed", "0",
)  # fmt: skip
# Kontext: the first GPU check (H200) wrote its LoRA at the 90 s limit, random weights built in 33 s of it.
TRAINER_MODELS = (("flux_kontext", 110), ("qwen_edit_plus", 140), ("flux2_klein", 60))  # (model, limit in s)
MEMORY_LIMIT_S = 45
# (bench.memory case index, option) of the README's memory targets, measured first: Kontext fp8 (the step time that
# fp8+offload is held to), Kontext fp8+offload, Qwen-Image-Edit-2509 fp8+offload with 1 and 2 references.
MEMORY_TARGETS = ((0, "fp8"), (0, "fp8+offload"), (1, "fp8+offload"), (2, "fp8+offload"))


@dataclass(frozen=True)
class Stage:
    """One step of the check: a command and the most seconds it may take (further capped by what is left)."""

    title: str
    argv: list[str]
    limit_s: int
    tail_lines: int | None = None  # keep only the last lines of long outputs (pytest); None keeps everything


def trainer_stage(python: str, model: str, limit_s: int, work: Path) -> Stage:
    """A 2-step run of `model`'s trainer script on a full-size random-weight checkpoint written under `work`."""
    from bench.random_weights import PROMPT, REFERENCES, control_names
    from common.models import get_model

    described, folder = get_model(model), work / model
    controls = ",".join(str(folder / "data" / name) for name in control_names("000", REFERENCES[model]))
    argv = [python, "-m", "bench.random_weights", "--write", model, str(folder), described.script]
    argv += ["--pretrained_model_name_or_path", str(folder / "model"), "--dataset", str(folder / "data")]
    argv += ["--output_dir", str(folder / "out"), *TRAINER_FLAGS]
    argv += ["--validation_prompts", PROMPT, "--validation_images", controls]
    return Stage(f"Trainer, {described.title} full size ({described.script})", argv, limit_s)


def memory_stages(python: str) -> list[Stage]:
    """bench.memory's full-size CUDA measurement, one process per case and option (an OOM or crash stays there)."""
    from bench.memory import CASES, OPTIONS

    memory = [python, "-m", "bench.memory", "--device", "cuda", "--batch_sizes", "1", "--checkpointing", "on"]
    rest = [(i, option) for i in range(len(CASES)) for option in OPTIONS if (i, option) not in MEMORY_TARGETS]
    cells = [*MEMORY_TARGETS, *rest]
    return [
        Stage(f"Memory, {CASES[i].name}, {option}", [*memory, "--cases", str(i), "--options", option], MEMORY_LIMIT_S)
        for i, option in cells
    ]


def stages(python: str, work: Path) -> list[Stage]:
    """The stages in priority order (what runs first survives a short budget); trainer runs write under `work`."""
    full = ["--device", "cuda", "--batch_size", "2"]
    return [
        # Without the captured logs of failing tests, the tail holds their tracebacks (the first GPU check's tail
        # was all captured output and lost the error of its one failing test). One line per test (-v), so a stage
        # stopped at its limit still names the tests that passed and failed so far.
        Stage(
            "CUDA tests (pytest -m cuda)",
            [python, "-m", "pytest", "-m", "cuda", "-v", "-rfEs", "--tb=short", "--show-capture=no"],
            110,
            250,
        ),
        *(trainer_stage(python, model, limit, work) for model, limit in TRAINER_MODELS),
        *memory_stages(python),
        Stage(
            "Train step, FLUX.1 Kontext full size",
            [python, "-m", "bench.train_step", "--model", "flux_kontext", *full, "--steps", "2", "--warmup", "1"],
            90,
        ),
        Stage(
            "Compile, FLUX.1 Kontext full size",
            [python, "-m", "bench.compile", "--model", "flux_kontext", *full, "--steps", "6", "--warmup", "3"],
            120,
        ),
    ]


def environment() -> list[str]:
    """Report lines: machine and library versions, and whether varlen attention is importable."""
    from common.attention import varlen_available

    versions = []
    for package in (
        "torch",
        "diffusers",
        "transformers",
        "accelerate",
        "peft",
        "safetensors",
        "datasets",
        "bitsandbytes",
    ):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} missing")
    props = torch.cuda.get_device_properties(0)
    varlen = varlen_available(torch.device("cuda"), torch.bfloat16)
    return [
        f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
        f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)",
        f"- Python {platform.python_version()}; " + ", ".join(versions),
        f"- `torch.nn.attention.varlen.varlen_attn` usable (bf16): {varlen}",
    ]


def run_stage(stage: Stage, seconds: float) -> tuple[str, float, str]:
    """Run one stage with a time limit; returns (status, seconds taken, output: stdout, then where it failed the
    last STDERR_LINES lines of stderr without progress bars)."""
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    process = subprocess.Popen(
        stage.argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).parent.parent,
        start_new_session=True,  # its own process group, so a timeout also stops its workers (compilers, ranks)
    )
    try:
        stdout, stderr = process.communicate(timeout=seconds)
        status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        status = f"timed out after {seconds:.0f} s"
    lines = stdout.rstrip().splitlines()
    if stage.tail_lines is not None and len(lines) > stage.tail_lines:
        lines = [f"... ({len(lines) - stage.tail_lines} lines above left out)", *lines[-stage.tail_lines :]]
    if status != "ok":  # the error is on stderr
        errors = [line for line in stderr.rstrip().splitlines() if not PROGRESS.search(line)]
        lines += [f"--- stderr (last {STDERR_LINES} lines) ---", *errors[-STDERR_LINES:]]
    return status, time.monotonic() - start, "\n".join(lines)


def failure(output: str) -> str:
    """What failed, for the summary table: the last exception or `error:` line of a stage's output (pytest: its
    FAILED/ERROR lines), else its last line; at most 200 characters, table-safe."""
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith("--- stderr")]
    failed = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    found = failed or [line for line in lines if EXCEPTION.match(line)] or lines[-1:]
    text = "; ".join(found) if failed else (found[-1] if found else "")
    return text[:200].replace("|", "\\|")


def default_report() -> Path:
    """$OUT/gpu_check.md where the device tool collects files, else ./gpu_check.md."""
    return Path(os.environ["OUT"]) / "gpu_check.md" if os.environ.get("OUT") else Path("gpu_check.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget_s", type=float, default=BUDGET_S, help="seconds for all stages together")
    parser.add_argument("--report", type=Path, default=None, help="markdown report path (default: $OUT/gpu_check.md)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu_check needs a CUDA GPU and found none (torch.cuda.is_available() is False); nothing was run.")
        return 0
    report = args.report or default_report()
    report.parent.mkdir(parents=True, exist_ok=True)
    print(f"report: {report.resolve()}", flush=True)
    started = time.monotonic()
    try:
        machine = environment()
    except Exception as error:  # noqa: BLE001 - a broken install is itself the finding; the stages will show it too
        machine = [f"- environment could not be read: {type(error).__name__}: {error}"]
    header = [f"# GPU check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "", *machine, ""]
    summary, sections, failed = [], [], False
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))  # trainer runs: checkpoints of configs, data, outputs
    for stage in stages(sys.executable, work):
        left = args.budget_s - (time.monotonic() - started)
        if left < MIN_STAGE_S:
            summary.append(f"| {stage.title} | not run (budget spent) | | |")
            failed = True
        else:
            print(f"== {stage.title} (limit {min(stage.limit_s, left):.0f} s)", flush=True)
            status, seconds, output = run_stage(stage, min(stage.limit_s, left))
            print(f"   {status} in {seconds:.0f} s", flush=True)
            failed |= status != "ok"
            what = "" if status == "ok" else failure(output)
            summary.append(f"| {stage.title} | {status} | {seconds:.0f} s | {what} |")
            sections += [f"## {stage.title}", "", f"`{' '.join(stage.argv[1:])}`: {status}, {seconds:.0f} s", ""]
            # Benchmarks print markdown tables: keep them as markdown; anything else goes in a code block.
            sections += [output, ""] if TABLE.search(output) else ["```", output, "```", ""]
        table = ["| stage | status | time | what failed |", "| --- | --- | ---: | --- |", *summary, ""]
        report.write_text("\n".join([*header, *table, *sections]))
    shutil.rmtree(work, ignore_errors=True)
    print(f"report: {report.resolve()} ({time.monotonic() - started:.0f} s in all)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
