"""Dataset readers, bad-input handling and per-sample preparation against the diffusers pipelines' own rules."""

import csv
import hashlib
import json
import pickle
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

from common.data import (
    BadSampleError,
    DatasetImage,
    EditRow,
    load_rgb,
    prepare_all,
    prepare_sample,
    read_rows,
    source_hash,
    token_grid,
)
from common.errors import UserError
from common.models import get_model

# The processor every pipeline builds: VaeImageProcessor(vae_scale_factor=vae_scale_factor * 2).
PROCESSOR = VaeImageProcessor(vae_scale_factor=16)


def _image(width: int, height: int, seed: int) -> PIL.Image.Image:
    """Random RGB noise, so any resampling or crop difference shows."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def _left_mask(width: int, height: int, edit_width: int) -> PIL.Image.Image:
    """Grayscale mask, white (edit) on the `edit_width` leftmost columns."""
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[:, :edit_width] = 255
    return PIL.Image.fromarray(pixels)


# Three edit pairs with 1, 2 and 0 controls of assorted sizes; only "a" has a mask.
CONTENT = {
    "a": {"prompt": "make it red", "target": _image(96, 64, 1), "controls": [_image(64, 96, 2)]},
    "b": {"prompt": "add a hat", "target": _image(64, 64, 3), "controls": [_image(80, 48, 4), _image(48, 80, 5)]},
    "c": {"prompt": "remove the sky", "target": _image(128, 48, 6), "controls": []},
}
CONTENT["a"]["mask"] = _left_mask(96, 64, 48)


def _write_folder(root: Path) -> Path:
    """stem.png + stem.txt + stem_control.png / stem_control_k.png + stem_mask.png."""
    root.mkdir()
    for stem, item in CONTENT.items():
        item["target"].save(root / f"{stem}.png")
        (root / f"{stem}.txt").write_text(item["prompt"] + "\n")
        if len(item["controls"]) == 1:
            item["controls"][0].save(root / f"{stem}_control.png")
        else:
            for k, control in enumerate(item["controls"]):
                control.save(root / f"{stem}_control_{k}.png")
        if "mask" in item:
            item["mask"].save(root / f"{stem}_mask.png")
    return root


def _write_parallel(root: Path) -> Path:
    """images/ + control_0/, control_1/ + masks/, same file names; captions next to the targets."""
    for sub in ("images", "control_0", "control_1", "masks"):
        (root / sub).mkdir(parents=True)
    for stem, item in CONTENT.items():
        item["target"].save(root / "images" / f"{stem}.png")
        (root / "images" / f"{stem}.txt").write_text(item["prompt"])
        for k, control in enumerate(item["controls"]):
            control.save(root / f"control_{k}" / f"{stem}.png")
        if "mask" in item:
            item["mask"].save(root / "masks" / f"{stem}.png")
    return root


def _write_pngs(root: Path) -> dict[str, dict[str, object]]:
    """PNG files of CONTENT under root/files, relative names per stem for manifests."""
    (root / "files").mkdir(parents=True)
    names: dict[str, dict[str, object]] = {}
    for stem, item in CONTENT.items():
        item["target"].save(root / "files" / f"{stem}.png")
        controls = []
        for k, control in enumerate(item["controls"]):
            control.save(root / "files" / f"{stem}_c{k}.png")
            controls.append(f"files/{stem}_c{k}.png")
        names[stem] = {"image": f"files/{stem}.png", "control": controls, "prompt": item["prompt"]}
        if "mask" in item:
            item["mask"].save(root / "files" / f"{stem}_m.png")
            names[stem]["mask"] = f"files/{stem}_m.png"
    return names


def _write_jsonl(root: Path) -> Path:
    """JSONL manifest: control as a string (1), a list (2) and absent (0); paths relative to the manifest."""
    names = _write_pngs(root)
    names["a"]["control"] = names["a"]["control"][0]
    del names["c"]["control"]
    path = root / "m.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in names.values()) + "\n")
    return path


def _write_csv(root: Path) -> Path:
    """CSV manifest: control as a path, a JSON list string and an empty cell."""
    names = _write_pngs(root)
    with (root / "m.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "control", "prompt", "mask"])
        writer.writeheader()
        for record in names.values():
            controls = record["control"]
            cell = controls[0] if len(controls) == 1 else json.dumps(controls) if controls else ""
            writer.writerow({**record, "control": cell, "mask": record.get("mask", "")})
    return root / "m.csv"


def _write_hf(root: Path) -> Path:
    """save_to_disk dataset with Image / List(Image) columns holding the images' bytes."""
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "control": datasets.List(datasets.Image()),
            "prompt": datasets.Value("string"),
            "mask": datasets.Image(),
        }
    )
    items = list(CONTENT.values())
    data = {
        "image": [item["target"] for item in items],
        "control": [item["controls"] for item in items],
        "prompt": [item["prompt"] for item in items],
        "mask": [item.get("mask") for item in items],
    }
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(root / "hf"))
    return root / "hf"


LAYOUTS = {
    "folder": (_write_folder, ["a", "b", "c"]),
    "parallel": (_write_parallel, ["a", "b", "c"]),
    "jsonl": (_write_jsonl, ["m.jsonl:1", "m.jsonl:2", "m.jsonl:3"]),
    "csv": (_write_csv, ["m.csv:2", "m.csv:3", "m.csv:4"]),
    "hf": (_write_hf, ["dataset[0]", "dataset[1]", "dataset[2]"]),
}


def _pixels(source, row: EditRow, what: str) -> bytes:
    """Decoded RGB pixels of a source, to compare rows across layouts."""
    return load_rgb(source, row=row, what=what).tobytes()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_reads_the_same_rows(tmp_path, layout):
    write, sample_ids = LAYOUTS[layout]
    path = write(tmp_path / "data")
    rows = read_rows(path)
    assert [row.sample_id for row in rows] == sample_ids
    assert [row.index for row in rows] == [0, 1, 2]
    for row, item in zip(rows, CONTENT.values(), strict=True):
        assert row.prompt == item["prompt"]
        assert _pixels(row.target, row, "image") == item["target"].tobytes()
        if layout == "parallel" and not item["controls"]:
            # control_0/ lists a control for every target: a missing one is a bad row naming the file, not a row
            # without reference.
            missing = str(path / "control_0" / f"{row.sample_id}.png")
            assert row.controls == (missing,)
            with pytest.raises(BadSampleError, match=f"No such file.*control_0: {missing}"):
                load_rgb(row.controls[0], row=row, what="control_0")
            continue
        controls = [_pixels(c, row, f"control_{k}") for k, c in enumerate(row.controls)]
        assert controls == [c.tobytes() for c in item["controls"]]
        if "mask" in item:
            assert _pixels(row.mask, row, "mask") == item["mask"].convert("RGB").tobytes()
        else:
            assert row.mask is None
        keys = {"image", "caption"} | {f"control_{k}" for k in range(len(item["controls"]))}
        assert set(row.sources) == keys | ({"mask"} if "mask" in item else set())
    assert read_rows(path) == rows  # deterministic


def test_folder_order_is_sorted_and_sources_name_files(tmp_path):
    for stem in ("b2", "c0", "a1"):  # written out of order
        _image(32, 32, 0).save(tmp_path / f"{stem}.jpg")
        (tmp_path / f"{stem}.txt").write_text(f"caption {stem}")
    _image(32, 32, 1).save(tmp_path / "a1_control_1.png")
    _image(32, 32, 2).save(tmp_path / "a1_control_0.png")
    (tmp_path / "._a1.png").write_bytes(b"macOS resource fork")  # hidden: ignored
    rows = read_rows(tmp_path)
    assert [(r.index, r.sample_id) for r in rows] == [(0, "a1"), (1, "b2"), (2, "c0")]
    assert rows[0].controls == (str(tmp_path / "a1_control_0.png"), str(tmp_path / "a1_control_1.png"))
    assert rows[0].sources["image"] == str(tmp_path / "a1.jpg")
    assert rows[0].sources["caption"] == str(tmp_path / "a1.txt")
    assert rows[1].prompt == "caption b2"


def test_manifest_control_cells(tmp_path):
    lines = [
        {"image": "t.png", "control": "x.png;y.png", "prompt": "p"},
        {"image": "t.png", "control": '["x.png", "y.png"]', "prompt": "p"},
        {"image": "t.png", "control": ["/abs/x.png"], "prompt": "p"},
        {"image": "t.png", "control": None, "prompt": "p"},
        {"image": "t.png", "control": "", "prompt": "p"},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    rows = read_rows(path)
    pair = (str(tmp_path / "x.png"), str(tmp_path / "y.png"))
    assert [r.controls for r in rows] == [pair, pair, ("/abs/x.png",), (), ()]
    assert rows[0].target == str(tmp_path / "t.png")


def test_hf_dataset_with_path_columns_and_custom_names(tmp_path):
    _image(40, 30, 7).save(tmp_path / "t.png")
    _image(30, 40, 8).save(tmp_path / "c.png")
    data = {"target": ["t.png"], "refs": ["c.png"], "text": ["do it"]}
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "hf"))
    (row,) = read_rows(tmp_path / "hf", image_column="target", control_column="refs", caption_column="text")
    assert (row.target, row.controls, row.prompt) == (
        str(tmp_path / "hf" / "t.png"),
        (str(tmp_path / "hf" / "c.png"),),
        "do it",
    )
    with pytest.raises(ValueError, match="--caption_column"):
        read_rows(tmp_path / "hf", image_column="target")


def test_read_rows_rejects_ambiguous_or_unknown_inputs(tmp_path):
    _image(16, 16, 0).save(tmp_path / "x.png")
    _image(16, 16, 0).save(tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="two files for the same image"):
        read_rows(tmp_path)
    (tmp_path / "m.txt").write_text("")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_rows(tmp_path / "m.txt")
    with pytest.raises(ValueError, match="no such file or folder"):
        read_rows(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="loading it from the hub failed"):
        read_rows("nobody/no-such-dataset-xyz")


def test_source_hash(tmp_path):
    path = tmp_path / "a.png"
    CONTENT["a"]["target"].save(path)
    file_hash = hashlib.sha256(path.read_bytes()).hexdigest()
    assert source_hash(str(path)) == file_hash
    features = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string")})
    data = {"image": [{"bytes": path.read_bytes(), "path": None}], "prompt": ["p"]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "hf"))
    (row,) = read_rows(tmp_path / "hf")
    assert isinstance(row.target, DatasetImage)
    assert source_hash(row.target) == file_hash  # same bytes, same fingerprint wherever they are stored
    image = CONTENT["a"]["target"]
    assert source_hash(image) == source_hash(image.copy())
    assert source_hash(image) != source_hash(image.convert("RGBA"))
    assert source_hash(image) != source_hash(CONTENT["b"]["target"])
    data = bytes(range(8))  # same pixel bytes, other size or mode: other image
    hashes = {
        source_hash(PIL.Image.frombytes(mode, size, data))
        for mode, size in [("L", (4, 2)), ("L", (2, 4)), ("P", (4, 2))]
    }
    assert len(hashes) == 3


def test_load_rgb_applies_exif_orientation(tmp_path):
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    _image(40, 20, 0).convert("RGBA").convert("RGB").save(tmp_path / "r.jpg", exif=exif.tobytes())
    row = EditRow(0, "r", str(tmp_path / "r.jpg"), (), "p", None, {"image": str(tmp_path / "r.jpg")})
    image = load_rgb(row.target, row=row, what="image")
    assert (image.mode, image.size) == ("RGB", (20, 40))


# --- preparation -------------------------------------------------------------------------------------------------


def _row(target: PIL.Image.Image, controls=(), mask=None, prompt="edit") -> EditRow:
    """An in-memory row."""
    sources = {"image": "t", **{f"control_{k}": f"c{k}" for k in range(len(controls))}, "caption": "p"}
    return EditRow(0, "mem", target, tuple(controls), prompt, mask, sources)


def _check_vae_input(tensor: torch.Tensor, image: PIL.Image.Image, width: int, height: int) -> None:
    """tensor is what the pipeline's image_processor.preprocess makes of image at width x height."""
    assert tensor.dtype == torch.float32 and tensor.shape == (3, height, width)
    assert -1.0 <= tensor.min() and tensor.max() <= 1.0
    torch.testing.assert_close(tensor, PROCESSOR.preprocess(image, height, width)[0], rtol=0, atol=0)


def test_prepare_flux_kontext_sizes_each_image_by_its_own_ratio():
    policy = get_model("flux_kontext").policy(target_area=256 * 256)
    target, control = _image(300, 200, 1), _image(120, 200, 2)
    sample = prepare_sample(_row(target, [control]), "flux_kontext", policy)
    # FluxKontextPipeline: round(sqrt(area * ratio)) // 16 * 16 per side.
    assert sample.target.shape[1:] == (208, 304)
    _check_vae_input(sample.target, target, 304, 208)
    _check_vae_input(sample.controls[0], control, 192, 320)
    assert sample.condition_images == [] and sample.mask is None
    assert (sample.prompt, sample.sample_id, sample.index) == ("edit", "mem", 0)


def test_prepare_qwen_edit_matches_pipeline():
    policy = get_model("qwen_edit").policy(target_area=1024 * 1024)
    target, control = _image(64, 48, 1), _image(200, 150, 2)
    sample = prepare_sample(_row(target, [control]), "qwen_edit", policy)
    width, height, _ = pipeline_qwenimage_edit.calculate_dimensions(1024 * 1024, 200 / 150)
    _check_vae_input(sample.controls[0], control, width, height)
    # The pipeline feeds the VL encoder the same resized image it preprocesses for the VAE.
    (condition,) = sample.condition_images
    assert condition.size == (width, height)
    assert condition.tobytes() == PROCESSOR.resize(control, height, width).tobytes()


def test_prepare_qwen_edit_plus_matches_pipeline():
    policy = get_model("qwen_edit_plus").policy(target_area=pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE)
    controls = [_image(200, 120, 2), _image(90, 160, 3)]
    sample = prepare_sample(_row(_image(64, 64, 1), controls), "qwen_edit_plus", policy)
    assert len(sample.controls) == len(sample.condition_images) == 2
    for image, tensor, condition in zip(controls, sample.controls, sample.condition_images, strict=True):
        ratio = image.width / image.height
        vae_w, vae_h = pipeline_qwenimage_edit_plus.calculate_dimensions(
            pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE, ratio
        )
        cond_w, cond_h = pipeline_qwenimage_edit_plus.calculate_dimensions(
            pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE, ratio
        )
        _check_vae_input(tensor, image, vae_w, vae_h)
        assert condition.size == (cond_w, cond_h)
        assert condition.tobytes() == PROCESSOR.resize(image, cond_h, cond_w).tobytes()


def test_prepare_crops_over_long_images_before_resizing():
    policy = get_model("qwen_edit").policy(target_area=384 * 128, max_aspect_ratio=3.0)
    target = _image(400, 100, 1)
    sample = prepare_sample(_row(target, mask=_left_mask(400, 100, 125)), "qwen_edit", policy)
    _check_vae_input(sample.target, target.crop((50, 0, 350, 100)), 384, 128)
    # The mask is cropped with the target: 75 of the crop's 300 columns are edited, i.e. 6 of 24 token columns.
    expected = torch.zeros(8, 24)
    expected[:, :6] = 1
    torch.testing.assert_close(sample.mask, expected)


def test_token_grid():
    assert token_grid(128, 256) == (8, 16)
    assert token_grid(1024, 768) == (64, 48)


@pytest.mark.parametrize("mask_scale", [1, 0.5])
def test_mask_is_the_edit_share_of_each_token(mask_scale):
    policy = get_model("flux_kontext").policy(target_area=256 * 128)
    mask = _left_mask(256, 128, 128).resize((int(256 * mask_scale), int(128 * mask_scale)), PIL.Image.NEAREST)
    sample = prepare_sample(_row(_image(256, 128, 1), mask=mask), "flux_kontext", policy)
    assert sample.mask.shape == token_grid(*sample.target.shape[1:]) == (8, 16)
    assert sample.mask.dtype == torch.float32
    assert torch.all(sample.mask[:, :8] == 1) and torch.all(sample.mask[:, 8:] == 0)


def test_mask_equals_area_average_of_resized_mask():
    policy = get_model("flux_kontext").policy(target_area=200 * 120)
    rng = np.random.default_rng(0)
    blocks = PIL.Image.fromarray(rng.integers(0, 256, (3, 5), dtype=np.uint8))
    mask = blocks.resize((125, 75), PIL.Image.NEAREST)  # random soft regions, half the target's resolution
    sample = prepare_sample(_row(_image(250, 150, 1), mask=mask), "flux_kontext", policy)
    height, width = sample.target.shape[1:]
    resized = np.asarray(mask.convert("F").resize((width, height), PIL.Image.BOX), dtype=np.float32) / 255
    expected = torch.nn.functional.avg_pool2d(torch.from_numpy(resized)[None], 16)[0]
    torch.testing.assert_close(sample.mask, expected, atol=1e-4, rtol=0)
    assert 0 <= sample.mask.min() and sample.mask.max() <= 1 and 0.05 < sample.mask.std()


def test_prepare_rejects_unknown_model_and_mismatched_mask():
    policy = get_model("flux_kontext").policy(target_area=64 * 64)
    with pytest.raises(ValueError, match="unknown model 'sdxl'"):
        prepare_sample(_row(_image(64, 64, 1)), "sdxl", policy)
    row = _row(_image(64, 64, 1), mask=_left_mask(64, 32, 16))
    with pytest.raises(BadSampleError, match="another aspect ratio"):
        prepare_sample(row, "flux_kontext", policy)
    # Both single-reference pipelines refuse a second reference before anything is decoded or cached.
    two = _row(_image(64, 64, 1), [_image(32, 32, 2)] * 2)
    with pytest.raises(BadSampleError, match="Qwen-Image-Edit takes one control image, got 2"):
        prepare_sample(two, "qwen_edit", policy)
    with pytest.raises(BadSampleError, match=r"FLUX.1 Kontext takes one control image, got 2 \(control_1"):
        prepare_sample(two, "flux_kontext", policy)
    assert len(prepare_sample(two, "qwen_edit_plus", policy).controls) == 2


# --- bad input ---------------------------------------------------------------------------------------------------


def _bad_folder(root: Path) -> Path:
    """Two good pairs and one pair per kind of bad input, in the single-folder layout."""
    root.mkdir()
    good = _image(48, 32, 0)
    for stem in ("good1", "good2", "corrupt", "control_corrupt", "truncated", "no_caption", "no_control"):
        good.save(root / f"{stem}.png")
        if stem != "no_caption":
            (root / f"{stem}.txt").write_text("do it")
        if stem != "no_control":
            good.save(root / f"{stem}_control.png")
    (root / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(500))
    (root / "control_corrupt_control.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    data = (root / "truncated.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    good.save(root / "orphan_control.png")  # control without its target
    return root


BAD = {
    "control_corrupt": "control_corrupt_control.png",
    "corrupt": "corrupt.png",
    "no_caption": "no_caption.txt",
    "orphan_control": "orphan_control.txt",  # no "orphan.png": a target of its own, without caption
    "truncated": "truncated.png",
}


def test_every_bad_row_names_its_id_and_file(tmp_path):
    root = _bad_folder(tmp_path / "d")
    policy = get_model("qwen_edit_plus").policy(target_area=64 * 64)
    rows = {row.sample_id: row for row in read_rows(root)}
    for sample_id, file in BAD.items():
        with pytest.raises(BadSampleError) as info:
            prepare_sample(rows[sample_id], "qwen_edit_plus", policy)
        assert repr(sample_id) in str(info.value) and str(root / file) in str(info.value)
        assert (info.value.sample_id, info.value.path) == (sample_id, str(root / file))
    # A row without control is a valid sample for every model: it carries only its target.
    for model in ("flux_kontext", "qwen_edit", "qwen_edit_plus"):
        sample = prepare_sample(rows["no_control"], model, get_model(model).policy(target_area=64 * 64))
        assert (sample.controls, sample.condition_images, sample.target.shape[0]) == ([], [], 3)


def test_missing_file_in_manifest(tmp_path):
    _image(32, 32, 0).save(tmp_path / "t.png")
    lines = [{"image": "t.png", "prompt": "p"}, {"image": "t.png", "control": ["gone.png"], "prompt": "p"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    rows = read_rows(tmp_path / "m.jsonl")
    policy = get_model("flux_kontext").policy(target_area=32 * 32)
    with pytest.raises(BadSampleError, match="No such file") as info:
        prepare_sample(rows[1], "flux_kontext", policy)
    assert "'m.jsonl:2'" in str(info.value) and str(tmp_path / "gone.png") in str(info.value)


def test_corrupt_image_in_hf_dataset(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string")})
    good = _image(32, 32, 0)
    data = {"image": [good, {"bytes": b"not an image", "path": None}], "prompt": ["p", "p"]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "hf"))
    rows = read_rows(tmp_path / "hf")
    policy = get_model("qwen_edit").policy(target_area=32 * 32)
    assert prepare_sample(rows[0], "qwen_edit", policy).target.shape == (3, 32, 32)
    with pytest.raises(BadSampleError, match=r"'dataset\[1\]'.*dataset\[1\]\.image"):
        prepare_sample(rows[1], "qwen_edit", policy)


def test_prepare_all_skips_and_reports_bad_rows(tmp_path):
    rows = read_rows(_bad_folder(tmp_path / "d"))
    policy = get_model("qwen_edit_plus").policy(target_area=64 * 64)

    def prepare(row: EditRow):
        return prepare_sample(row, "qwen_edit_plus", policy)

    prepared, skipped = prepare_all(rows, prepare, skip_bad_samples=True)
    assert [s.sample_id for s in prepared] == ["good1", "good2", "no_control"]
    assert [sample_id for sample_id, _ in skipped] == sorted(BAD)
    assert all(str(tmp_path / "d" / BAD[sample_id]) in reason for sample_id, reason in skipped)
    with pytest.raises(BadSampleError, match="'control_corrupt'") as info:  # the first bad row in order
        prepare_all(rows, prepare, skip_bad_samples=False)
    # DataLoader workers pickle exceptions: the row id and file must survive.
    copy = pickle.loads(pickle.dumps(info.value))
    assert (type(copy), copy.sample_id, copy.path) == (BadSampleError, "control_corrupt", info.value.path)


def test_parallel_control_without_target_is_a_bad_row(tmp_path):
    for sub in ("target", "control"):
        (tmp_path / sub).mkdir()
    _image(32, 32, 0).save(tmp_path / "target" / "a.png")
    (tmp_path / "target" / "a.txt").write_text("p")
    _image(32, 32, 1).save(tmp_path / "control" / "a.jpg")  # matched by stem
    _image(32, 32, 2).save(tmp_path / "control" / "b.png")
    rows = read_rows(tmp_path)
    assert [(r.sample_id, r.controls) for r in rows] == [
        ("a", (str(tmp_path / "control" / "a.jpg"),)),
        ("b", (str(tmp_path / "control" / "b.png"),)),
    ]
    policy = get_model("flux_kontext").policy(target_area=32 * 32)
    with pytest.raises(BadSampleError, match="target image is missing") as info:
        prepare_sample(rows[1], "flux_kontext", policy)
    assert info.value.path == str(tmp_path / "target" / "b.png")


def test_manifest_rejects_non_path_cells(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": 3, "prompt": "p"}))
    with pytest.raises(ValueError, match="m.jsonl:1: 'image' must be a path"):
        read_rows(tmp_path / "m.jsonl")


# --- image modes, folder gaps, malformed manifests, crops (issue 11) ---------------------------------------------


def _saved(image: PIL.Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def _mode_cases(tmp_path: Path) -> dict[str, tuple[PIL.Image.Image | Path, np.ndarray, int]]:
    """{mode: (image in that mode or a file that opens in it, reference RGB uint8 array, tolerance)}."""
    from PIL import ImageCms

    rgb = _image(24, 16, 11)
    ref = np.asarray(rgb)
    gray = np.asarray(rgb.convert("L"))
    gray3 = np.repeat(gray[..., None], 3, axis=2)
    wide = np.clip(gray.astype(np.int64) * 257 - 60, 0, 65535)  # 16-bit values; reference: round(v * 255 / 65535)
    wide_ref = np.repeat(np.round(wide * 255 / 65535).astype(np.uint8)[..., None], 3, axis=2)
    wide = wide.astype(np.uint16)
    bits = gray > 127
    lab = ImageCms.applyTransform(
        rgb, ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    )
    palette = rgb.quantize(64)
    return {
        "1": (PIL.Image.fromarray(bits), np.repeat((bits * 255).astype(np.uint8)[..., None], 3, axis=2), 0),
        "L": (_saved(rgb.convert("L"), tmp_path / "l.png"), gray3, 0),
        "LA": (_saved(rgb.convert("LA"), tmp_path / "la.png"), gray3, 0),
        "La": (rgb.convert("LA"), gray3, 0),  # premultiplied below
        "P": (_saved(palette, tmp_path / "p.png"), np.asarray(palette.convert("RGB")), 0),
        "PA": (palette.convert("PA"), np.asarray(palette.convert("RGB")), 0),
        "RGB": (_saved(rgb, tmp_path / "rgb.png"), ref, 0),
        "RGBA": (_saved(rgb.convert("RGBA"), tmp_path / "rgba.png"), ref, 0),
        "RGBa": (rgb.convert("RGBa"), ref, 0),
        "RGBX": (rgb.convert("RGBX"), ref, 0),
        "CMYK": (_saved(rgb.convert("CMYK"), tmp_path / "cmyk.tif"), ref, 0),
        "YCbCr": (rgb.convert("YCbCr"), ref, 6),
        "LAB": (lab, ref, 30),  # 8-bit Lab quantisation; PIL's and littleCMS's round trips agree to this bound
        "HSV": (rgb.convert("HSV"), ref, 6),
        "I": (_saved(rgb.convert("L").convert("I"), tmp_path / "i.tif"), gray3, 0),
        "I;16": (_saved(PIL.Image.fromarray(wide), tmp_path / "i16.png"), wide_ref, 0),
        "I;16B": (PIL.Image.frombytes("I;16B", rgb.size, wide.astype(">u2").tobytes()), wide_ref, 0),
    }


def test_every_image_mode_converts_like_its_reference_or_is_refused_by_name(tmp_path):
    cases = _mode_cases(tmp_path)
    cases["La"] = (cases["La"][0].convert("La"), cases["La"][1], 0)
    for mode, (source, reference, tolerance) in cases.items():
        if isinstance(source, Path):
            with PIL.Image.open(source) as opened:
                assert opened.mode == mode, (mode, opened.mode)
        else:
            assert source.mode == mode
        row = EditRow(0, mode, str(source) if isinstance(source, Path) else source, (), "p", None, {"image": mode})
        got = np.asarray(load_rgb(row.target, row=row, what="image")).astype(int)
        assert got.shape == reference.shape, mode
        assert np.abs(got - reference).max() <= tolerance, (mode, np.abs(got - reference).max())
    # PIL's own conversion turns a 16-bit image white: the case above would catch it.
    assert np.asarray(PIL.Image.open(tmp_path / "i16.png").convert("RGB")).min() == 255
    # Value ranges we cannot know are refused by name.
    floats = _saved(
        PIL.Image.fromarray(np.random.default_rng(0).random((16, 16), dtype=np.float32)), tmp_path / "f.tif"
    )
    big = _saved(PIL.Image.fromarray(np.full((16, 16), 70000, dtype=np.int32)), tmp_path / "i32.tif")
    for path, message in ((floats, r"floating-point image \(mode F\)"), (big, r"mode I\) with values 70000")):
        row = EditRow(0, "x", str(path), (), "p", None, {"image": str(path)})
        with pytest.raises(BadSampleError, match=f"{message}.*image: {path}"):
            load_rgb(row.target, row=row, what="image")
    tiny = EditRow(0, "t", _image(8, 40, 0), (), "p", None, {"image": "t.png"})
    with pytest.raises(BadSampleError, match="8x40, smaller than one 16-px latent token"):
        load_rgb(tiny.target, row=tiny, what="image")


def test_a_missing_control_in_a_folder_is_a_bad_row_not_a_row_without_reference(tmp_path):
    for stem in ("a", "b"):
        _image(32, 32, 0).save(tmp_path / f"{stem}.png")
        (tmp_path / f"{stem}.txt").write_text("edit")
    _image(32, 32, 1).save(tmp_path / "a_control_1.png")  # a_control_0 is missing: a gap
    rows = read_rows(tmp_path)
    assert rows[0].controls == (str(tmp_path / "a_control_0.png"), str(tmp_path / "a_control_1.png"))
    assert rows[1].controls == ()  # no control at all: a row without reference (counted in the summary)
    policy = get_model("qwen_edit_plus").policy(target_area=32 * 32)
    with pytest.raises(BadSampleError, match=r"bad sample 'a'.*control_0: .*a_control_0\.png"):
        prepare_sample(rows[0], "qwen_edit_plus", policy)
    _image(32, 32, 1).save(tmp_path / "b_control.png")
    _image(32, 32, 1).save(tmp_path / "b_control_0.png")
    with pytest.raises(ValueError, match="two files for the same image"):
        read_rows(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("image,prompt\nt.png,edit,extra\n", r"m.csv:2: 3 cells, the header has 2"),
        ("image,prompt\nt.png\n", r"m.csv:2: 1 cells, the header has 2"),
        ('image,prompt\nt.png,"edit\nu.png,other\n', r"m.csv:\d+: malformed CSV|m.csv:2: 2 cells"),
        ('image,control,prompt\nt.png,"c.png\nu.png",edit\n', r"m.csv:2: control .* spans lines"),
        ("image,image,prompt\nt.png,u.png,edit\n", r"m.csv:1: header names must be unique"),
        ("", r"m.csv:1: empty CSV file"),
    ],
)
def test_malformed_csv_lines_are_errors_with_file_and_line(tmp_path, text, message):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(UserError, match=message):
        read_rows(tmp_path / "m.csv")


def test_malformed_jsonl_lines_are_errors_with_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    for line, message in [
        ('{"image": "t.png", "prompt": ["a", "b"]}', r"m.jsonl:2: the caption must be text"),
        ('{"image": "t.png", "prompt": 3}', r"m.jsonl:2: the caption must be text"),
        ('{"image": ["t.png"], "prompt": "p"}', r"m.jsonl:2: 'image' must be a path"),
        ('{"image": "t.png", "prompt": "p"', r"m.jsonl:2: invalid JSON"),
        ('["t.png", "p"]', r"m.jsonl:2: expected a JSON object"),
    ]:
        path.write_text('{"image": "t.png", "prompt": "ok"}\n' + line + "\n")
        with pytest.raises(UserError, match=message):
            read_rows(path)


def test_crops_are_measured_per_image():
    policy = get_model("flux_kontext").policy(target_area=64 * 64, max_aspect_ratio=2.0)
    sample = prepare_sample(_row(_image(200, 40, 0), [_image(64, 64, 1)]), "flux_kontext", policy)
    assert sample.crops == {"image": pytest.approx(1 - 80 / 200)}  # 5:1 cut to 2:1 keeps 80 of 200 columns
    assert sample.cropped == pytest.approx(0.6)
    assert prepare_sample(_row(_image(64, 48, 0)), "flux_kontext", policy).cropped == 0.0


def test_transparent_pixels_are_composited_over_white_and_the_rows_named(tmp_path, caplog):
    """RGBA, LA and P-with-transparency images are composited over white (BACKGROUND), not stripped of their alpha
    (which trained the colours hidden under transparent pixels); the user's files are unchanged; opaque RGBA is as
    RGB; the data summary names the rows."""
    from common.data import BACKGROUND
    from common.validate import validate_rows

    rgb = _image(32, 32, 7)
    alpha = np.full((32, 32), 255, dtype=np.uint8)
    alpha[:, :16] = 0  # left half fully transparent
    alpha[:8, 16:] = 128  # a half-transparent band
    rgba = rgb.copy()
    rgba.putalpha(PIL.Image.fromarray(alpha))
    palette = rgb.quantize(16)
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])  # the palette index of the top-left pixel
    cases = {
        "rgba": _saved(rgba, tmp_path / "rgba.png"),
        "la": _saved(rgba.convert("LA"), tmp_path / "la.png"),
        "p": _saved(palette, tmp_path / "p.png", transparency=palette.info["transparency"]),
        "opaque": _saved(rgb.convert("RGBA"), tmp_path / "opaque.png"),
    }
    before = {name: path.read_bytes() for name, path in cases.items()}
    white = np.array(BACKGROUND, dtype=float)
    for name in ("rgba", "la"):
        row = EditRow(0, name, str(cases[name]), (), "p", None, {"image": str(cases[name])})
        got = np.asarray(load_rgb(row.target, row=row, what="image")).astype(float)
        colour = np.asarray(rgb if name == "rgba" else rgb.convert("L").convert("RGB")).astype(float)
        assert BACKGROUND == (255, 255, 255)
        assert np.array_equal(got[:, :16], np.broadcast_to(white, got[:, :16].shape))
        assert np.abs(got[:8, 16:] - (colour[:8, 16:] * 128 + white * 127) / 255).max() <= 1
        assert np.array_equal(got[8:, 16:], colour[8:, 16:])
    row = EditRow(0, "p", str(cases["p"]), (), "p", None, {"image": str(cases["p"])})
    got = np.asarray(load_rgb(row.target, row=row, what="image"))
    keyed = np.asarray(palette) == palette.info["transparency"]
    assert keyed.any() and (got[keyed] == 255).all()
    assert np.array_equal(got[~keyed], np.asarray(palette.convert("RGB"))[~keyed])
    row = EditRow(0, "o", str(cases["opaque"]), (), "p", None, {"image": str(cases["opaque"])})
    assert np.array_equal(np.asarray(load_rgb(row.target, row=row, what="image")), np.asarray(rgb))
    assert {name: path.read_bytes() for name, path in cases.items()} == before

    rows = [
        EditRow(0, "t", str(cases["rgba"]), (str(cases["opaque"]),), "p", None, {}),
        EditRow(1, "c", str(cases["opaque"]), (str(cases["p"]),), "p", None, {}),
        EditRow(2, "n", str(cases["opaque"]), (str(cases["opaque"]),), "p", None, {}),
    ]
    _, report = validate_rows(rows, "flux_kontext", get_model("flux_kontext").policy(target_area=32 * 32),
                              skip_bad_samples=False)  # fmt: skip
    assert report.composited == ["t (image)", "c (control_0)"]
    with caplog.at_level("INFO", logger="common.validate"):
        report.log("dataset d")
    (warning,) = [r.getMessage() for r in caplog.records if "transparent" in r.getMessage()]
    assert warning.startswith("2 image(s) have transparent pixels, trained as composited over white")
    assert warning.endswith(": t (image), c (control_0)")


def test_rows_without_control_among_rows_with_one_are_refused_unless_allowed(tmp_path):
    """JSONL/CSV rows with an empty control cell among rows with one: refused naming them (file:line), unless
    --allow_target_only; a data set without any control image (text-to-image pairs) is fine as it is."""
    from common.validate import check_target_only

    for k in range(3):
        _image(32, 32, k).save(tmp_path / f"{k}.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"image": "0.png", "control": "1.png", "prompt": "a"}\n{"image": "1.png", "control": "", "prompt": "b"}\n'
        '{"image": "2.png", "control": [], "prompt": "c"}\n{"image": "2.png", "control": ["0.png"], "prompt": "d"}\n'
    )
    csv_file = tmp_path / "m.csv"
    csv_file.write_text("image,control,prompt\n0.png,1.png,a\n1.png,,b\n")
    with pytest.raises(UserError, match=r"m.jsonl: 2 of 4 rows have no control image .*: m.jsonl:2, m.jsonl:3;"):
        check_target_only(read_rows(manifest), False, "m.jsonl")
    with pytest.raises(UserError, match=r"1 of 2 rows .*: m.csv:3; .*--allow_target_only"):
        check_target_only(read_rows(csv_file), False, "m.csv")
    check_target_only(read_rows(manifest), True, "m.jsonl")
    manifest.write_text('{"image": "0.png", "prompt": "a"}\n{"image": "1.png", "control": null, "prompt": "b"}\n')
    check_target_only(read_rows(manifest), False, "m.jsonl")
