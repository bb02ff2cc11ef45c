"""`--demo` as a user runs it from the repository: tiny model, synthetic data, cache, 30 steps (one script: the
demo is one code path for every trainer, `trainer_harness.DEMO_MODELS`)."""

import json
import subprocess
import sys

import pytest
from PIL import Image
from trainer_harness import DEMO_MODELS, ENV, ROOT, SCRIPTS

from common.demo import SIZES, write_dataset


@pytest.mark.parametrize("model", DEMO_MODELS)
def test_demo_trains_and_plots(model, tmp_path):
    script = ROOT / f"{SCRIPTS[model]}.py"
    result = subprocess.run(
        [sys.executable, str(script), "--demo", "--report_to", "none"],
        cwd=tmp_path,
        # Both CPU threads, as a user's run has them (the harness's one thread is for bitwise comparisons between
        # processes, which this test does not make): 52 s -> 41 s on a 2-core machine.
        env={**ENV, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "of this batch is padding" not in result.stderr  # the demo uses the settings it recommends
    assert "grouped by length" in result.stderr
    out = tmp_path / "demo" / "output" / model
    assert f"LoRA weights: {out / 'pytorch_lora_weights.safetensors'}" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert max(r["padding_ratio"] for r in records) > 0, "the demo batches must mix sizes"
    with Image.open(out / "training_curves.png") as plot:
        assert plot.size[0] > 300 and plot.size[1] > 300
    assert f"model card: {out / 'README.md'}" in result.stdout
    assert "32 samples;" in (out / "README.md").read_text()


def test_demo_data_mixes_sizes_and_reference_counts(tmp_path):
    write_dataset(tmp_path, "qwen_edit_plus", rows=8)
    sizes = {Image.open(p).size for p in tmp_path.glob("[0-9][0-9][0-9].png")}
    assert sizes == set(SIZES)
    controls = [len(list(tmp_path.glob(f"{i:03d}_control*.png"))) for i in range(8)]
    assert set(controls) == {0, 1, 2}
    assert (tmp_path / "000.txt").read_text() == "make the first shape red"


def test_a_second_demo_writes_next_to_the_first_instead_of_over_it(tmp_path, capsys):
    from common.demo import fresh_output_dir

    assert fresh_output_dir(tmp_path, "flux_kontext") == tmp_path / "flux_kontext"
    (tmp_path / "flux_kontext").mkdir()
    (tmp_path / "flux_kontext" / "pytorch_lora_weights.safetensors").write_bytes(b"first run")
    assert fresh_output_dir(tmp_path, "flux_kontext") == tmp_path / "flux_kontext-2"
    assert "this one writes to" in capsys.readouterr().out
