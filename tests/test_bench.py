"""Every bench module imports and answers `python -m bench.X --help` (what users type), in one interpreter, with
`datasets`, `wandb` and `bitsandbytes` absent as on the GPU machine before anything is carried there."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(f"bench.{p.stem}" for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__")


def test_every_bench_module_imports_and_prints_its_help_without_datasets_wandb_or_bitsandbytes():
    """runpy.run_module is what `python -m` runs; one process for all modules keeps it to one interpreter start."""
    code = (
        "import runpy, sys\n"
        "for absent in ('datasets', 'wandb', 'bitsandbytes'):\n"
        "    sys.modules[absent] = None  # as if not installed: importing it raises\n"
        f"for module in {MODULES}:\n"
        "    sys.argv = [module, '--help']\n"
        "    try:\n"
        "        runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
        "    except SystemExit as done:\n"
        "        assert done.code in (0, None), (module, done.code)\n"
        "    else:\n"
        "        raise AssertionError(f'{module} --help did not exit')\n"
        "    print('=== helped', module, flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split()[-1] for line in done.stdout.splitlines() if line.startswith("=== helped")] == MODULES
    assert {"bench.memory", "bench.fp8_accuracy", "bench.gpu_check", "bench.random_weights"} <= set(MODULES)
