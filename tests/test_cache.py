"""The Arrow row cache: round trip, ordering, fingerprints, kill-and-resume, multi-process shards, v1.0 caches."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
import torch
from cache_writer_script import FINGERPRINT, make_row

from common.cache import (
    CACHE_VERSION,
    CachedRows,
    CacheNotFinished,
    CacheWriter,
    DamagedShard,
    FingerprintMismatch,
    cache_info,
    finalize_cache,
    fingerprint_diff,
    flatten_row,
    load_cache,
    save_tensors_atomic,
    token_counts,
    unflatten_row,
)

SCRIPT = Path(__file__).with_name("cache_writer_script.py")


def assert_same(a, b) -> None:
    """Recursive equality; tensors must match in dtype, shape and every value."""
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(b, dict):
        assert a.keys() == b.keys(), (sorted(a), sorted(b))
        for key in b:
            assert_same(a[key], b[key])
    elif isinstance(b, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def expected(i: int, version: str = CACHE_VERSION) -> dict:
    """Row i as it reads back from a cache."""
    return {"index": i, "version": version, **make_row(i)}


def write_cache(cache_dir: Path, indices, *, process_index=0, num_processes=1, shard_size=4, **kwargs) -> None:
    """Write rows `indices` with one writer."""
    with CacheWriter(
        cache_dir,
        FINGERPRINT,
        process_index=process_index,
        num_processes=num_processes,
        shard_size=shard_size,
        **kwargs,
    ) as writer:
        for i in indices:
            writer.add(i, make_row(i))


def read_all(dataset: datasets.Dataset) -> list[dict]:
    """Every row of a loaded cache through the torch view."""
    rows = CachedRows(dataset)
    return [rows[i] for i in range(len(rows))]


def test_flatten_round_trip_keeps_dtypes():
    row = {
        "a": torch.randn(2, 3),
        "h": torch.randn(5).half(),
        "n": torch.arange(6).reshape(3, 2),
        "b": torch.tensor([True, False]),
        "s": torch.tensor(2.5),
        "ctl": [torch.randn(1, 2), torch.randn(3)],
        "none": None,
        "empty": [],
        "meta": {"k": [1, 2]},
        "sample_id": "x",
    }
    flat = flatten_row(row)
    assert flat["a__shape"] == [2, 3] and flat["ctl__shapes"] == [[1, 2], [3]] and flat["s__shape"] == []
    assert flat["a"].dtype.name == "float32" and flat["h"].dtype.name == "float16" and flat["meta__json"]
    assert_same(unflatten_row(flat), row)
    bf16 = torch.randn(4, dtype=torch.bfloat16)
    back = unflatten_row(flatten_row({"x": bf16}))["x"]
    assert back.dtype == torch.float32 and torch.equal(back, bf16.float())
    with pytest.raises(ValueError, match="reserved"):
        flatten_row({"x__shape": 1})


def test_round_trip_sorted_memory_mapped(tmp_path):
    n = 10
    write_cache(tmp_path, range(n))
    finalize_cache(tmp_path, FINGERPRINT, n, extra={"empty_prompt": "empty_prompt.safetensors"})
    dataset = load_cache(tmp_path, FINGERPRINT)
    assert len(dataset) == n and dataset["index"][:] == list(range(n))
    assert set(dataset["version"][:]) == {"2.0"}
    assert dataset["sample_id"][:] == [f"s{i:03d}" for i in range(n)]
    assert {Path(f["filename"]).parent for f in dataset.cache_files} == {tmp_path}
    assert len(dataset.cache_files) == 3  # shards of 4 + 4 + 2 rows, nothing copied
    rows = read_all(dataset)
    for i, row in enumerate(rows):
        assert_same(row, expected(i))
    assert [len(r["control_latents"]) for r in rows[:3]] == [0, 1, 2] and rows[1]["mask"] is None
    assert_same(unflatten_row(dataset[2]), expected(2))  # plain `datasets` rows (Python lists) decode too
    # token counts from the shape column: target (h/2 * w/2) plus each control's packed grid
    assert token_counts(dataset)[:3] == [2 * 3, 3 * 4 + 2 * 2, 4 * 5 + 3 * 2 + 1 * 3]
    assert token_counts(dataset) == [sum(a * b * c for a, b, c in make_row(i)["img_shapes"]) for i in range(n)]
    info = cache_info(tmp_path)
    assert (info["num_rows"], info["num_cached"], info["version"], info["extra"]) == (
        n,
        n,
        "2.0",
        {"empty_prompt": "empty_prompt.safetensors"},
    )
    assert sorted(os.listdir(tmp_path)) == [
        "cache_info.json",
        "dataset_info.json",
        "fingerprint.json",
        "shard-p000-000000.arrow",
        "shard-p000-000001.arrow",
        "shard-p000-000002.arrow",
        "state.json",
    ]
    # One plain `datasets` call opens the cache too: the rows as stored, version column included.
    plain = datasets.load_from_disk(str(tmp_path))
    assert len(plain) == n and set(plain["version"]) == {"2.0"} and sorted(plain["index"]) == list(range(n))
    for row in plain:
        assert_same(unflatten_row(row), expected(row["index"]))  # written without row hashes


def _hashes(n: int, edited: dict[int, str] | None = None) -> list[str]:
    return [(edited or {}).get(i, f"h{i}") for i in range(n)]


def test_rerun_keeps_rows_whose_content_is_unchanged_and_reindexes_them(tmp_path):
    """Editing, inserting and removing source rows: only new or edited rows are left to encode."""
    write_cache(tmp_path, range(10), row_hashes=_hashes(10))
    finalize_cache(tmp_path, FINGERPRINT, 10)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*")}
    # New data set: a row inserted before the others, row 5 edited, row 9 removed.
    new = ["new", *_hashes(9, {5: "h5-edited"})]
    writer = CacheWriter(tmp_path, FINGERPRINT, shard_size=4, row_hashes=new)
    assert writer.done_indices() == set(range(10)) - {0, 6}  # the inserted row 0 and edited row 5 (now 6) only
    changed = {p.name for p in tmp_path.glob("shard-*") if p.stat().st_mtime_ns != stamps.get(p.name)}
    assert changed == set(stamps)  # every shard moved (indices +1), each rewritten by Arrow, nothing encoded
    for i in (0, 6):
        writer.add(i, make_row(i))
    writer.close()
    finalize_cache(tmp_path, FINGERPRINT, 10)
    dataset = load_cache(tmp_path, FINGERPRINT)
    assert dataset["index"][:] == list(range(10)) and "row_hash" not in dataset.column_names
    # Rows 1..9 now hold the old rows 0..8 (moved, not re-encoded): their content came along.
    moved = [dataset[i]["sample_id"] for i in (1, 2, 5, 7)]
    assert moved == ["s000", "s001", "s004", "s006"]


def test_damaged_or_missing_shard_is_named_and_repaired_by_the_next_writer(tmp_path):
    write_cache(tmp_path, range(10), row_hashes=_hashes(10))
    finalize_cache(tmp_path, FINGERPRINT, 10)
    shard = tmp_path / "shard-p000-000001.arrow"
    shard.write_bytes(shard.read_bytes()[:300])  # truncated
    with pytest.raises(DamagedShard, match=f"cache shard {shard} is damaged.*rerun precompute_cache.py"):
        load_cache(tmp_path, FINGERPRINT)
    writer = CacheWriter(tmp_path, FINGERPRINT, shard_size=4, row_hashes=_hashes(10))
    assert writer.done_indices() == set(range(10)) - {4, 5, 6, 7} and not shard.exists()
    for i in (4, 5, 6, 7):
        writer.add(i, make_row(i))
    writer.close()
    finalize_cache(tmp_path, FINGERPRINT, 10)
    assert [r["index"] for r in read_all(load_cache(tmp_path, FINGERPRINT))] == list(range(10))
    (tmp_path / "shard-p000-000000.arrow").unlink()
    with pytest.raises(DamagedShard, match="shard-p000-000000.arrow is damaged"):
        load_cache(tmp_path, FINGERPRINT)


def test_fingerprint_refusal_and_rebuild(tmp_path):
    write_cache(tmp_path, range(5))
    finalize_cache(tmp_path, FINGERPRINT, 5)
    other = {**FINGERPRINT, "resolution": 1024, "sources": {"train.jsonl": "0000"}}
    assert fingerprint_diff(FINGERPRINT, other) == [
        "resolution: cached 512, requested 1024",
        "sources.train.jsonl: cached '9f2c', requested '0000'",
    ]
    with pytest.raises(FingerprintMismatch, match="resolution: cached 512, requested 1024") as err:
        load_cache(tmp_path, other)
    assert len(err.value.differences) == 2 and "--rebuild_cache" in str(err.value)
    assert "CacheWriter" not in str(err.value) and "rebuild=" not in str(err.value)  # flags only
    # subset=True compares only the requested keys (e.g. settings without the sources), naming any it lacks
    assert len(load_cache(tmp_path, {"model": "tiny/qwen-edit", "revision": "abc"}, subset=True)) == 5
    with pytest.raises(FingerprintMismatch) as err:
        load_cache(tmp_path, {"resolution": 1024, "max_sequence_length": None}, subset=True)
    assert err.value.differences == [
        "max_sequence_length: cached '<missing>', requested None",
        "resolution: cached 512, requested 1024",
    ]
    with pytest.raises(FingerprintMismatch, match="resolution"):
        CacheWriter(tmp_path, other)
    assert len(load_cache(tmp_path, FINGERPRINT)) == 5  # the refused writer changed nothing

    with CacheWriter(tmp_path, other, shard_size=4, rebuild=True) as writer:
        assert writer.done_indices() == set()
        for i in range(3):
            writer.add(i, make_row(i + 100))
    with pytest.raises(CacheNotFinished):
        load_cache(tmp_path, other)
    finalize_cache(tmp_path, other, 3)
    dataset = load_cache(tmp_path, other)
    assert dataset["sample_id"][:] == ["s100", "s101", "s102"] and len(dataset.cache_files) == 1
    with pytest.raises(FingerprintMismatch):
        load_cache(tmp_path, FINGERPRINT)


def test_unfinished_and_incomplete_caches_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_cache(tmp_path)
    write_cache(tmp_path, [0, 1, 3, 3 + 1])
    with pytest.raises(CacheNotFinished, match="unfinished"):
        load_cache(tmp_path, FINGERPRINT)
    with pytest.raises(ValueError, match=r"1 missing \(first \[2\]\)"):
        finalize_cache(tmp_path, FINGERPRINT, 5)
    with pytest.raises(ValueError, match=r"1 out of range \(first \[4\]\)"):
        finalize_cache(tmp_path, FINGERPRINT, 4)
    with CacheWriter(tmp_path, FINGERPRINT) as writer:
        with pytest.raises(ValueError, match="already in the cache"):
            writer.add(3, make_row(3))
        writer.skip(2, "s002", "unreadable control image")
    finalize_cache(tmp_path, FINGERPRINT, 5)
    dataset = load_cache(tmp_path, FINGERPRINT)
    assert dataset["index"][:] == [0, 1, 3, 4] and "skip_reason" not in dataset.column_names
    assert cache_info(tmp_path)["skipped"] == [{"index": 2, "sample_id": "s002", "reason": "unreadable control image"}]
    for row, i in zip(read_all(dataset), [0, 1, 3, 4], strict=True):
        assert_same(row, expected(i))
    # reopening a finished cache marks it unfinished until finalized again
    CacheWriter(tmp_path, FINGERPRINT).close()
    with pytest.raises(CacheNotFinished):
        load_cache(tmp_path)


def test_two_processes_equal_one(tmp_path):
    n = 11
    single, multi = tmp_path / "single", tmp_path / "multi"
    write_cache(single, range(n), shard_size=3)
    finalize_cache(single, FINGERPRINT, n)
    for p in range(2):
        write_cache(multi, range(p, n, 2), process_index=p, num_processes=2, shard_size=3)
    with pytest.raises(ValueError, match="belongs to process 1"):
        CacheWriter(multi, FINGERPRINT, process_index=0, num_processes=2).add(1, make_row(1))
    finalize_cache(multi, FINGERPRINT, n)
    assert cache_info(multi)["shards"] == [
        "shard-p000-000000.arrow",
        "shard-p000-000001.arrow",
        "shard-p001-000000.arrow",
        "shard-p001-000001.arrow",
    ]
    merged, alone = load_cache(multi, FINGERPRINT), load_cache(single, FINGERPRINT)
    assert merged["index"][:] == list(range(n)) and len(merged.cache_files) == 4
    assert_same(read_all(merged), read_all(alone))
    assert token_counts(merged) == token_counts(alone)


def test_kill_and_resume(tmp_path):
    n, shard_size = 40, 4
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(killed), str(n), str(shard_size), "0.05"])
    try:
        deadline = time.monotonic() + 60
        while not (killed.is_dir() and list(killed.glob("shard-*.arrow"))):
            assert proc.poll() is None and time.monotonic() < deadline, "writer ended before writing a shard"
            time.sleep(0.01)
        assert proc.poll() is None  # still writing when killed
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    shards = sorted(killed.glob("shard-*.arrow"))
    in_shards = {i for p in shards for i in pa.ipc.open_stream(pa.memory_map(str(p))).read_all()["index"].to_pylist()}
    assert 1 <= len(shards) < n // shard_size and in_shards == set(range(shard_size * len(shards)))
    # what a kill in the middle of a write leaves: a truncated temp file, which must never be read as a shard
    (killed / f".shard-p000-{len(shards):06d}.arrow.99999.tmp").write_bytes(shards[0].read_bytes()[:100])

    writer = CacheWriter(killed, FINGERPRINT, shard_size=shard_size)
    done = writer.done_indices()
    assert done == in_shards
    added = 0
    with writer:
        for i in range(n):
            if i not in done:
                writer.add(i, make_row(i))
                added += 1
    assert added == n - len(done) and not list(killed.glob(".*.tmp"))
    finalize_cache(killed, FINGERPRINT, n)

    write_cache(clean, range(n), shard_size=shard_size)
    finalize_cache(clean, FINGERPRINT, n)
    resumed = load_cache(killed, FINGERPRINT)
    assert resumed["index"][:] == list(range(n)) and len(resumed.cache_files) == n // shard_size
    assert_same(read_all(resumed), read_all(load_cache(clean, FINGERPRINT)))


def test_legacy_v1_cache(tmp_path):
    rows = []
    for i in [2, 0, 1]:
        row = make_row(i)
        del row["img_shapes"], row["sources"]
        h, w = row["target_latents"].shape[1:]
        rows.append({**flatten_row(row), "index": i, "height": 8 * h, "width": 8 * w})
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path))
    files = sorted(os.listdir(tmp_path))

    with pytest.raises(FingerprintMismatch, match="resolution: cached '<missing>'"):
        load_cache(tmp_path, FINGERPRINT)
    dataset = load_cache(tmp_path)
    assert dataset["index"][:] == [0, 1, 2] and set(dataset["version"][:]) == {"1.0"}
    assert dataset["img_shapes"][:] == [make_row(i)["img_shapes"] for i in range(3)]
    assert dataset["img_shapes"][2] == [[1, 4, 5], [1, 3, 2], [1, 1, 3]]  # 64x80 px; controls (4, 6, 4), (4, 2, 6)
    assert token_counts(dataset) == [6, 16, 29]
    for i, row in enumerate(read_all(dataset)):
        want = expected(i, version="1.0")
        del want["sources"]
        h, w = want["target_latents"].shape[1:]
        assert_same(row, {**want, "height": 8 * h, "width": 8 * w})
    assert sorted(os.listdir(tmp_path)) == files and {Path(f["filename"]).parent for f in dataset.cache_files} == {
        tmp_path
    }

    bare = tmp_path / "bare"  # no index or sample_id columns either
    datasets.Dataset.from_list([{"height": 32, "width": 48, "x": [1.0]}] * 2).save_to_disk(str(bare))
    dataset = load_cache(bare)
    assert (dataset["index"][:], dataset["sample_id"][:], dataset["img_shapes"][:]) == (
        [0, 1],
        ["0", "1"],
        [[[1, 2, 3]]] * 2,
    )


def test_save_tensors_atomic(tmp_path):
    from safetensors.torch import load_file

    tensors = {"prompt_embeds": torch.randn(3, 8), "pooled_prompt_embeds": torch.randn(6)}
    save_tensors_atomic(tmp_path / "empty_prompt.safetensors", tensors)
    assert os.listdir(tmp_path) == ["empty_prompt.safetensors"]
    assert_same(load_file(tmp_path / "empty_prompt.safetensors"), tensors)
