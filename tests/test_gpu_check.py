"""bench.gpu_check: a no-op without a GPU, stages that exist, time limits that hold, and no heavy imports."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from bench.gpu_check import Stage, run_stage, stages

ROOT = Path(__file__).resolve().parent.parent


def test_without_a_gpu_it_says_so_runs_nothing_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "needs a CUDA GPU" in done.stdout and "nothing was run" in done.stdout
    assert list(tmp_path.iterdir()) == [], "nothing may be written without a GPU"


def test_every_stage_names_a_module_of_this_checkout():
    planned = stages(sys.executable)
    assert planned[0].argv[1:5] == ["-m", "pytest", "-m", "cuda"], "the CUDA tests come first"
    for stage in planned:
        if stage.argv[1] == "-m":
            assert importlib.util.find_spec(stage.argv[2]) is not None, stage.argv[2]


def test_a_stage_that_overruns_is_stopped_and_reported(tmp_path):
    code = "import time; print('started', flush=True); time.sleep(30)"
    status, seconds, output = run_stage(Stage("sleeper", [sys.executable, "-c", code], 30), 2)
    assert status == "timed out after 2 s" and seconds < 10 and "started" in output


def test_stages_run_without_datasets_wandb_or_bitsandbytes():
    """The GPU machine has none of them: gpu_check and the benchmarks it runs import with all three absent."""
    modules = ["bench.gpu_check", "bench.train_step", "bench.compile", "bench.token_budget"]
    code = (
        "import importlib, sys\n"
        "for absent in ('datasets', 'wandb', 'bitsandbytes'):\n"
        "    sys.modules[absent] = None  # as if not installed: importing it raises, find_spec gives None\n"
        f"for module in {modules}:\n"
        "    importlib.import_module(module)\n"
        "print('imported')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "imported"


def test_report_lists_every_stage_keeps_tables_and_fails_on_a_failed_stage(tmp_path, monkeypatch):
    """The report logic on CPU: CUDA is declared present and the stages are two small commands."""
    import bench.gpu_check as check

    table = "print('| a | b |'); print('| --- | --- |'); print('| 1 | 2 |')"
    planned = [
        Stage("tables", [sys.executable, "-c", table], 30),
        Stage("broken", [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], 30),
    ]
    monkeypatch.setattr(check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(check, "stages", lambda python: planned)
    assert check.main(["--report", str(tmp_path / "report.md")]) == 1
    text = (tmp_path / "report.md").read_text()
    assert "| tables | ok |" in text and "| broken | failed (exit 3) |" in text
    assert "\n| 1 | 2 |\n" in text, "benchmark tables stay markdown"
    assert "boom" in text, "a failed stage's stderr is in the report"
