"""open_training_data: items encoded on the fly equal those of a cache precompute_cache.py built from the same data."""

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus
from PIL import Image
from test_cache import assert_same

import precompute_cache
from common.cache import CacheNotFinished, CacheWriter, FingerprintMismatch, cache_info, load_cache, token_counts
from common.cli import resolution_policy
from common.data import BadSampleError
from common.errors import UserError
from common.models import get_model
from common.training_data import data_fingerprint, open_training_data, precompute_command

CPU = torch.device("cpu")
# (width, height) of the targets; controls and masks get other sizes (masks: scaled copies of the target's ratio).
SIZES = [(96, 64), (64, 64), (48, 112), (80, 48), (64, 96), (112, 48)]
# Keys of every item, cached or not; FLUX adds "pooled_prompt_embeds", Qwen "empty_prompt_embeds".
ITEM_KEYS = {"index", "version", "sample_id", "sources", "img_shapes", "mask"}
ITEM_KEYS |= {"target_latents", "control_latents", "prompt_embeds", "cropped"}


def write_pairs(root: Path, controls: list[int], corrupt: str | None = None) -> Path:
    """Folder dataset: row i has controls[i] controls of their own sizes and, on odd rows, a half-size edit mask."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i, n in enumerate(controls):
        w, h = SIZES[i % len(SIZES)]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"s{i}.png")
        (root / f"s{i}.txt").write_text(f"turn sample {i} blue" + " now" * i)
        for k in range(n):
            name = f"s{i}_control.png" if n == 1 else f"s{i}_control_{k}.png"
            cw, ch = SIZES[(i + k + 1) % len(SIZES)]
            Image.fromarray(rng.integers(0, 256, (ch, cw, 3), dtype=np.uint8)).save(root / name)
        if i % 2:
            mask = np.zeros((h // 2, w // 2), dtype=np.uint8)
            mask[:, : w // 4] = 255
            Image.fromarray(mask).save(root / f"s{i}_mask.png")
    if corrupt:
        (root / corrupt).write_bytes(b"not an image")
    return root


def precompute(model: str, checkpoint: Path, dataset: Path, cache: Path, *extra: str) -> argparse.Namespace:
    """Build a cache with precompute_cache.main; returns its flags (which the trainers' flags mirror)."""
    argv = ["--model", model, "--pretrained_model_name_or_path", str(checkpoint), "--dataset", str(dataset)]
    argv += ["--cache_dir", str(cache), "--multi_resolutions", "48*48", "64*96", "--shard_size", "2", *extra]
    args = precompute_cache.parse_args([*argv, "--allow_target_only"])  # the data sets mix rows with and without
    precompute_cache.main(args)
    return args


def flags(args: argparse.Namespace, **changes: object) -> argparse.Namespace:
    """A copy of args with some flags changed."""
    return argparse.Namespace(**{**vars(args), **changes})


@pytest.mark.parametrize(
    ("model", "controls"),
    [
        ("flux_kontext", [1, 1, 0, 1]),
        ("qwen_edit", [1, 0, 1, 0]),
        ("qwen_edit_plus", [2, 2]),
        ("qwen_edit_plus", [0, 1, 2, 2, 1, 0]),
    ],
)
def test_uncached_items_equal_cached_items(tmp_path, tiny_checkpoint, model, controls):
    dataset = write_pairs(tmp_path / "data", controls)
    args = precompute(model, tiny_checkpoint(model), dataset, tmp_path / "cache")
    from_cache = open_training_data(args, model, CPU, torch.float32)  # checked against the sources too
    settings_only = open_training_data(flags(args, dataset=None), model, CPU, torch.float32)
    uncached = open_training_data(flags(args, cache_dir=None), model, CPU, torch.float32)
    assert from_cache.cached and settings_only.cached and not uncached.cached

    n = len(controls)
    assert len(from_cache.dataset) == len(settings_only.dataset) == len(uncached.dataset) == n
    assert uncached.lengths == from_cache.lengths == token_counts(load_cache(tmp_path / "cache"))
    assert uncached.img_shapes == from_cache.img_shapes == settings_only.img_shapes  # the model card's size mix
    assert [len(shapes) - 1 for shapes in uncached.img_shapes] == controls
    assert uncached.captions == from_cache.captions and len(uncached.captions) == n and all(uncached.captions)
    assert settings_only.captions is None  # the cache alone holds no caption text
    keys = ITEM_KEYS | ({"pooled_prompt_embeds"} if model == "flux_kontext" else {"empty_prompt_embeds"})
    items = [uncached.dataset[i] for i in range(n)]  # each access encodes anew
    for i, item in enumerate(items):
        assert set(item) == keys
        assert_same(item, from_cache.dataset[i])
        assert_same(item, settings_only.dataset[i])
        assert (item["index"], item["sample_id"], len(item["control_latents"])) == (i, f"s{i}", controls[i])
        latents = [item["target_latents"], *item["control_latents"]]
        assert item["img_shapes"] == [[1, t.shape[1] // 2, t.shape[2] // 2] for t in latents]
        assert uncached.lengths[i] == sum(h * w for _, h, w in item["img_shapes"])
        assert item["prompt_embeds"].dtype == torch.float32
        assert (item["mask"] is None) == (i % 2 == 0)
        if i % 2:  # the left half of the target is edited
            assert item["mask"].shape == tuple(item["img_shapes"][0][1:]) and item["mask"][:, 0].eq(1).all()
    assert len({tuple(s) for item in items for s in item["img_shapes"]}) > 2, "sizes must mix"
    if model == "flux_kontext":
        assert set(uncached.empty_prompt) == {"prompt_embeds", "pooled_prompt_embeds"}
        assert_same(uncached.empty_prompt, from_cache.empty_prompt)
    else:
        assert uncached.empty_prompt is None and from_cache.empty_prompt is None
        # a row without control drops its caption to the text-only empty prompt, one with controls to its own
        empties = [item["empty_prompt_embeds"] for item in items]
        text_only = [e for e, c in zip(empties, controls, strict=True) if c == 0]
        with_images = [e for e, c in zip(empties, controls, strict=True) if c > 0]
        assert all(torch.equal(e, text_only[0]) for e in text_only)
        assert all(e.shape[0] > t.shape[0] for e in with_images for t in text_only[:1])


def test_uncached_bad_rows_raise_or_are_skipped_like_the_cache(tmp_path, tiny_checkpoint, caplog):
    dataset = write_pairs(tmp_path / "data", [1, 1, 1, 0], corrupt="s1_control.png")
    checkpoint = tiny_checkpoint("flux_kontext")
    args = precompute("flux_kontext", checkpoint, dataset, tmp_path / "cache", "--skip_bad_samples")
    uncached = flags(args, cache_dir=None, skip_bad_samples=False)
    with pytest.raises(BadSampleError, match=r"'s1'.*s1_control\.png") as info:
        open_training_data(uncached, "flux_kontext", CPU, torch.float32)
    assert (info.value.sample_id, info.value.path) == ("s1", str(dataset / "s1_control.png"))
    caplog.clear()
    caplog.set_level("INFO")
    skipped = open_training_data(flags(uncached, skip_bad_samples=True), "flux_kontext", CPU, torch.float32)
    summary = "4 rows, 3 rows used, 1 skipped, 1 without control image (s3), 0 cropped by more than 10% of an image"
    assert f"dataset {dataset}: {summary}" in caplog.text
    assert (
        "skipped s1: bad sample 's1': cannot read image" in caplog.text
        and str(dataset / "s1_control.png") in caplog.text
    )
    caplog.clear()
    cached = open_training_data(args, "flux_kontext", CPU, torch.float32)
    assert f"cache {args.cache_dir}: {summary}" in caplog.text  # the same summary from the cache's own records
    assert [skipped.dataset[i]["sample_id"] for i in range(3)] == ["s0", "s2", "s3"]
    assert skipped.lengths == cached.lengths and len(skipped.dataset) == len(cached.dataset) == 3
    for i in range(3):
        assert_same(skipped.dataset[i], cached.dataset[i])


def test_changed_settings_or_data_are_refused(tmp_path, tiny_checkpoint):
    dataset = write_pairs(tmp_path / "data", [1, 0])
    args = precompute("flux_kontext", tiny_checkpoint("flux_kontext"), dataset, tmp_path / "cache")
    for given in (args, flags(args, dataset=None)):
        with pytest.raises(FingerprintMismatch) as info:
            open_training_data(flags(given, multi_resolutions=["64*64"]), "flux_kontext", CPU, torch.float32)
        assert info.value.differences == ["multi_resolutions: cached [2304, 6144], requested [4096]"]
        assert "precompute_cache.py" in str(info.value) and "--rebuild_cache" in str(info.value)
        with pytest.raises(FingerprintMismatch, match="max_sequence_length: cached 512, requested 64"):
            open_training_data(flags(given, max_sequence_length=64), "flux_kontext", CPU, torch.float32)
        with pytest.raises(FingerprintMismatch, match="model: cached 'flux_kontext', requested 'qwen_edit'"):
            open_training_data(given, "qwen_edit", CPU, torch.float32)
    # Trainers without a --max_sequence_length flag use FLUX's default, which the cache was built with.
    del args.max_sequence_length
    assert open_training_data(args, "flux_kontext", CPU, torch.float32).cached

    # Settings are compared by meaning: other spellings of the same sizes are the same cache.
    same = flags(
        args,
        multi_resolutions=["96x64", "2304"],
        pretrained_model_name_or_path=f"{args.pretrained_model_name_or_path}/.",
    )
    assert len(open_training_data(same, "flux_kontext", CPU, torch.float32).dataset) == 2
    (dataset / "s1.txt").write_text("a different caption")
    with pytest.raises(
        UserError, match=r"does not match --dataset .*: 1 row\(s\) changed.*\['s1'\].*precompute_cache.py"
    ):
        open_training_data(args, "flux_kontext", CPU, torch.float32)
    # Without --dataset only the settings can be checked.
    assert len(open_training_data(flags(args, dataset=None), "flux_kontext", CPU, torch.float32).dataset) == 2


def test_missing_or_unfinished_cache_tells_how_to_build_it(tmp_path, tiny_checkpoint):
    checkpoint = tiny_checkpoint("qwen_edit")
    argv = ["--model", "qwen_edit", "--pretrained_model_name_or_path", str(checkpoint), "--dataset", "pairs"]
    argv += ["--cache_dir", str(tmp_path / "nope"), "--multi_resolutions", "48*48", "64*96", "--skip_bad_samples"]
    args = precompute_cache.parse_args(argv)
    command = (
        f"accelerate launch precompute_cache.py --model qwen_edit --pretrained_model_name_or_path {checkpoint} "
        f"--dataset DATASET --cache_dir {tmp_path / 'nope'} --skip_bad_samples --multi_resolutions '48*48' '64*96'"
    )
    assert precompute_command(flags(args, dataset=None), "qwen_edit") == command
    with pytest.raises(FileNotFoundError, match="no cache at") as info:
        open_training_data(flags(args, dataset=None), "qwen_edit", CPU, torch.float32)
    assert command in str(info.value)

    CacheWriter(tmp_path / "nope", data_fingerprint(args, "qwen_edit")).close()  # opened, never finalized
    with pytest.raises(CacheNotFinished, match="unfinished") as info:
        open_training_data(flags(args, dataset=None), "qwen_edit", CPU, torch.float32)
    assert command in str(info.value)

    with pytest.raises(ValueError, match="--dataset.*--cache_dir"):
        open_training_data(flags(args, dataset=None, cache_dir=None), "qwen_edit", CPU, torch.float32)


@pytest.mark.parametrize(
    ("model", "control_resolution", "vae_image_size"),
    [("flux_kontext", "80*80", None), ("qwen_edit", "64*64", None), ("qwen_edit_plus", "pipeline", 96 * 96)],
)
def test_control_resolution_in_precompute_and_uncached_alike(
    tmp_path, tiny_checkpoint, monkeypatch, model, control_resolution, vae_image_size
):
    if vae_image_size:  # Edit-Plus's pipeline size, read from its module at call time; small keeps the VAE cheap
        monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", vae_image_size)
    dataset = write_pairs(tmp_path / "data", [1, 2, 0] if model == "qwen_edit_plus" else [1, 1, 0])
    args = precompute(
        model, tiny_checkpoint(model), dataset, tmp_path / "cache", "--control_resolution", control_resolution
    )
    assert cache_info(tmp_path / "cache")["fingerprint"]["control_resolution"] == control_resolution
    cached = open_training_data(args, model, CPU, torch.float32)
    uncached = open_training_data(flags(args, cache_dir=None), model, CPU, torch.float32)
    policy = resolution_policy(args, model)
    for i in range(len(cached.dataset)):
        item = uncached.dataset[i]
        assert_same(item, cached.dataset[i])
        for k, latents in enumerate(item["control_latents"]):
            width, height = SIZES[(i + k + 1) % len(SIZES)]
            expected = policy.control_plan(width, height).size
            assert (latents.shape[2] * 8, latents.shape[1] * 8) == expected
            if control_resolution == "pipeline":
                assert expected == pipeline_qwenimage_edit_plus.calculate_dimensions(vae_image_size, width / height)
            else:
                assert expected == get_model(model).policy(target_area=control_resolution).plan(width, height).size
    # The default (`target`) asks for another cache, naming the flag, with or without --dataset.
    for given in (args, flags(args, dataset=None)):
        expected = f"control_resolution: cached '{re.escape(control_resolution)}', requested 'target'"
        with pytest.raises(FingerprintMismatch, match=expected):
            open_training_data(flags(given, control_resolution="target"), model, CPU, torch.float32)
