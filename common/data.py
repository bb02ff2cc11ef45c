"""Edit-pair datasets: one row format over folders, manifests and Hugging Face datasets, and per-sample preparation.

Readers only list rows (paths, captions, lazy references): nothing is decoded until `prepare_sample`, so a bad
image surfaces as a `BadSampleError` naming its row and file, which `prepare_all` can collect instead of stopping.

Preparation reproduces what the diffusers pipelines do to their inputs at inference, with the pipelines' own
`VaeImageProcessor` (LANCZOS resize, [0, 1] -> [-1, 1]), so a LoRA trains on the tensors it will later be fed:

- every image is centre-cropped and resized by its own `ResolutionPolicy.plan` (target, and each control from its
  own aspect ratio, or by `control_plan` when `--control_resolution` sizes controls apart); with
  `target_area=1024*1024` that is the pipelines' `calculate_dimensions(1024 * 1024, w / h)`;
- a model whose text encoder sees the controls gets each one resized to its `EditModel.condition_size`;
- the edit mask is averaged over the target's 16 px latent tokens (8x VAE, 2x2 patches) for the loss weights.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import ImageOps

from common.errors import UserError
from common.models import EditModel, get_model
from common.resolution import ResizePlan, ResolutionPolicy

if TYPE_CHECKING:
    import datasets

# Pixels per latent token side: the FLUX.1, FLUX.2 and Qwen VAEs downsample 8x and their transformers take 2x2
# latent patches; the pipelines' image processors round to the same 16.
TOKEN_PIXELS = 16

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

# The processor the three pipelines build: VaeImageProcessor(vae_scale_factor=vae_scale_factor * 2), defaults
# otherwise (resample="lanczos", do_normalize=True), so training tensors are bit-identical to inference ones.
_PROCESSOR = VaeImageProcessor(vae_scale_factor=TOKEN_PIXELS)

# Rows read per Arrow batch when listing a Hugging Face dataset (bounds the memory of the scan).
_HF_BATCH_ROWS = 256

# "stem_control", "stem_control_3" or "stem_mask" in the single-folder layout.
_ROLE_RE = re.compile(r"(?P<base>.+?)_(?P<role>control(?:_(?P<k>\d+))?|mask)")
# "control", "control_0", ... subfolders in the parallel-folder layout.
_CONTROL_DIR_RE = re.compile(r"control(?:_(?P<k>\d+))?")

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError)


@dataclass(frozen=True)
class DatasetImage:
    """Encoded image bytes in one cell of a Hugging Face dataset, read on demand so listing rows holds no pixels."""

    dataset: datasets.Dataset = field(compare=False, repr=False)  # Arrow-formatted, memory-mapped
    origin: str  # the dataset's folder or hub name
    index: int
    column: str
    item: int | None = None  # position within a list-valued cell

    def read(self) -> bytes:
        """The encoded image bytes (PNG, JPEG, ...) as stored in the dataset."""
        cell = self.dataset[self.index].column(self.column)[0].as_py()
        return (cell if self.item is None else cell[self.item])["bytes"]


ImageSource = str | PIL.Image.Image | DatasetImage  # a path, an in-memory image, or an image inside a HF dataset


@dataclass(frozen=True)
class EditRow:
    """One listed edit pair, before any image is decoded."""

    index: int  # position in source order (stable; used for ordering and resume)
    sample_id: str  # file stem, "manifest.jsonl:12" (line) or "dataset[12]"
    target: ImageSource | None  # None only if missing (then it's a bad row)
    controls: tuple[ImageSource, ...]
    prompt: str | None  # None if the caption is missing or blank
    mask: ImageSource | None
    sources: dict[str, str] = field(hash=False)  # {"image", "control_0", ..., "mask", "caption"} -> where


@dataclass
class PreparedSample:
    """One edit pair as the encoders take it: tensors in [-1, 1] sized per image, and the VL condition images."""

    index: int
    sample_id: str
    prompt: str
    target: torch.Tensor  # (3, H, W) float32 in [-1, 1], sized by the ResolutionPolicy
    controls: list[torch.Tensor]  # VAE inputs (3, H_k, W_k) in [-1, 1], each sized from its own aspect ratio
    condition_images: list[PIL.Image.Image]  # what Qwen2.5-VL sees; empty for FLUX
    mask: torch.Tensor | None  # (H/16, W/16) float32 in [0, 1]: edit-mask share of each target token
    sources: dict[str, str]
    crops: dict[str, float] = field(default_factory=dict)  # {"image", "control_k"}: share of the area cropped away
    composited: list[str] = field(default_factory=list)  # "image", "control_k": transparency put over BACKGROUND

    @property
    def cropped(self) -> float:
        """The largest share of an image's area this sample's crops removed (0 when nothing was cropped)."""
        return max(self.crops.values(), default=0.0)


class BadSampleError(UserError):
    """A row that cannot be trained on (unreadable/missing image, missing caption, too many controls)."""

    def __init__(self, message: str, *, sample_id: str = "", path: str = "") -> None:
        """Keep the row id and offending file next to the message, for reports of skipped rows."""
        super().__init__(message)
        self.sample_id = sample_id
        self.path = path


def _bad(row: EditRow, what: str, reason: str) -> BadSampleError:
    """BadSampleError naming the row and the file behind `what` (a key of row.sources)."""
    path = row.sources.get(what, "")
    return BadSampleError(
        f"bad sample {row.sample_id!r}: {reason} ({what}: {path})", sample_id=row.sample_id, path=path
    )


# ---------------------------------------------------------------------------------------------------------------
# Readers


def read_rows(
    dataset: str | os.PathLike,
    *,
    image_column: str = "image",
    control_column: str = "control",
    caption_column: str = "prompt",
    mask_column: str | None = None,
) -> list[EditRow]:
    """List the edit pairs of a folder, parallel folders, JSONL/CSV manifest or HF dataset, in a deterministic order.

    The column names apply to manifests and HF datasets; mask_column=None uses a "mask" column when there is one.
    """
    columns = (image_column, control_column, caption_column, mask_column)
    path = Path(dataset).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_manifest(path, _jsonl_records(path), *columns)
        if suffix == ".csv":
            return _read_manifest(path, _csv_records(path), *columns)
        raise UserError(f"dataset {str(path)!r}: unsupported file type {suffix!r}; expected .jsonl or .csv")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            import datasets

            return _read_hf(datasets.load_from_disk(str(path)), str(path), path, *columns)
        if (path / "images").is_dir() or (path / "target").is_dir():
            return _read_parallel(path)
        return _read_folder(path)
    return _read_hub(str(dataset), columns)


def _read_hub(name: str, columns: tuple[str, str, str, str | None]) -> list[EditRow]:
    """Rows of a hub dataset (offline: only if it is in the local cache)."""
    if os.path.isabs(name) or name.startswith((".", "~")) or name.lower().endswith((".jsonl", ".csv")):
        raise UserError(f"dataset {name!r}: no such file or folder")
    import datasets

    try:
        loaded = datasets.load_dataset(name)
    except Exception as error:  # any failure here means "not a usable hub dataset": say so, keep the cause
        raise UserError(f"dataset {name!r} is no local file or folder, and loading it from the hub failed") from error
    return _read_hf(loaded, name, Path.cwd(), *columns)


def _split_stem(stem: str) -> tuple[str, str]:
    """(base stem, role) of a file stem in the single-folder layout: role "image", "control", "control_3" or "mask"."""
    match = _ROLE_RE.fullmatch(stem)
    return (match["base"], match["role"]) if match else (stem, "image")


def _control_key(role: str) -> int:
    """Order of a control role or folder: bare "control" first, then "control_k" by k."""
    _, _, k = role.partition("_")
    return int(k) if k else -1


def _image_files(folder: Path) -> list[Path]:
    """Non-hidden image files of a folder (hidden ones are e.g. macOS "._x.png" resource forks)."""
    return [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    ]


def _put(table: dict, key: Any, path: Path) -> None:
    """table[key] = path, refusing two files for one slot (e.g. x.png and x.jpg), which would be a silent guess."""
    if key in table:
        raise UserError(f"two files for the same image: {str(table[key])!r} and {str(path)!r}")
    table[key] = path


def _read_caption(path: Path) -> str | None:
    """Stripped caption text, or None when the file is missing, blank or not UTF-8."""
    try:
        text = path.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def _files_row(
    index: int,
    stem: str,
    target: Path | None,
    controls: list[Path],
    mask: Path | None,
    caption: Path,
    *,
    expected_target: Path | None = None,
) -> EditRow:
    """EditRow of the two folder layouts; a missing target (target=None) is reported as `expected_target`."""
    sources = {"image": str(target or expected_target)}
    sources.update({f"control_{k}": str(p) for k, p in enumerate(controls)})
    if mask is not None:
        sources["mask"] = str(mask)
    sources["caption"] = str(caption)
    return EditRow(
        index=index,
        sample_id=stem,
        target=str(target) if target else None,
        controls=tuple(str(p) for p in controls),
        prompt=_read_caption(caption),
        mask=str(mask) if mask else None,
        sources=sources,
    )


def _read_folder(folder: Path) -> list[EditRow]:
    """stem.png + stem.txt + stem_control[_k].png + stem_mask.png, all in one folder, sorted by stem.

    "x_control.png" or "x_mask.png" belongs to "x" only when "x.<ext>" exists; otherwise it is a target of its own
    (a name like "no_control.png" is then not misread, and a stray control shows up as a row without caption).
    """
    parsed = {path: _split_stem(path.stem) for path in _image_files(folder)}
    if not parsed:
        raise UserError(f"dataset {str(folder)!r}: no {'/'.join(IMAGE_EXTENSIONS)} images found")
    targets = {base for base, role in parsed.values() if role == "image"}
    files: dict[tuple[str, str], Path] = {}
    for path, (base, role) in parsed.items():
        _put(files, (base, role) if base in targets else (path.stem, "image"), path)
    rows = []
    for index, stem in enumerate(sorted({base for base, _ in files})):
        roles = {role: path for (base, role), path in files.items() if base == stem}
        numbered: dict[int, Path] = {}
        for role in sorted((r for r in roles if r.startswith("control")), key=_control_key):
            _put(numbered, max(_control_key(role), 0), roles[role])  # stem_control and stem_control_0 are one slot
        # A gap (stem_control_1 without stem_control / stem_control_0) names the missing file: a bad row, not a
        # row with fewer references.
        controls = [numbered.get(k, folder / f"{stem}_control_{k}.png") for k in range(max(numbered, default=-1) + 1)]
        caption = folder / f"{stem}.txt"
        rows.append(_files_row(index, stem, roles["image"], controls, roles.get("mask"), caption))
    return rows


def _single_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    """The one existing subfolder among `names` (several would be ambiguous), or None."""
    found = [root / n for n in names if (root / n).is_dir()]
    if len(found) > 1:
        raise UserError(f"dataset {str(root)!r}: use one of the folders {names}, not several")
    return found[0] if found else None


def _stem_table(folder: Path) -> dict[str, Path]:
    """Image files of a folder by stem."""
    table: dict[str, Path] = {}
    for path in _image_files(folder):
        _put(table, path.stem, path)
    return table


def _read_parallel(root: Path) -> list[EditRow]:
    """images/ (or target/) + control/ or control_0/, control_1/... + masks/ (or mask/), matched by file stem."""
    target_dir = _single_dir(root, ("images", "target"))
    mask_dir = _single_dir(root, ("masks", "mask"))
    control_dirs = sorted(
        (d for d in root.iterdir() if d.is_dir() and _CONTROL_DIR_RE.fullmatch(d.name)),
        key=lambda d: _control_key(d.name),
    )
    targets = _stem_table(target_dir)
    controls = [_stem_table(d) for d in control_dirs]
    masks = _stem_table(mask_dir) if mask_dir else {}
    stems = sorted(set(targets).union(*controls, masks))  # a control or mask without its target is a bad row
    if not stems:
        raise UserError(f"dataset {str(root)!r}: no images found in {str(target_dir)!r}")
    rows = []
    for index, stem in enumerate(stems):
        # Every target needs its first control, later control folders may stop early; a missing file keeps its
        # place (named, so the row is bad), never silently a row with fewer references.
        present = [k for k, table in enumerate(controls) if stem in table]
        count = max(present, default=0) + 1 if controls else 0
        row_controls = [controls[k].get(stem, control_dirs[k] / f"{stem}.png") for k in range(count)]
        caption = target_dir / f"{stem}.txt"
        expected = target_dir / f"{stem}.png"  # what to name when the target is missing
        row = _files_row(
            index, stem, targets.get(stem), row_controls, masks.get(stem), caption, expected_target=expected
        )
        rows.append(row)
    return rows


def _jsonl_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line."""
    records = []
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{line_no}: invalid JSON: {error}") from error
            if not isinstance(record, dict):
                raise UserError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            records.append((line_no, record))
    return records


def _csv_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(first line number, row) of each CSV row; empty cells read as None.

    Malformed lines are errors naming file:line, never re-read as something else: a row with more or fewer cells
    than the header, a duplicate or empty header name, an unclosed quote (csv strict mode), or a path cell that
    spans lines (an unclosed quote swallowing the next rows).
    """
    records = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise UserError(f"{path}:1: empty CSV file, expected a header line")
            header = [name.strip() for name in header]
            if "" in header or len(set(header)) != len(header):
                raise UserError(f"{path}:1: header names must be unique and non-empty, got {header}")
            start = reader.line_num + 1
            for cells in reader:
                where = f"{path}:{start}"
                if not any(cell.strip() for cell in cells):
                    start = reader.line_num + 1
                    continue
                if len(cells) != len(header):
                    raise UserError(f"{where}: {len(cells)} cells, the header has {len(header)} ({header})")
                records.append((start, {k: (v if v != "" else None) for k, v in zip(header, cells, strict=True)}))
                start = reader.line_num + 1
        except csv.Error as error:
            raise UserError(f"{path}:{reader.line_num}: malformed CSV: {error}") from error
    return records


def _check_columns(where: str, present: Iterable[str], required: dict[str, str], mask_column: str | None) -> None:
    """Raise ValueError naming the flag when a required column is absent (e.g. a caption column called "text")."""
    present = set(present)
    if mask_column is not None:
        required = {**required, "mask_column": mask_column}
    for flag, name in required.items():
        if name not in present:
            raise UserError(f"{where}: no column {name!r} (--{flag}); columns: {sorted(present)}")


def _manifest_controls(value: Any, where: str) -> list[str]:
    """Control paths of a manifest cell: a path, a list, a JSON list string or "a;b"; None or empty means none."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if "\n" in text:
            raise UserError(f"{where}: control {text!r} spans lines (an unclosed quote?)")
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise UserError(f"{where}: control {text!r} is not a valid JSON list") from error
        else:
            return [p.strip() for p in text.split(";") if p.strip()]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise UserError(f"{where}: control must be a path or a list of paths, got {value!r}")
    return [p for p in value if p.strip()]


def _resolve(base: Path, path: str) -> str:
    """A manifest path: absolute as given, relative against the manifest's folder."""
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else base / p)


def _manifest_path(record: dict[str, Any], key: str, base: Path, where: str) -> str | None:
    """Resolved path in record[key], or None when absent or empty."""
    value = record.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or "\n" in value:
        raise UserError(f"{where}: {key!r} must be a path, got {value!r}")
    return _resolve(base, value)


def _caption_text(value: Any, where: str = "") -> str | None:
    """Stripped caption, or None when missing or blank (an edit pair needs its instruction); not text is an error."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(f"{where}: the caption must be text, got {value!r}")
    return value.strip() or None


def _read_manifest(
    path: Path,
    records: list[tuple[int, dict[str, Any]]],
    image_column: str,
    control_column: str,
    caption_column: str,
    mask_column: str | None,
) -> list[EditRow]:
    """Rows of a JSONL/CSV manifest in file order; sample ids are "name:line"."""
    keys = {k for _, record in records for k in record}
    _check_columns(str(path), keys, {"image_column": image_column, "caption_column": caption_column}, mask_column)
    mask_key = mask_column or "mask"
    rows = []
    for index, (line_no, record) in enumerate(records):
        where = f"{path}:{line_no}"
        target = _manifest_path(record, image_column, path.parent, where)
        controls = [_resolve(path.parent, p) for p in _manifest_controls(record.get(control_column), where)]
        mask = _manifest_path(record, mask_key, path.parent, where)
        sources = {"image": target or f"{where} ({image_column})"}
        sources.update({f"control_{k}": p for k, p in enumerate(controls)})
        if mask is not None:
            sources["mask"] = mask
        sources["caption"] = f"{where} ({caption_column})"
        rows.append(
            EditRow(
                index=index,
                sample_id=f"{path.name}:{line_no}",
                target=target,
                controls=tuple(controls),
                prompt=_caption_text(record.get(caption_column), where),
                mask=mask,
                sources=sources,
            )
        )
    if not rows:
        raise UserError(f"dataset {str(path)!r}: no rows")
    return rows


def _hf_image(
    value: Any, table: datasets.Dataset, origin: str, base: Path, index: int, column: str, item: int | None
) -> ImageSource | None:
    """ImageSource of one HF cell (Image-feature struct or path string), or None when empty."""
    if value is None:
        return None
    if isinstance(value, str):
        return _resolve(base, value)
    if isinstance(value, dict) and value.keys() >= {"bytes", "path"}:
        if value["bytes"] is not None:
            return DatasetImage(table, origin, index, column, item)
        return _resolve(base, value["path"]) if value["path"] else None
    raise UserError(f"dataset {origin!r}: column {column!r} holds {type(value).__name__}; expected images or paths")


def _hf_where(source: ImageSource | None, sample_id: str, column: str, item: int | None = None) -> str:
    """sources entry of a HF cell: its path, else "dataset[i].column" (with "[k]" inside a list)."""
    if isinstance(source, str):
        return source
    return f"{sample_id}.{column}" + ("" if item is None else f"[{item}]")


def _single_split(loaded: datasets.Dataset | datasets.DatasetDict, origin: str) -> datasets.Dataset:
    """The dataset itself, or the "train" (else only) split of a DatasetDict."""
    if not hasattr(loaded, "keys"):
        return loaded
    if "train" in loaded:
        return loaded["train"]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise UserError(f"dataset {origin!r} has splits {sorted(loaded)}; none is 'train', so which to use is unclear")


def _read_hf(
    loaded: datasets.Dataset | datasets.DatasetDict,
    origin: str,
    base: Path,
    image_column: str,
    control_column: str,
    caption_column: str,
    mask_column: str | None,
) -> list[EditRow]:
    """Rows of a HF dataset in its order; images stay in the (memory-mapped) dataset until prepared."""
    ds = _single_split(loaded, origin)
    _check_columns(
        origin, ds.column_names, {"image_column": image_column, "caption_column": caption_column}, mask_column
    )
    mask_key = mask_column or ("mask" if "mask" in ds.column_names else None)
    used = [c for c in (image_column, control_column, caption_column, mask_key) if c in ds.column_names]
    table = ds.with_format("arrow")  # raw cells: no decoding while listing
    rows = []
    for start in range(0, len(ds), _HF_BATCH_ROWS):
        batch = table[start : start + _HF_BATCH_ROWS]
        cells = {c: batch.column(c).to_pylist() for c in used}
        for j in range(batch.num_rows):
            i = start + j
            sid = f"dataset[{i}]"
            target = _hf_image(cells[image_column][j], table, origin, base, i, image_column, None)
            sources = {"image": _hf_where(target, sid, image_column)}
            cell = cells[control_column][j] if control_column in cells else None
            items = list(enumerate(cell)) if isinstance(cell, list) else [(None, cell)]
            controls = []
            for k, value in items:
                source = _hf_image(value, table, origin, base, i, control_column, k)
                if source is not None:
                    sources[f"control_{len(controls)}"] = _hf_where(source, sid, control_column, k)
                    controls.append(source)
            mask = _hf_image(cells[mask_key][j], table, origin, base, i, mask_key, None) if mask_key else None
            if mask is not None:
                sources["mask"] = _hf_where(mask, sid, mask_key)
            sources["caption"] = f"{sid}.{caption_column}"
            rows.append(
                EditRow(
                    index=i,
                    sample_id=sid,
                    target=target,
                    controls=tuple(controls),
                    prompt=_caption_text(cells[caption_column][j], f"{origin}[{i}]"),
                    mask=mask,
                    sources=sources,
                )
            )
    if not rows:
        raise UserError(f"dataset {origin!r}: no rows")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Decoding and hashing


def source_hash(source: ImageSource) -> str:
    """sha256 hex of the encoded file bytes (or of a PIL image's mode, size and pixels), for cache fingerprints."""
    digest = hashlib.sha256()
    if isinstance(source, PIL.Image.Image):
        digest.update(f"{source.mode}:{source.size[0]}x{source.size[1]}:".encode())
        digest.update(source.tobytes())
    elif isinstance(source, DatasetImage):
        digest.update(source.read())
    else:
        with open(source, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _open(source: ImageSource, row: EditRow, what: str) -> PIL.Image.Image:
    """Decoded, EXIF-transposed image (as diffusers.utils.load_image does); BadSampleError if it cannot be read."""
    try:
        if isinstance(source, PIL.Image.Image):
            source.load()
            return ImageOps.exif_transpose(source)
        fp = io.BytesIO(source.read()) if isinstance(source, DatasetImage) else source
        with PIL.Image.open(fp) as image:
            image.load()  # decode now, inside the try: truncated files fail here
            return ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as error:
        raise _bad(row, what, f"cannot read image: {error}") from error


# Transparent pixels of targets and controls are composited over this colour (white, what image editors and most
# pipelines' users assume), so training never sees the colours hidden under them, which PIL's `convert("RGB")`
# (and diffusers' `load_image`) keep by dropping the alpha.
BACKGROUND = (255, 255, 255)
# Modes whose PIL conversion to RGB is right as it is (checked against reference conversions in the tests); images
# with transparency are composited over BACKGROUND first (`load_rgb`).
_PIL_RGB_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "YCbCr", "LAB", "HSV")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image | str:
    """8-bit RGB of an image in any mode PIL opens, or the reason it is refused (a value range we cannot know).

    PIL's own `convert("RGB")` clips 16-bit images to white; they are scaled by 255/65535 instead. 32-bit integer
    images are kept only when their values fit 0..255; float images are refused. CMYK with an embedded ICC profile
    is converted by the profile (PIL's plain formula otherwise).
    """
    mode = image.mode
    if mode in _PIL_RGB_MODES:
        return image.convert("RGB")
    if mode == "La":
        return image.convert("LA").convert("RGB")
    if mode == "CMYK":
        profile = image.info.get("icc_profile")
        if profile:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        return image.convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if mode == "I" and (values.min() < 0 or values.max() > 255):
            return f"32-bit integer image (mode I) with values {values.min()}..{values.max()}: save it as 8 or 16 bit"
        if mode != "I":
            values = (values * 255 + 32767) // 65535  # round(v * 255 / 65535)
        return PIL.Image.fromarray(values.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        return "floating-point image (mode F) has no known value range: save it as 8 or 16 bit"
    return f"image mode {mode!r} is not supported: save it as 8 or 16 bit RGB or grayscale"


def _over_background(image: PIL.Image.Image) -> PIL.Image.Image | None:
    """The image composited over BACKGROUND if it has any transparent pixel (alpha channel or a palette/colour
    key), else None."""
    if not (image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info):
        return None
    rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")  # PIL has no La -> RGBA
    if rgba.getextrema()[3][0] == 255:  # an alpha channel that is opaque everywhere changes nothing
        return None
    return PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")


def load_rgb(source: ImageSource, *, row: EditRow, what: str, composited: list[str] | None = None) -> PIL.Image.Image:
    """RGB, EXIF-transposed image of row.sources[what], transparent pixels over BACKGROUND (then `what` is appended
    to `composited`); raises BadSampleError naming the row and file."""
    image = _open(source, row, what)
    if (flat := _over_background(image)) is not None:
        image = flat
        if composited is not None:
            composited.append(what)
    converted = to_rgb(image)
    if isinstance(converted, str):
        raise _bad(row, what, converted)
    width, height = converted.size
    if min(width, height) < TOKEN_PIXELS:
        raise _bad(row, what, f"image is {width}x{height}, smaller than one {TOKEN_PIXELS}-px latent token")
    return converted


# ---------------------------------------------------------------------------------------------------------------
# Preparation


def token_grid(height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of latent tokens of an image of height x width pixels (16 px per token in all three models)."""
    return height // TOKEN_PIXELS, width // TOKEN_PIXELS


def _vae_input(image: PIL.Image.Image, plan: ResizePlan) -> tuple[torch.Tensor, PIL.Image.Image]:
    """(3, H, W) tensor in [-1, 1] and the resized PIL image, via the pipelines' VaeImageProcessor."""
    width, height = plan.size
    resized = _PROCESSOR.resize(image.crop(plan.crop_box), height, width)
    return _PROCESSOR.preprocess(resized, height, width)[0], resized


def _mask_grid(row: EditRow, target_size: tuple[int, int], plan: ResizePlan) -> torch.Tensor:
    """Share of each target token covered by the mask (white = edit), using the target's crop and size."""
    mask = to_rgb(_open(row.mask, row, "mask"))
    if isinstance(mask, str):
        raise _bad(row, "mask", mask)
    mask = mask.convert("L")
    (tw, th), (mw, mh) = target_size, mask.size
    if abs(mw * th - mh * tw) > max(tw, th, mw, mh):  # proportional up to rounding: a scaled mask is fine
        raise _bad(row, "mask", f"mask is {mw}x{mh} but the image is {tw}x{th} (another aspect ratio)")
    sx, sy = mw / tw, mh / th
    left, top, right, bottom = plan.crop_box
    # The mask follows the target's crop and size; BOX resampling keeps values in [0, 1] (LANCZOS would overshoot).
    resized = mask.convert("F").resize(
        plan.size, PIL.Image.Resampling.BOX, box=(left * sx, top * sy, right * sx, bottom * sy)
    )
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)
    return torch.nn.functional.avg_pool2d(pixels[None], TOKEN_PIXELS)[0]  # mean over each token's 16 x 16 pixels


def _cropped_share(size: tuple[int, int], plan: ResizePlan) -> float:
    """Share of an image's area that its plan's crop box removes."""
    left, top, right, bottom = plan.crop_box
    return 1.0 - (right - left) * (bottom - top) / (size[0] * size[1])


def prepare_sample(row: EditRow, model: EditModel | str, policy: ResolutionPolicy) -> PreparedSample:
    """Decode, crop and resize one row as `model`'s pipeline would at inference; BadSampleError for a bad row.

    A row without control images is valid for every model (the sample then carries only its target); a listed
    control that cannot be read is a bad row, and so are more controls than the model takes.
    """
    model = get_model(model)
    if policy.multiple % TOKEN_PIXELS:
        raise ValueError(f"policy.multiple must be a multiple of {TOKEN_PIXELS} (the latent token size)")
    if row.target is None:
        raise _bad(row, "image", "target image is missing")
    if row.prompt is None:
        raise _bad(row, "caption", "caption is missing or empty")
    if reason := model.too_many_references(len(row.controls)):
        raise _bad(row, f"control_{model.max_references}", reason)

    composited: list[str] = []
    target_image = load_rgb(row.target, row=row, what="image", composited=composited)
    plan = policy.plan(*target_image.size)
    target, _ = _vae_input(target_image, plan)
    crops = {"image": _cropped_share(target_image.size, plan)}

    controls, condition_images = [], []
    for k, source in enumerate(row.controls):
        image = load_rgb(source, row=row, what=f"control_{k}", composited=composited)
        control_plan = policy.control_plan(*image.size)
        crops[f"control_{k}"] = _cropped_share(image.size, control_plan)
        tensor, resized = _vae_input(image, control_plan)
        controls.append(tensor)
        if model.condition_size is not None:
            left, top, right, bottom = control_plan.crop_box
            cw, ch = model.condition_size((right - left, bottom - top), control_plan.size)
            same = (cw, ch) == control_plan.size
            condition_images.append(resized if same else _PROCESSOR.resize(image.crop(control_plan.crop_box), ch, cw))

    mask = _mask_grid(row, target_image.size, plan) if row.mask is not None else None
    return PreparedSample(
        index=row.index,
        sample_id=row.sample_id,
        prompt=row.prompt,
        target=target,
        controls=controls,
        condition_images=condition_images,
        mask=mask,
        sources=dict(row.sources),
        crops={what: share for what, share in crops.items() if share > 0},
        composited=composited,
    )


T = TypeVar("T")


def prepare_all(
    rows: Iterable[EditRow], prepare_fn: Callable[[EditRow], T], *, skip_bad_samples: bool
) -> tuple[list[T], list[tuple[str, str]]]:
    """prepare_fn over rows: (results, [(sample_id, reason)] of skipped rows); without skipping the first error raises.

    Only BadSampleError is skipped: anything else is a bug or a configuration error and must stop the run.
    """
    prepared: list[T] = []
    skipped: list[tuple[str, str]] = []
    for row in rows:
        try:
            prepared.append(prepare_fn(row))
        except BadSampleError as error:
            if not skip_bad_samples:
                raise
            skipped.append((row.sample_id, str(error)))
    return prepared, skipped
