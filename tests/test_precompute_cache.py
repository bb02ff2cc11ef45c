"""precompute_cache.py end to end on the tiny kit: cached tensors equal a fresh encode of the same sample."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from test_cache import assert_same

import precompute_cache
from common.cache import CachedRows, DamagedShard, FingerprintMismatch, cache_info, load_cache, unflatten_row
from common.cli import resolution_policy
from common.data import prepare_sample, read_rows
from common.encoders import load_encoders
from common.errors import UserError
from common.training_data import data_fingerprint

SIZES = [(96, 64), (64, 64), (48, 112), (80, 48)]  # (width, height) of targets; controls get other sizes


def write_folder(root: Path, controls: int = 1, corrupt: str | None = None, rows: int = len(SIZES)) -> Path:
    """A folder dataset (stem.png + stem.txt + stem_control[_k].png) of random images of several aspect ratios."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(rows):
        w, h = SIZES[i % len(SIZES)]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"s{i}.png")
        (root / f"s{i}.txt").write_text(f"make sample {i} brighter" + " please" * i)
        for k in range(controls):
            suffix = "_control" if controls == 1 else f"_control_{k}"
            Image.fromarray(rng.integers(0, 255, (h + 16 * k, w, 3), dtype=np.uint8)).save(root / f"s{i}{suffix}.png")
    if corrupt:
        (root / corrupt).write_bytes(b"not a png")
    return root


def run(model: str, checkpoint: Path, dataset: Path, cache: Path, *extra: str) -> list[str]:
    argv = ["--model", model, "--pretrained_model_name_or_path", str(checkpoint), "--dataset", str(dataset)]
    argv += ["--cache_dir", str(cache), "--multi_resolutions", "48*48", "64*96", "--shard_size", "2", *extra]
    precompute_cache.main(precompute_cache.parse_args(argv))
    return argv


@pytest.mark.parametrize(
    ("model", "kit", "controls"), [("flux_kontext", "flux_kontext", 1), ("qwen_edit_plus", "qwen_edit_plus", 2)]
)
def test_cached_rows_equal_fresh_encode(tmp_path, tiny_checkpoint, model, kit, controls):
    dataset = write_folder(tmp_path / "data", controls)
    argv = run(model, tiny_checkpoint(kit), dataset, tmp_path / "cache")
    args = precompute_cache.parse_args(argv)
    rows = read_rows(dataset)
    cached = load_cache(tmp_path / "cache", data_fingerprint(args, model, encoder_dtype="no"))
    assert len(cached) == len(SIZES) and cached[0]["version"] == "2.0"
    encoders = load_encoders(model, str(tiny_checkpoint(kit)))
    policy = resolution_policy(args, model)
    for row, record in zip(rows, cached, strict=True):
        prepared = prepare_sample(row, model, policy)
        fresh = encoders.encode(prepared)
        got = unflatten_row(record)
        for key in ("target_latents", "prompt_embeds"):
            assert torch.equal(got[key], fresh[key]), key
        assert len(got["control_latents"]) == controls
        assert all(torch.equal(a, b) for a, b in zip(got["control_latents"], fresh["control_latents"], strict=True))
        assert got["img_shapes"][0] == [1, prepared.target.shape[1] // 16, prepared.target.shape[2] // 16]
        if model == "flux_kontext":
            assert torch.equal(got["pooled_prompt_embeds"], fresh["pooled_prompt_embeds"])
        else:
            empty = encoders.encode_prompt("", prepared.condition_images)["prompt_embeds"]
            assert torch.equal(got["empty_prompt_embeds"], empty)
    assert len({tuple(r["img_shapes"][0]) for r in cached}) > 1, "the set must mix target sizes"


def test_changed_settings_are_refused_and_rebuild_redoes(tmp_path, tiny_checkpoint):
    dataset = write_folder(tmp_path / "data")
    argv = run("flux_kontext", tiny_checkpoint("flux_kontext"), dataset, tmp_path / "cache")
    args = precompute_cache.parse_args(argv[:-5] + ["--multi_resolutions", "64*64", "--shard_size", "2"])
    wanted = data_fingerprint(args, args.model, encoder_dtype="no")
    with pytest.raises(FingerprintMismatch, match="multi_resolutions"):
        load_cache(tmp_path / "cache", wanted)
    with pytest.raises(FingerprintMismatch, match="multi_resolutions"):
        precompute_cache.main(args)
    precompute_cache.main(precompute_cache.parse_args([*args_list(args), "--rebuild_cache"]))
    assert len(load_cache(tmp_path / "cache", wanted)) == len(SIZES)


def args_list(args) -> list[str]:
    return [
        "--model",
        args.model,
        "--pretrained_model_name_or_path",
        args.pretrained_model_name_or_path,
        "--dataset",
        args.dataset,
        "--cache_dir",
        args.cache_dir,
        "--multi_resolutions",
        *args.multi_resolutions,
    ]


def test_bad_image_names_row_and_file_or_is_skipped(tmp_path, tiny_checkpoint, caplog):
    dataset = write_folder(tmp_path / "data", corrupt="s2_control.png")
    with pytest.raises(ValueError, match=r"s2.*s2_control\.png"):
        run("flux_kontext", tiny_checkpoint("flux_kontext"), dataset, tmp_path / "cache")
    run("flux_kontext", tiny_checkpoint("flux_kontext"), dataset, tmp_path / "cache2", "--skip_bad_samples")
    assert "4 rows, 3 rows used, 1 skipped" in caplog.text and "skipped s2: bad sample 's2'" in caplog.text
    assert len(load_cache(tmp_path / "cache2")) == len(SIZES) - 1
    assert [s["sample_id"] for s in cache_info(tmp_path / "cache2")["skipped"]] == ["s2"]


def test_two_processes_equal_one(tmp_path, tiny_checkpoint):
    """Both caches come from torchrun so each process computes with the same thread count (CPU kernels round
    differently with different thread counts)."""
    dataset = write_folder(tmp_path / "data")
    root = Path(__file__).parents[1]
    # `accelerate launch --cpu --num_processes 2` starts one process unless MPI is installed; torchrun with
    # ACCELERATE_USE_CPU gives accelerate a real gloo process group on CPU.
    env = {**os.environ, "PYTHONPATH": str(root), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    caches = {}
    for processes in (1, 2):
        caches[processes] = tmp_path / f"cache{processes}"
        argv = ["--model", "flux_kontext", "--pretrained_model_name_or_path", str(tiny_checkpoint("flux_kontext"))]
        argv += ["--dataset", str(dataset), "--cache_dir", str(caches[processes]), "--shard_size", "2"]
        argv += ["--multi_resolutions", "48*48", "64*96"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "precompute_cache.py"]
        subprocess.run(cmd + argv, check=True, cwd=root, env=env, capture_output=True)
    assert len(list(caches[2].glob("shard-p001-*.arrow"))) > 0, "the second process must have written shards"
    a, b = load_cache(caches[1]), load_cache(caches[2])
    assert len(a) == len(b) == len(SIZES)
    for x, y in zip(a, b, strict=True):
        ux, uy = unflatten_row(x), unflatten_row(y)
        assert ux["sample_id"] == uy["sample_id"]
        for key in ("target_latents", "prompt_embeds", "pooled_prompt_embeds"):
            assert torch.equal(ux[key], uy[key]), key
        assert all(torch.equal(p, q) for p, q in zip(ux["control_latents"], uy["control_latents"], strict=True))


def test_sigkill_then_rerun_keeps_finished_shards(tmp_path, tiny_checkpoint):
    """`python precompute_cache.py` killed with SIGKILL once it has written a shard: the rerun leaves those shard
    files untouched, encodes only the other rows, and the cache equals an uninterrupted run's row for row.

    12 rows encoded at 384*384 take about a second after the first shard of 2 rows, time enough to kill the run
    while it works. Every run is a process with one CPU thread, so all compute the same bits."""
    dataset = write_folder(tmp_path / "data", rows=12)
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    killed, clean = tmp_path / "killed", tmp_path / "clean"

    def start(cache: Path) -> subprocess.Popen:
        argv = ["--model", "flux_kontext", "--pretrained_model_name_or_path", str(tiny_checkpoint("flux_kontext"))]
        argv += ["--dataset", str(dataset), "--cache_dir", str(cache), "--shard_size", "2", "--target_area", "384*384"]
        with (tmp_path / f"{cache.name}.log").open("w") as log:  # the child keeps its own copy of the file
            return subprocess.Popen(
                [sys.executable, "precompute_cache.py", *argv], cwd=root, env=env, stdout=log, stderr=log
            )

    def shards() -> dict[str, tuple[int, int]]:
        """(inode, mtime) of each finished shard file of the killed run's cache."""
        found = sorted(killed.glob("shard-*.arrow")) if killed.is_dir() else []
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in found}

    reference = start(clean)  # the uninterrupted run, meanwhile
    run = start(killed)
    try:
        deadline = time.monotonic() + 300
        while not shards():
            assert run.poll() is None, "precompute_cache.py ended before writing a shard"
            assert time.monotonic() < deadline, "no shard after 300 s"
            time.sleep(0.002)
        run.send_signal(signal.SIGKILL)
    finally:
        run.kill()
        run.wait()
    assert run.returncode == -signal.SIGKILL
    before = shards()
    assert 1 <= len(before) < 6 and not (killed / "cache_info.json").exists(), "the kill must catch the run working"

    time.sleep(0.01)  # so a rewritten shard would get another mtime even on coarse clocks
    assert start(killed).wait() == 0, (tmp_path / "killed.log").read_text()[-2000:]
    assert reference.wait() == 0, (tmp_path / "clean.log").read_text()[-2000:]
    after = shards()
    assert {name: after[name] for name in before} == before, "finished shards must not be written again"
    assert len(after) == 6 and not list(killed.glob(".*.tmp"))
    # The rerun encoded only the rows the killed run had not finished.
    indices = {
        name: pa.ipc.open_stream(pa.memory_map(str(killed / name))).read_all()["index"].to_pylist() for name in after
    }
    done = sorted(i for name in before for i in indices[name])
    assert done == list(range(2 * len(before)))
    assert sorted(i for name in after if name not in before for i in indices[name]) == list(range(len(done), 12))

    resumed, uninterrupted = CachedRows(load_cache(killed)), CachedRows(load_cache(clean))
    assert len(resumed) == len(uninterrupted) == 12
    for i in range(12):
        assert_same(resumed[i], uninterrupted[i])


def test_damaged_shard_and_edited_rows_re_encode_only_those_rows(tmp_path, tiny_checkpoint, caplog):
    """Real processes (one CPU thread each, so all compute the same bits): a truncated shard is named by the
    trainer-side loader, and rerunning precompute_cache.py (with another spelling of the same sizes) re-encodes only
    its rows, giving a cache equal to a clean one; editing one caption then re-encodes exactly one row."""
    caplog.set_level(logging.INFO)
    import shutil

    dataset = write_folder(tmp_path / "data", rows=6)
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}

    def precompute(cache: Path, *sizes: str) -> str:
        argv = ["--model", "flux_kontext", "--pretrained_model_name_or_path", str(tiny_checkpoint("flux_kontext"))]
        argv += ["--dataset", str(dataset), "--cache_dir", str(cache), "--shard_size", "2", "--multi_resolutions"]
        command = [sys.executable, "precompute_cache.py", *argv, *(sizes or ("48*48", "64*96"))]
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    clean, repaired = tmp_path / "clean", tmp_path / "repaired"
    precompute(clean)
    shutil.copytree(clean, repaired)
    shard = repaired / "shard-p000-000001.arrow"
    shard.write_bytes(shard.read_bytes()[:-200])
    with pytest.raises(DamagedShard, match=f"cache shard {shard} is damaged"):
        load_cache(repaired)
    stamps = {p.name: p.stat().st_mtime_ns for p in repaired.glob("shard-*") if p != shard}
    log = precompute(repaired, "96x64", "2304")  # the same areas, spelled otherwise
    assert "4 of 6 rows are already in the cache" in log and "encoding 2 rows" in log
    assert {p.name: p.stat().st_mtime_ns for p in repaired.glob("shard-*") if p.name in stamps} == stamps
    a, b = CachedRows(load_cache(clean)), CachedRows(load_cache(repaired))
    assert len(a) == len(b) == 6
    for i in range(6):
        assert_same(b[i], a[i])

    # In-process: only the edited row is encoded, so its thread count does not matter.
    (dataset / "s3.txt").write_text("a caption fixed by the user")
    caplog.clear()
    run("flux_kontext", tiny_checkpoint("flux_kontext"), dataset, repaired)
    assert "5 of 6 rows are already in the cache" in caplog.text and "encoding 1 rows" in caplog.text
    edited = CachedRows(load_cache(repaired))
    assert [edited[i]["sample_id"] for i in range(6)] == [f"s{i}" for i in range(6)]
    changed = [i for i in range(6) if not torch.equal(edited[i]["prompt_embeds"], a[i]["prompt_embeds"])]
    assert changed == [3]


def test_missing_manifest_file_is_a_bad_row_that_can_be_skipped(tmp_path, tiny_checkpoint, caplog):
    data = write_folder(tmp_path / "data", rows=3)
    lines = [{"image": f"s{i}.png", "control": f"s{i}_control.png", "prompt": f"edit {i}"} for i in range(3)]
    lines[1]["control"] = "gone.png"
    (data / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(UserError, match=r"bad sample 'm.jsonl:2'.*control_0: .*gone\.png.*--skip_bad_samples"):
        run("flux_kontext", tiny_checkpoint("flux_kontext"), data / "m.jsonl", tmp_path / "cache")
    caplog.set_level("INFO")
    run("flux_kontext", tiny_checkpoint("flux_kontext"), data / "m.jsonl", tmp_path / "cache", "--skip_bad_samples")
    assert "3 rows, 2 rows used, 1 skipped" in caplog.text
    assert [s["sample_id"] for s in cache_info(tmp_path / "cache")["skipped"]] == ["m.jsonl:2"]
