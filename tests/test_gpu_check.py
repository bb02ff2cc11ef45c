"""bench.gpu_check: stages in priority order that exist, time limits and a budget that hold, and a report that says
what failed (without a GPU it runs nothing: tests/test_bench.py)."""

import importlib.util
import sys
from pathlib import Path

import bench.memory
from bench.gpu_check import BUDGET_S, MEMORY_LIMIT_S, TRAINER_MODELS, Stage, run_stage, stages
from common.models import get_model

ROOT = Path(__file__).resolve().parent.parent


def test_stages_in_priority_order_name_modules_and_scripts_of_this_checkout(tmp_path):
    planned = stages(sys.executable, tmp_path)
    assert planned[0].argv[1:5] == ["-m", "pytest", "-m", "cuda"], "the CUDA tests come first"
    assert {"--tb=short", "--show-capture=no"} <= set(planned[0].argv), "failures' tracebacks, not their logs"
    assert "-v" in planned[0].argv, "a line per test: a stage stopped at its limit still names them"
    trainers = planned[1:4]
    assert [s.argv[1:5] for s in trainers] == [["-m", "bench.random_weights", "--write", m] for m, _ in TRAINER_MODELS]
    assert [m for m, _ in TRAINER_MODELS] == ["flux_kontext", "qwen_edit_plus", "flux2_klein"]
    for stage, (model, _) in zip(trainers, TRAINER_MODELS, strict=True):
        script = stage.argv[6]
        assert script == get_model(model).script and (ROOT / script).is_file()
        flags = stage.argv[7:]
        for flag in ("--gradient_checkpointing", "--validation_steps", "1024*1024"):
            assert flag in flags, (model, flag)
        assert flags[flags.index("--mixed_precision") + 1] == "bf16" and flags[flags.index("--report_to") + 1] == "none"
    plus = trainers[1].argv
    assert len(plus[plus.index("--validation_images") + 1].split(",")) == 2, "Edit-Plus validates with 2 references"
    memory = planned[4:-2]
    cells = [(int(s.argv[s.argv.index("--cases") + 1]), s.argv[s.argv.index("--options") + 1]) for s in memory]
    assert cells[:4] == [(0, "fp8"), (0, "fp8+offload"), (1, "fp8+offload"), (2, "fp8+offload")], "targets first"
    every = {(i, option) for i in range(len(bench.memory.CASES)) for option in bench.memory.OPTIONS}
    assert len(cells) == len(every) and set(cells) == every
    assert all(s.argv[1:5] == ["-m", "bench.memory", "--device", "cuda"] and "--batch_sizes" in s.argv for s in memory)
    assert all(s.argv[s.argv.index("--checkpointing") + 1] == "on" for s in memory), "one measurement per process"
    assert [s.argv[2] for s in planned[-2:]] == ["bench.train_step", "bench.compile"]
    for stage in planned:
        assert importlib.util.find_spec(stage.argv[2]) is not None, stage.argv[2]
    # The first two priorities (CUDA tests, the three trainers) leave room for at least one memory cell, and the
    # whole check ends inside the 480 s a device command is given.
    assert sum(s.limit_s for s in planned[:4]) <= BUDGET_S - MEMORY_LIMIT_S and BUDGET_S <= 480 - 15


def test_a_stage_that_overruns_is_stopped_and_reported(tmp_path):
    code = "import time; print('started', flush=True); time.sleep(30)"
    status, seconds, output = run_stage(Stage("sleeper", [sys.executable, "-c", code], 30), 2)
    assert status == "timed out after 2 s" and seconds < 10 and "started" in output


def test_report_says_what_failed_keeps_tables_and_stops_at_the_budget(tmp_path, monkeypatch):
    """The report logic on CPU: CUDA is declared present and the stages are small commands. A 4 s budget: the
    sleeper gets only what is left of it (not its own 30 s), and the last stage none."""
    import bench.gpu_check as check

    table = "print('| a | b |'); print('|---|---|'); print('| 1 | 2 |')"
    crash = (
        "import sys; print('step 1', flush=True); print('x' * 100, file=sys.stderr); "
        "print('steps:  50%|#####     | 1/2', file=sys.stderr); "
        "raise RuntimeError('CUDA error: an illegal memory access was encountered')"
    )
    planned = [
        Stage("tables", [sys.executable, "-c", table], 30),
        Stage("broken", [sys.executable, "-c", crash], 30),
        Stage("sleeper", [sys.executable, "-c", "import time; time.sleep(30)"], 30),
        Stage("left out", [sys.executable, "-c", "pass"], 30),
    ]
    monkeypatch.setattr(check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(check, "environment", lambda: ["- a GPU"])
    monkeypatch.setattr(check, "stages", lambda python, work: planned)
    monkeypatch.setattr(check, "MIN_STAGE_S", 1)
    assert check.main(["--report", str(tmp_path / "report.md"), "--budget_s", "4"]) == 1
    text = (tmp_path / "report.md").read_text()
    assert "| tables | ok |" in text and "\n| 1 | 2 |\n" in text, "benchmark tables stay markdown"
    row = next(line for line in text.splitlines() if line.startswith("| broken |"))
    assert "failed (exit 1)" in row and row.endswith(
        "| RuntimeError: CUDA error: an illegal memory access was encountered |"
    )
    tail = text.split("--- stderr (last 40 lines) ---")[1]
    assert "Traceback (most recent call last)" in tail and "x" * 100 in tail, "the stderr tail is in the report"
    assert "50%|" not in tail, "progress bars are left out"
    sleeper = next(line for line in text.splitlines() if line.startswith("| sleeper |"))
    assert "timed out after" in sleeper and int(sleeper.split("timed out after ")[1].split()[0]) <= 4
    assert sleeper.endswith("|  |"), "a stage that printed nothing has nothing to quote"
    assert "| left out | not run (budget spent) |" in text


def test_each_trainer_stage_passes_flags_its_script_accepts(tmp_path):
    """The trainer stages' arguments parse in their own scripts and name validation images that exist (a typo would
    cost a GPU session's stage), on the checkpoint and data their `--write` makes (here with tiny configs:
    bench.random_weights --tiny)."""
    import runpy

    from bench.random_weights import REFERENCES
    from bench.random_weights import main as random_weights
    from common.validation import validation_rows

    for stage in stages(sys.executable, tmp_path)[1:4]:
        write = stage.argv.index("--write")
        model, folder, script = stage.argv[write + 1], Path(stage.argv[write + 2]), stage.argv[write + 3]
        random_weights(["--tiny", "--write", model, str(folder)])
        args = runpy.run_path(str(ROOT / script))["parse_args"](stage.argv[write + 4 :])
        assert (args.max_train_steps, args.train_batch_size, args.mixed_precision) == (2, 2, "bf16"), model
        assert args.gradient_checkpointing and args.validation_steps == 2, model
        assert Path(args.pretrained_model_name_or_path) == folder / "model" and Path(args.output_dir) == folder / "out"
        assert not Path(args.output_dir).exists(), "parsing writes nothing"
        (row,) = validation_rows(args.validation_prompts, args.validation_images, model)
        assert len(row.controls) == REFERENCES[model], model
