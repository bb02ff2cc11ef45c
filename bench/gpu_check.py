"""Everything a short GPU session should run, in one command, into one markdown report. Not a test.

    python -m bench.gpu_check                  # on a CUDA machine: about 8 minutes on an H100/H200

Stages, in priority order, each a subprocess with its own time limit cut from the total `--budget_s`, so a
crash, an out-of-memory error or a hang in one stage still leaves the others and the report:
1. `pytest -m cuda`: mixed batch vs each sample alone through the stock model and LoRA gradients for every
   attention backend (varlen included) in fp32 and bf16, FLUX and Qwen (zero_cond_t too), and one bf16 trainer
   run per trainer.
2. `bench.train_step` at full size (FLUX.1 Kontext, then Qwen-Image-Edit; random weights, bf16, LoRA r16,
   gradient checkpointing) for every backend: s/step, real tokens/s, MFU, padding, peak memory, rope+mask share.
3. `bench.memory`, if that module exists in this checkout.
4. `bench.token_budget`: fixed batch size vs `--max_tokens_per_batch` batches (tokens per step, real tokens/s).
5. `bench.compile`: eager vs `--compile` side by side on full-size FLUX.1 Kontext, with recompiles (last: the
   stage most likely to be cut short by the budget; `--budget_s 570` gives it room within a 10-minute call).

The report is written after every stage to `--report` (default: `$OUT/gpu_check.md` when OUT is set, else
`gpu_check.md`), and its path is printed first and last. Without CUDA it prints that it needs a GPU, runs
nothing and exits 0. It imports neither `datasets`, `wandb` nor `bitsandbytes` itself (the CUDA trainer tests
need `datasets`; README, "Benchmarks", lists the wheels to carry).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BUDGET_S = 480  # the whole check: 8 minutes


@dataclass(frozen=True)
class Stage:
    """One step of the check: a command and the most seconds it may take (further capped by what is left)."""

    title: str
    argv: list[str]
    limit_s: int
    tail_lines: int | None = None  # keep only the last lines of long outputs (pytest); None keeps everything


def stages(python: str) -> list[Stage]:
    """The stages in priority order (what runs first survives a short budget). Full-size steps use batches of 2
    (about 10k real tokens per step, enough to fill an H100/H200) to keep every backend within the budget."""
    full = ["--device", "cuda", "--batch_size", "2"]
    planned = [
        Stage("CUDA tests (pytest -m cuda)", [python, "-m", "pytest", "-m", "cuda", "-q", "-rfEs"], 120, 60),
        Stage(
            "Train step, FLUX.1 Kontext full size",
            [python, "-m", "bench.train_step", "--model", "flux_kontext", *full, "--steps", "3", "--warmup", "1"],
            90,
        ),
        Stage(
            "Train step, Qwen-Image-Edit full size",
            [python, "-m", "bench.train_step", "--model", "qwen_edit", *full, "--steps", "3", "--warmup", "1"],
            100,
        ),
    ]
    if importlib.util.find_spec("bench.memory") is not None:
        call = "import sys; from bench.memory import main; sys.exit(main(sys.argv[1:]))"
        planned.append(Stage("Memory (bench.memory)", [python, "-c", call], 60))
    planned.append(
        Stage("Token budget vs batch size (tiny, CUDA)", [python, "-m", "bench.token_budget", "--device", "cuda"], 40)
    )
    planned.append(
        Stage(
            "Compile, FLUX.1 Kontext full size",
            [python, "-m", "bench.compile", "--model", "flux_kontext", *full, "--steps", "10", "--warmup", "3"],
            150,
        )
    )
    return planned


def environment() -> list[str]:
    """Report lines: machine and library versions, and whether varlen attention is importable."""
    from common.attention import varlen_available

    versions = []
    for package in ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "datasets"):
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
    """Run one stage with a time limit; returns (status, seconds taken, output)."""
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
    if status != "ok":  # the error is on stderr
        lines += ["--- stderr (last 40 lines) ---", *stderr.rstrip().splitlines()[-40:]]
    if stage.tail_lines is not None and len(lines) > stage.tail_lines:
        lines = [f"... ({len(lines) - stage.tail_lines} lines above left out)", *lines[-stage.tail_lines :]]
    return status, time.monotonic() - start, "\n".join(lines)


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
    for stage in stages(sys.executable):
        left = args.budget_s - (time.monotonic() - started)
        if left < 20:
            summary.append(f"| {stage.title} | not run (budget spent) | |")
            failed = True
        else:
            print(f"== {stage.title} (limit {min(stage.limit_s, left):.0f} s)", flush=True)
            status, seconds, output = run_stage(stage, min(stage.limit_s, left))
            print(f"   {status} in {seconds:.0f} s", flush=True)
            failed |= status != "ok"
            summary.append(f"| {stage.title} | {status} | {seconds:.0f} s |")
            sections += [f"## {stage.title}", "", f"`{' '.join(stage.argv[1:])}`: {status}, {seconds:.0f} s", ""]
            # Benchmarks print markdown tables: keep them as markdown; anything else goes in a code block.
            sections += [output, ""] if "| --- |" in output else ["```", output, "```", ""]
        table = ["| stage | status | time |", "| --- | --- | ---: |", *summary, ""]
        report.write_text("\n".join([*header, *table, *sections]))
    print(f"report: {report.resolve()} ({time.monotonic() - started:.0f} s in all)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
