"""Precomputed-row cache: memory-mapped Arrow shards written by `datasets`-compatible IPC streams.

Layout of a cache directory (the directory belongs to the cache):

- `fingerprint.json`: the settings every row depends on (for training data: `common.training_data.data_fingerprint`),
  written when the first writer opens the cache;
- `shard-p{process:03d}-{counter:06d}.arrow`: Arrow IPC stream files, one per `shard_size` rows of one process,
  each written to a hidden `.{name}.{pid}.tmp` file in the same directory, fsynced and renamed into place, so a
  killed writer leaves either a complete shard or an ignored temp file;
- `skipped-p{process:03d}-{counter:06d}.arrow`: the rows that could not be cached (index, sample_id, reason);
- each entry carries `row_hash`, the content hash of its source row: a rerun keeps rows whose hash is still in the
  data set (re-indexed if rows were added or removed before them), drops the others and encodes only what is new,
  edited, damaged or was bad (`CacheWriter(row_hashes=...)`);
- `cache_info.json`: written by `finalize_cache` once every row is present (with each shard's row count, so a
  truncated shard is named on load); a cache without it is unfinished;
- `state.json` + `dataset_info.json`, also written by `finalize_cache`: `datasets.load_from_disk(cache_dir)`
  opens the rows as they are stored (shard order; `index` gives the source order, `version` and `row_hash` are
  columns). `load_cache` returns them in source order without the internal `row_hash`.

Row encoding (`flatten_row` / `unflatten_row`), generic over the row's keys:

- a tensor `k` -> `k` (flat values) + `k__shape`; a non-empty list of tensors `k` -> `k` (list of flat values) +
  `k__shapes`; a dict `k` -> JSON text in `k__json` (Arrow would merge differing keys); anything else (None,
  str, numbers, nested lists such as `img_shapes`) is stored as is;
- dtypes are kept (float32 stays float32, float16 float16, ints and bools as such), except bfloat16, which numpy
  and Arrow lack: it is stored as its exact float32 values and comes back as float32;
- every written row also has `index` (source order), `version` (`CACHE_VERSION`) and `sample_id`.

Shards of different processes may infer different Arrow types for an all-None or all-empty column; loading
unifies them (`datasets.concatenate_datasets` promotes null types and fills missing columns with None).

Legacy v1.0 caches are `Dataset.save_to_disk` folders of rows in the same tensor encoding but without `version`
or `img_shapes`, holding the target's pixel `height`/`width`. They load with `version` "1.0" and `img_shapes`
rebuilt as `[[1, height // 16, width // 16]]` (VAE factor 8, 2x2 packing) followed by `[1, h // 2, w // 2]` per
control latent (C, h, w) listed in `control_latents__shapes`, if present; a missing `index` becomes the row position
and a missing `sample_id` the index. They carry no fingerprint, so `load_cache` refuses them when a fingerprint is
requested; load them with `fingerprint=None` to use them unverified.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import datasets
import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import save as safetensors_save
from torch import Tensor

from common.errors import UserError

CACHE_VERSION = "2.0"
LEGACY_VERSION = "1.0"
INFO_FILE = "cache_info.json"
FINGERPRINT_FILE = "fingerprint.json"
SHAPE, SHAPES, JSON = "__shape", "__shapes", "__json"
RESERVED_COLUMNS = ("index", "version", "skip_reason", "row_hash")
SHARD_PATTERN = re.compile(r"shard-p(\d+)-(\d+)\.arrow")  # cached rows
SKIPPED_PATTERN = re.compile(r"skipped-p(\d+)-(\d+)\.arrow")  # rows that could not be cached, with the reason
# Written by finalize_cache so that `datasets.load_from_disk(cache_dir)` opens the cached rows (module doc).
DATASETS_FILES = (datasets.config.DATASET_STATE_JSON_FILENAME, datasets.config.DATASET_INFO_FILENAME)
logger = logging.getLogger(__name__)


class FingerprintMismatch(UserError):
    """The cache was built with settings other than the requested ones."""

    def __init__(self, cache_dir: str | os.PathLike, differences: list[str]) -> None:
        """Name every differing setting with its cached and requested value."""
        self.differences = differences
        super().__init__(
            f"cache at {cache_dir} was built with other settings ({'; '.join(differences)}); rerun "
            "precompute_cache.py with the requested settings and --rebuild_cache, "
            "or point --cache_dir to another directory"
        )


class CacheNotFinished(UserError, RuntimeError):
    """The cache directory holds no finalized cache (its writers were interrupted or never finalized)."""


class CacheMissing(UserError, FileNotFoundError):
    """There is no cache at the given directory."""


class DamagedShard(UserError):
    """A shard file of the cache is missing, truncated or unreadable; rerunning the precompute repairs it."""

    def __init__(self, path: Path, cause: str) -> None:
        """Name the file and what is wrong with it."""
        self.path, self.cause = path, cause
        super().__init__(
            f"cache shard {path} is damaged ({cause}): rerun precompute_cache.py with the same flags, it encodes "
            "only the rows of the damaged shard again"
        )


def fingerprint_diff(cached: dict, requested: dict) -> list[str]:
    """'key: cached X, requested Y' for every differing setting, nested keys dotted, compared as JSON."""
    cached, requested = _as_json(cached), _as_json(requested)
    return _diff(cached, requested, "")


def _diff(cached: dict, requested: dict, prefix: str) -> list[str]:
    """Recursive worker of `fingerprint_diff`."""
    lines = []
    for key in sorted(cached.keys() | requested.keys()):
        old, new = cached.get(key, "<missing>"), requested.get(key, "<missing>")
        if isinstance(old, dict) and isinstance(new, dict):
            lines += _diff(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: cached {old!r}, requested {new!r}")
    return lines


def _as_json(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists); raises TypeError if it is not JSON-able."""
    return json.loads(json.dumps(value))


def _flat(tensor: Tensor) -> np.ndarray:
    """Flat numpy copy of a tensor, bfloat16 widened to float32."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.reshape(-1).numpy(force=True).copy()


def flatten_row(row: dict) -> dict:
    """Arrow-storable columns of one row: tensors flattened next to their shapes, dicts as JSON (module doc)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key.endswith((SHAPE, SHAPES, JSON)):
            raise ValueError(f"row key {key!r} ends with a suffix reserved for cache columns")
        if isinstance(value, Tensor):
            out[key], out[key + SHAPE] = _flat(value), list(value.shape)
        elif isinstance(value, list | tuple) and value and all(isinstance(v, Tensor) for v in value):
            out[key], out[key + SHAPES] = [_flat(v) for v in value], [list(v.shape) for v in value]
        elif isinstance(value, list | tuple) and any(isinstance(v, Tensor) for v in value):
            raise TypeError(f"row key {key!r} mixes tensors and other values")
        elif isinstance(value, dict):
            out[key + JSON] = json.dumps(value, sort_keys=True)
        else:
            out[key] = value
    return out


def stored_row(index: int, row: dict) -> dict:
    """Columns of row `index` as a shard stores them (index, version, `flatten_row`); `unflatten_row` reads them."""
    if not isinstance(row.get("sample_id"), str):
        raise ValueError(f"row {index} needs a str 'sample_id'")
    if reserved := set(RESERVED_COLUMNS) & row.keys():
        raise ValueError(f"row {index} uses reserved keys {sorted(reserved)}")
    return {"index": index, "version": CACHE_VERSION, **flatten_row(row)}


def _tensor(flat: Any, shape: list[int]) -> Tensor:
    """Tensor of `shape` from flat values (numpy keeps the stored dtype; Python lists get torch's default)."""
    if isinstance(flat, np.ndarray):
        return torch.from_numpy(flat.copy()).reshape(shape)
    return torch.tensor(flat).reshape(shape)


def unflatten_row(row: dict) -> dict:
    """Inverse of `flatten_row` (plus the index/version/sample_id columns) for a row read back from the cache."""
    keys = dict.fromkeys(name.removesuffix(SHAPE).removesuffix(SHAPES).removesuffix(JSON) for name in row)
    out: dict[str, Any] = {}
    for key in keys:
        text, value = row.get(key + JSON), row.get(key)
        shape, shapes = row.get(key + SHAPE), row.get(key + SHAPES)
        if text is not None:
            out[key] = json.loads(text)
        elif value is not None and shape is not None:
            out[key] = _tensor(value, shape)
        elif value is not None and shapes is not None:
            out[key] = [_tensor(v, s) for v, s in zip(value, shapes, strict=True)]
        else:
            out[key] = value
    return out


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Binary file that appears at `path` complete (temp file in the same directory, fsync, rename) or not at all."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _write_json(path: Path, value: dict) -> None:
    """Write `value` as JSON atomically."""
    with _atomic_file(path) as f:
        f.write(json.dumps(value, indent=2, sort_keys=True).encode())


def _read_json(path: Path) -> dict | None:
    """Parsed JSON file, or None if it does not exist."""
    return json.loads(path.read_text()) if path.exists() else None


def save_tensors_atomic(path: str | os.PathLike, tensors: dict[str, Tensor]) -> None:
    """Save tensors as a safetensors file atomically (e.g. the empty-prompt embeddings stored once per cache)."""
    data = safetensors_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    with _atomic_file(Path(path)) as f:
        f.write(data)


def _shards(cache_dir: Path, pattern: re.Pattern = SHARD_PATTERN) -> list[Path]:
    """Complete shard files of a cache directory (of cached rows, or with SKIPPED_PATTERN of skipped ones)."""
    return sorted(p for p in cache_dir.iterdir() if pattern.fullmatch(p.name))


def _read_shard(path: Path) -> pa.Table:
    """Memory-mapped Arrow table of one shard; DamagedShard naming it if it cannot be read."""
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except (OSError, pa.ArrowException) as error:
        raise DamagedShard(path, str(error) or type(error).__name__) from error


def _column(table: pa.Table, name: str) -> list:
    """A column as Python values, None for every row when the shard has no such column."""
    return table[name].to_pylist() if name in table.column_names else [None] * table.num_rows


def _shard_entries(cache_dir: Path) -> list[tuple[int, str, str | None, str | None]]:
    """(index, sample_id, skip reason or None, row hash or None) of every entry in the complete shards."""
    entries = []
    for path in _shards(cache_dir) + _shards(cache_dir, SKIPPED_PATTERN):
        table = _read_shard(path)
        columns = [_column(table, name) for name in ("index", "sample_id", "skip_reason", "row_hash")]
        entries += zip(*columns, strict=True)
    return entries


def _write_shard(path: Path, table: pa.Table) -> None:
    """Write `table` as an Arrow IPC stream file at `path`, atomically."""
    with _atomic_file(path) as f, pa.ipc.new_stream(f, table.schema) as stream:
        stream.write_table(table)


def _reconcile(cache_dir: Path, row_hashes: Sequence[str | None]) -> None:
    """Keep each cached row whose content hash is still in the data set, under its new index; drop the rest.

    Shards are rewritten (Arrow copies, nothing is encoded) only when a row of theirs moved or went away; damaged
    shards are removed with a warning and skipped rows are forgotten, so the writer encodes (or checks again)
    exactly the rows that are new, edited, damaged or were bad.
    """
    wanted: dict[str, list[int]] = {}
    for index, row_hash in enumerate(row_hashes):
        if row_hash is not None:
            wanted.setdefault(row_hash, []).append(index)
    for path in _shards(cache_dir, SKIPPED_PATTERN):
        path.unlink()
    for path in _shards(cache_dir):
        try:
            table = _read_shard(path)
        except DamagedShard as error:
            logger.warning(f"{error.path} is damaged ({error.cause}); its rows are encoded again")
            path.unlink()
            continue
        keep, new_index = [], []
        for j, row_hash in enumerate(_column(table, "row_hash")):
            if wanted.get(row_hash):  # still in the data set, and not yet kept from another shard
                keep.append(j)
                new_index.append(wanted[row_hash].pop(0))
        if len(keep) == table.num_rows and new_index == _column(table, "index"):
            continue
        if not keep:
            path.unlink()
            continue
        table = table.take(keep)
        position = table.schema.get_field_index("index")
        _write_shard(path, table.set_column(position, "index", pa.array(new_index, table.schema.field("index").type)))


def _remove_temps(cache_dir: Path, prefix: str = ".") -> None:
    """Delete leftover temp files of interrupted writes whose names start with `prefix`."""
    for path in cache_dir.glob(f"{prefix}*.tmp"):
        path.unlink(missing_ok=True)


class CacheWriter:
    """Writes one process's rows as atomic shards; resumable after a kill (`done_indices`).

    Process p handles source indices p::num_processes. With rebuild=True, process 0 deletes the old cache while
    constructing its writer: construct it there first, `accelerator.wait_for_everyone()`, then on the others.
    Without rebuild every process checks the stored fingerprint, and the construction order does not matter.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        fingerprint: dict,
        *,
        process_index: int = 0,
        num_processes: int = 1,
        shard_size: int = 32,
        rebuild: bool = False,
        row_hashes: Sequence[str | None] | None = None,
    ) -> None:
        """Open (or create, or with rebuild=True on process 0 empty) a cache for `fingerprint`.

        `row_hashes[i]`: content hash of source row i (None if it cannot be read), stored with each row; given on
        process 0, cached rows whose hash is gone are dropped and the others re-indexed (`_reconcile`), so only new,
        edited or damaged rows are encoded again.
        """
        if not 0 <= process_index < num_processes or shard_size < 1:
            raise ValueError(f"bad writer settings: process {process_index} of {num_processes}, shard {shard_size}")
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = _as_json(fingerprint)
        self.process_index, self.num_processes, self.shard_size = process_index, num_processes, shard_size
        fingerprint_path = self.cache_dir / FINGERPRINT_FILE
        self.row_hashes = row_hashes
        finished = [self.cache_dir / name for name in (INFO_FILE, *DATASETS_FILES)]
        if process_index == 0 and rebuild:
            for path in [*_shards(self.cache_dir), *_shards(self.cache_dir, SKIPPED_PATTERN), *finished]:
                path.unlink(missing_ok=True)
            fingerprint_path.unlink(missing_ok=True)
            _remove_temps(self.cache_dir)
        stored = _read_json(fingerprint_path)
        if stored is None:
            _write_json(fingerprint_path, self.fingerprint)
        elif differences := fingerprint_diff(stored, self.fingerprint):
            raise FingerprintMismatch(self.cache_dir, differences)
        if process_index == 0:
            for path in finished:  # unfinished from here until finalize_cache
                path.unlink(missing_ok=True)
            if row_hashes is not None:
                _reconcile(self.cache_dir, row_hashes)
        _remove_temps(self.cache_dir, f".shard-p{process_index:03d}-")
        _remove_temps(self.cache_dir, f".skipped-p{process_index:03d}-")
        own = [SHARD_PATTERN.fullmatch(p.name) for p in _shards(self.cache_dir)]
        own += [SKIPPED_PATTERN.fullmatch(p.name) for p in _shards(self.cache_dir, SKIPPED_PATTERN)]
        self._counter = max((int(m[2]) + 1 for m in own if int(m[1]) == process_index), default=0)
        self._seen = self.done_indices()
        self._buffer: list[dict] = []

    def done_indices(self) -> set[int]:
        """Indices (rows and skipped samples) already in complete shards of this cache, from any process."""
        return {entry[0] for entry in _shard_entries(self.cache_dir)}

    def _hash(self, index: int) -> dict:
        """{"row_hash": ...} of row `index` when the writer knows the rows' hashes."""
        return {} if self.row_hashes is None else {"row_hash": self.row_hashes[index]}

    def add(self, index: int, row: dict) -> None:
        """Buffer row `index` (it needs a str "sample_id"); a full buffer is written as one shard."""
        self._append({**stored_row(index, row), **self._hash(index)})

    def skip(self, index: int, sample_id: str, reason: str) -> None:
        """Record that sample `index` has no row (e.g. an unreadable image); finalize_cache lists it."""
        entry = {"index": index, "version": CACHE_VERSION, "sample_id": sample_id, "skip_reason": reason}
        self._append({**entry, **self._hash(index)})

    def _append(self, entry: dict) -> None:
        """Buffer one entry after checking it belongs to this process and is new."""
        index = entry["index"]
        if index % self.num_processes != self.process_index:
            raise ValueError(f"index {index} belongs to process {index % self.num_processes}, not {self.process_index}")
        if index in self._seen:
            raise ValueError(f"index {index} is already in the cache")
        self._seen.add(index)
        self._buffer.append(entry)
        if len(self._buffer) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        """Write the buffered entries as the next shard of this process, atomically."""
        if not self._buffer:
            return
        # Cached and skipped rows go to separate files, so the shards hold only rows (`datasets.load_from_disk`).
        for kind, entries in (
            ("shard", [e for e in self._buffer if "skip_reason" not in e]),
            ("skipped", [e for e in self._buffer if "skip_reason" in e]),
        ):
            if entries:
                names = dict.fromkeys(name for entry in entries for name in entry)
                table = pa.table({name: pa.array([entry.get(name) for entry in entries]) for name in names})
                _write_shard(self.cache_dir / f"{kind}-p{self.process_index:03d}-{self._counter:06d}.arrow", table)
        self._counter += 1
        self._buffer = []

    def close(self) -> None:
        """Write the remaining buffered rows as a last (short) shard."""
        self._flush()

    def __enter__(self) -> CacheWriter:
        """Use as a context manager that closes (and so keeps the finished rows) on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the writer."""
        self.close()


def finalize_cache(cache_dir: str | os.PathLike, fingerprint: dict, num_rows: int, extra: dict | None = None) -> None:
    """Check that indices 0..num_rows-1 are each cached or skipped exactly once, then write cache_info.json.

    Run on the main process after every writer has closed (`accelerator.wait_for_everyone()`).
    """
    cache_dir = Path(cache_dir)
    stored = _read_json(cache_dir / FINGERPRINT_FILE)
    if stored is None:
        raise CacheNotFinished(f"no cache writer ever opened {cache_dir}")
    if differences := fingerprint_diff(stored, fingerprint):
        raise FingerprintMismatch(cache_dir, differences)
    if num_rows < 1:
        raise ValueError(f"a cache needs at least one source sample, got num_rows={num_rows}")
    entries = _shard_entries(cache_dir)
    counts = Counter(entry[0] for entry in entries)
    problems = {
        "missing": [i for i in range(num_rows) if i not in counts],
        "duplicated": sorted(i for i, n in counts.items() if n > 1),
        "out of range": sorted(i for i in counts if not 0 <= i < num_rows),
    }
    if any(problems.values()):
        found = "; ".join(f"{len(v)} {k} (first {v[:10]})" for k, v in problems.items() if v)
        raise ValueError(f"cache at {cache_dir} does not hold rows 0..{num_rows - 1} exactly once: {found}")
    skipped = sorted((i, s, r) for i, s, r, _ in entries if r is not None)
    if len(skipped) == num_rows:
        raise UserError(f"no usable rows: all {num_rows} rows were skipped (first: {skipped[0][2]})")
    _remove_temps(cache_dir)
    info = {
        "version": CACHE_VERSION,
        "fingerprint": _as_json(fingerprint),
        "num_rows": num_rows,
        "num_cached": num_rows - len(skipped),
        "skipped": [{"index": i, "sample_id": s, "reason": r} for i, s, r in skipped],
        "shards": [p.name for p in _shards(cache_dir)],
        "shard_rows": {p.name: _read_shard(p).num_rows for p in _shards(cache_dir)},
        "extra": _as_json(extra or {}),
    }
    _write_datasets_state(cache_dir, info["shards"])
    _write_json(cache_dir / INFO_FILE, info)


def _write_datasets_state(cache_dir: Path, shards: list[str]) -> None:
    """The two files `datasets.load_from_disk` reads, listing the row shards (rows in shard order, with `index`)."""
    state = {
        "_data_files": [{"filename": name} for name in shards],
        "_fingerprint": hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    _write_json(cache_dir / datasets.config.DATASET_STATE_JSON_FILENAME, state)
    _write_json(cache_dir / datasets.config.DATASET_INFO_FILENAME, {"description": "precompute_cache.py rows"})


def cache_info(cache_dir: str | os.PathLike) -> dict:
    """Contents of a finalized cache's cache_info.json; CacheNotFinished if the cache was never finalized."""
    cache_dir = Path(cache_dir)
    info = _read_json(cache_dir / INFO_FILE)
    if info is None:
        if (cache_dir / FINGERPRINT_FILE).exists():
            raise CacheNotFinished(
                f"cache at {cache_dir} is unfinished (interrupted or not finalized): run the precompute again, "
                "it resumes from the complete shards"
            )
        raise CacheMissing(f"no cache at {cache_dir}")
    return info


def _sorted_rows(dataset: datasets.Dataset, index: np.ndarray, keep: np.ndarray) -> datasets.Dataset:
    """Rows `keep` of `dataset` ordered by `index`, as an in-memory index map over the memory-mapped data."""
    order = keep[np.argsort(index[keep], kind="stable")]
    return dataset.select(order, keep_in_memory=True)


def _columns(dataset: datasets.Dataset, names: list[str]) -> pa.Table:
    """Small columns of a dataset as one Arrow table (no tensor decoding)."""
    return dataset.select_columns(names).with_format("arrow")[:]


def load_cache(
    cache_dir: str | os.PathLike,
    fingerprint: dict | None = None,
    *,
    subset: bool = False,
    defaults: dict | None = None,
) -> datasets.Dataset:
    """Memory-mapped dataset of a finalized cache (or a legacy v1.0 one), one row per cached sample, by index.

    A given fingerprint must equal the stored one (FingerprintMismatch otherwise); with subset=True only its own
    keys are compared (e.g. a fingerprint of the settings alone, without the rows' content). `defaults` gives the
    value of a key that either side lacks: a setting added later, left out of fingerprints at its old behaviour,
    so caches written before it existed stay valid and one built with another value is still refused.
    """
    cache_dir = Path(cache_dir)
    saved_dataset = (cache_dir / datasets.config.DATASET_STATE_JSON_FILENAME).exists()
    if saved_dataset and not (cache_dir / FINGERPRINT_FILE).exists():
        info = {"version": LEGACY_VERSION, "fingerprint": {}}
    else:
        info = cache_info(cache_dir)
    stored = {**(defaults or {}), **info["fingerprint"]}
    if fingerprint is not None:
        fingerprint = {**(defaults or {}), **fingerprint}
    if fingerprint is not None and subset:
        stored = {key: value for key, value in stored.items() if key in fingerprint}
    if fingerprint is not None and (differences := fingerprint_diff(stored, fingerprint)):
        raise FingerprintMismatch(cache_dir, differences)
    if info["version"] == LEGACY_VERSION:
        return _load_legacy(cache_dir)
    if info["version"] != CACHE_VERSION:
        raise UserError(f"cache at {cache_dir} has unsupported version {info['version']!r}")
    dataset = datasets.concatenate_datasets([_open_shard(cache_dir / name, info) for name in info["shards"]])
    skip = "skip_reason" in dataset.column_names  # caches written before skipped rows had files of their own
    meta = _columns(dataset, ["index", "skip_reason"] if skip else ["index"])
    keep = np.flatnonzero(meta["skip_reason"].is_null().to_numpy()) if skip else np.arange(len(dataset))
    dataset = _sorted_rows(dataset, meta["index"].to_numpy(), keep)
    internal = [name for name in ("skip_reason", "row_hash") if name in dataset.column_names]
    return dataset.remove_columns(internal) if internal else dataset


def _open_shard(path: Path, info: dict) -> datasets.Dataset:
    """One shard as a memory-mapped dataset; DamagedShard if it is missing, unreadable or shorter than written."""
    try:
        part = datasets.Dataset.from_file(str(path))
    except (OSError, pa.ArrowException) as error:
        raise DamagedShard(path, str(error) or type(error).__name__) from error
    expected = info.get("shard_rows", {}).get(path.name)
    if expected is not None and len(part) != expected:
        raise DamagedShard(path, f"{len(part)} rows, {expected} were written")
    return part


def cached_row_hashes(cache_dir: str | os.PathLike) -> dict[int, str | None]:
    """Content hash of each source row the cache holds or skipped, by source index (None where not recorded)."""
    return {index: row_hash for index, _, _, row_hash in _shard_entries(Path(cache_dir))}


def _load_legacy(cache_dir: Path) -> datasets.Dataset:
    """A v1.0 `save_to_disk` cache with index, version "1.0", sample_id and img_shapes added (module doc)."""
    dataset = datasets.load_from_disk(str(cache_dir))
    n = len(dataset)
    if "index" not in dataset.column_names:
        dataset = dataset.add_column("index", list(range(n)))
    if "sample_id" not in dataset.column_names:
        dataset = dataset.add_column("sample_id", [str(i) for i in _columns(dataset, ["index"])["index"].to_pylist()])
    controls = "control_latents" + SHAPES
    has_controls = controls in dataset.column_names
    meta = _columns(dataset, ["index", "height", "width"] + ([controls] if has_controls else []))
    control_shapes = meta[controls].to_pylist() if has_controls else [[]] * n
    img_shapes = [
        [[1, h // 16, w // 16]] + [[1, s[-2] // 2, s[-1] // 2] for s in shapes or []]
        for h, w, shapes in zip(meta["height"].to_pylist(), meta["width"].to_pylist(), control_shapes, strict=True)
    ]
    dataset = dataset.add_column("img_shapes", img_shapes).add_column("version", [LEGACY_VERSION] * n)
    return _sorted_rows(dataset, meta["index"].to_numpy(), np.arange(n))


def row_img_shapes(dataset: datasets.Dataset) -> list[list[list[int]]]:
    """img_shapes of every row ([frames, h, w] per image, target first), from the shape column alone."""
    return _columns(dataset, ["img_shapes"])[0].to_pylist()


def token_counts(dataset: datasets.Dataset) -> list[int]:
    """Image tokens per row (sum over img_shapes of frames * h * w), from the shape column alone."""
    return [sum(math.prod(shape) for shape in shapes) for shapes in row_img_shapes(dataset)]


def text_token_counts(dataset: datasets.Dataset) -> list[int]:
    """Text tokens per row (the length of its prompt embedding), from the shape column alone."""
    return [shape[0] for shape in _columns(dataset, ["prompt_embeds" + SHAPE])[0].to_pylist()]


def _arrow_value(scalar: pa.Scalar, kind: str) -> Any:
    """Python value of one cell; tensor columns as numpy arrays so the stored dtype survives."""
    if not scalar.is_valid or kind == "plain":
        return scalar.as_py()
    if kind == SHAPE:
        return scalar.values.to_numpy(zero_copy_only=False)
    return [scalar.values[j].values.to_numpy(zero_copy_only=False) for j in range(len(scalar.values))]


class CachedRows(torch.utils.data.Dataset):
    """Torch view of a loaded cache: item i is `unflatten_row` of row i (tensors in their stored dtype)."""

    def __init__(self, dataset: datasets.Dataset) -> None:
        """Wrap a dataset returned by `load_cache`."""
        self.dataset = dataset
        self._rows = dataset.with_format("arrow")
        names = set(dataset.column_names)
        self._kinds = {
            name: SHAPE if name + SHAPE in names else SHAPES if name + SHAPES in names else "plain"
            for name in dataset.column_names
        }

    def __len__(self) -> int:
        """Number of cached rows."""
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        """Row i as tensors and plain values."""
        table = self._rows[i]
        return unflatten_row({name: _arrow_value(table[name][0], kind) for name, kind in self._kinds.items()})
