"""The bench package as users run it, in one interpreter (one start-up for the suite): every module imports and
answers `python -m bench.X --help` with `datasets`, `wandb` and `bitsandbytes` absent (as on the GPU machine before
anything is carried there), and `python -m bench.gpu_check` without a GPU says so, runs and writes nothing."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(f"bench.{p.stem}" for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__")


def test_every_module_answers_help_and_gpu_check_without_a_gpu_runs_nothing(tmp_path):
    """runpy.run_module is what `python -m` runs."""
    runs = [(module, ["--help"]) for module in MODULES] + [("bench.gpu_check", [])]
    code = (
        "import runpy, sys\n"
        "for absent in ('datasets', 'wandb', 'bitsandbytes'):\n"
        "    sys.modules[absent] = None  # as if not installed: importing it raises\n"
        f"for module, args in {runs!r}:\n"
        "    sys.argv = [module, *args]\n"
        "    try:\n"
        "        runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
        "    except SystemExit as done:\n"
        "        assert done.code in (0, None), (module, done.code)\n"
        "    print('=== ran', module, *args, flush=True)\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ran = [line.split()[2:] for line in done.stdout.splitlines() if line.startswith("=== ran")]
    assert ran == [[module, *args] for module, args in runs]
    assert {"bench.memory", "bench.fp8_accuracy", "bench.gpu_check", "bench.random_weights"} <= set(MODULES)
    assert "needs a CUDA GPU" in done.stdout and "nothing was run" in done.stdout
    assert list(tmp_path.iterdir()) == [], "nothing may be written without a GPU"


def test_the_bench_package_drops_irrelevant_library_warnings_before_its_modules_import_libraries():
    """`python -m bench.X` runs bench/__init__.py first; several bench modules import diffusers before `common`."""
    code = "import logging, sys, bench; print(len(logging.getLogger('bitsandbytes.backends.cpu.ops').filters))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["1"], done.stderr
