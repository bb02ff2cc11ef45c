"""Tests for common.resolution: parsing, area selection, pipeline-exact sizing, aspect cropping, config priority."""

import itertools
import math

import pytest
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux import pipeline_flux_kontext
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus
from diffusers.pipelines.qwenimage21 import pipeline_qwenimage21

from common.models import MODELS, get_model
from common.models.flux_kontext import FLUX_KONTEXT, kontext_preferred_size
from common.models.qwen_edit import QWEN_EDIT
from common.resolution import (
    ResizePlan,
    ResolutionPolicy,
    aspect_crop_box,
    choose_size,
    fixed_size_crop_box,
    parse_resolution,
    select_area,
    size_for_area,
)

SIDES = [64, 100, 333, 480, 512, 640, 720, 768, 1000, 1024, 1080, 1333, 1920, 2048, 3000, 4096]
AREAS = [256 * 256, 384 * 384, 512 * 512, 640 * 640, 768 * 512, 832 * 576, 1024 * 1024, 1328 * 1328]


# ---------------------------------------------------------------- parse_resolution


@pytest.mark.parametrize(
    ("spec", "area"),
    [
        ("512*512", 262144),
        ("512x768", 393216),
        ("512X768", 393216),
        (" 832 * 576 ", 479232),
        ("262144", 262144),
        (262144, 262144),
        ("1", 1),
    ],
)
def test_parse_resolution_formats(spec, area):
    assert parse_resolution(spec) == area


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "abc",
        "512*",
        "*512",
        "512*512*2",
        "512x-3",
        "0*512",
        "512*0",
        "0",
        -5,
        0,
        "1.5e5",
        "512.0*512",
        "-262144",
        262144.0,
        True,
        None,
        (512, 512),
    ],
)
def test_parse_resolution_errors_name_the_spec(spec):
    with pytest.raises(ValueError, match="Invalid resolution spec") as exc:
        parse_resolution(spec)
    assert repr(spec) in str(exc.value)


# ---------------------------------------------------------------- select_area


def test_select_area_seed_candidates():
    cands = [parse_resolution(s) for s in ["512*512", "640*640", "768*512", "832*576"]]
    assert cands == [262144, 409600, 393216, 479232]
    assert select_area(512, 512, cands) == 262144  # exact match
    assert select_area(1024, 1024, cands) == 479232  # larger than all: the largest
    assert select_area(100, 100, cands) == 262144  # smaller than all: the smallest


def test_select_area_nearest_relative_error():
    cands = [262144, 393216, 409600, 479232]
    # 396900 px: errors 134756, 3684, 12700, 82332 -> 393216
    assert select_area(630, 630, cands) == 393216
    # 440000 px: errors vs 409600=30400, 479232=39232 -> 409600
    assert select_area(800, 550, cands) == 409600
    # Order of candidates does not matter
    assert select_area(800, 550, list(reversed(cands))) == 409600


def test_select_area_tie_goes_to_smaller_area():
    # 500*500 = 250000; 240000 and 260000 are both 10000 away (relative error 0.04 each)
    assert select_area(500, 500, [260000, 240000]) == 240000
    assert select_area(500, 500, [240000, 260000]) == 240000
    # A tie that floating point would blur: 3*3 = 9, candidates 8 and 10
    assert select_area(3, 3, [10, 8]) == 8


def test_select_area_errors():
    with pytest.raises(ValueError, match="at least one"):
        select_area(10, 10, [])
    with pytest.raises(ValueError, match="candidate"):
        select_area(10, 10, ["512*512"])
    with pytest.raises(ValueError, match="width"):
        select_area(0, 10, [100])


# ---------------------------------------------------------------- size_for_area vs diffusers


@pytest.mark.parametrize("module", [pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus])
def test_size_for_area_matches_qwen_calculate_dimensions(module):
    calc = module.calculate_dimensions
    checked = 0
    for w, h in itertools.product(SIDES, SIDES):
        plus_areas = [pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE, pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE]
        for area in AREAS + plus_areas:
            ref_w, ref_h = calc(area, w / h)[:2]
            if ref_w == 0 or ref_h == 0:
                continue  # degenerate in diffusers; ours clamps to one multiple
            assert size_for_area(w, h, area, 32) == (ref_w, ref_h), (w, h, area)
            assert size_for_area(w, h, area, QWEN_EDIT.multiple, QWEN_EDIT.rounding) == (ref_w, ref_h)
            checked += 1
    assert checked > 1500


def _flux_kontext_reference(width, height, max_area, vae_scale_factor=8):
    """The sizing lines of FluxKontextPipeline.__call__, checked against its source below."""
    aspect_ratio = width / height
    w = round((max_area * aspect_ratio) ** 0.5)
    h = round((max_area / aspect_ratio) ** 0.5)
    multiple_of = vae_scale_factor * 2
    return w // multiple_of * multiple_of, h // multiple_of * multiple_of


def test_flux_reference_is_the_pipeline_code():
    import inspect

    src = inspect.getsource(pipeline_flux_kontext.FluxKontextPipeline.__call__)
    for line in [
        "width = round((max_area * aspect_ratio) ** 0.5)",
        "height = round((max_area / aspect_ratio) ** 0.5)",
        "multiple_of = self.vae_scale_factor * 2",
        "width = width // multiple_of * multiple_of",
        "height = height // multiple_of * multiple_of",
    ]:
        assert line in src


def test_size_for_area_matches_flux_kontext():
    for w, h in itertools.product(SIDES, SIDES):
        for area in AREAS:
            ref = _flux_kontext_reference(w, h, area)
            if 0 in ref:
                continue
            got = size_for_area(w, h, area, FLUX_KONTEXT.multiple, FLUX_KONTEXT.rounding)
            assert got == ref, (w, h, area)
            assert got[0] % 16 == 0 and got[1] % 16 == 0


def test_model_multiples_match_pipeline_sources():
    import inspect

    assert {name: model.multiple for name, model in MODELS.items()} == {
        "flux_kontext": 16,
        "qwen_edit": 32,
        "qwen_edit_plus": 32,
        "qwen_edit_2511": 32,
        "flux2_klein": 16,
        "flux2_dev": 16,
        "qwen_image21": 32,
        "flux3_klein": 16,
    }
    # FLUX.2: both pipelines floor references and the output to vae_scale_factor * 2.
    for pipeline in (Flux2KleinPipeline, Flux2Pipeline):
        src = inspect.getsource(pipeline.__call__) + inspect.getsource(pipeline.prepare_latents)
        assert "multiple_of = self.vae_scale_factor * 2" in src
        assert "height = 2 * (int(height) // (self.vae_scale_factor * 2))" in src
    # Qwen calculate_dimensions rounds to 32 in Edit, Edit-Plus and 2.1.
    for module in (pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus, pipeline_qwenimage21):
        src = inspect.getsource(module.calculate_dimensions)
        assert "round(width / 32) * 32" in src and "round(height / 32) * 32" in src
    assert pipeline_qwenimage_edit.calculate_dimensions(1024 * 1024, 1.0)[:2] == (1024, 1024)


def test_size_for_area_examples_and_multiples():
    assert size_for_area(1024, 1024, 512 * 512, 16) == (512, 512)
    assert size_for_area(1920, 1080, 1024 * 1024, 32) == (1376, 768)
    assert size_for_area(1920, 1080, 1024 * 1024, 16, "floor") == (1360, 768)
    for w, h in itertools.product(SIDES, SIDES):
        for area in AREAS:
            for mult, rounding in [(16, "floor"), (16, "nearest"), (32, "nearest"), (64, "nearest")]:
                sw, sh = size_for_area(w, h, area, mult, rounding)
                assert sw % mult == 0 and sh % mult == 0 and sw >= mult and sh >= mult


def test_size_for_area_preserves_aspect_and_area():
    for w, h in itertools.product(SIDES, SIDES):
        if max(w / h, h / w) > 4:
            continue
        for area in [512 * 512, 1024 * 1024]:
            for mult, rounding in [(16, "floor"), (32, "nearest")]:
                sw, sh = size_for_area(w, h, area, mult, rounding)
                # each side is within one multiple of the exact real-valued side
                exact_w, exact_h = math.sqrt(area * w / h), math.sqrt(area * h / w)
                assert abs(sw - exact_w) <= mult and abs(sh - exact_h) <= mult
                # so the log aspect error is bounded by the rounding of both sides
                bound = math.log((exact_w + mult) / (exact_w - mult)) + math.log((exact_h + mult) / (exact_h - mult))
                assert abs(math.log(sw / sh) - math.log(w / h)) <= bound
                if rounding == "nearest":
                    assert abs(sw - exact_w) <= mult / 2 + 1e-9 and abs(sh - exact_h) <= mult / 2 + 1e-9
                else:
                    assert sw <= exact_w + 0.5 and sh <= exact_h + 0.5  # floor never grows a side


def test_size_for_area_tiny_inputs_clamp_and_errors():
    # diffusers would give width 0 here (sqrt(65.536) = 8.1 rounds to 0 multiples); we keep one multiple
    assert pipeline_qwenimage_edit.calculate_dimensions(256 * 256, 10 / 10000)[:2] == (0, 8096)
    assert size_for_area(10, 10000, 256 * 256, 32) == (32, 8096)
    assert size_for_area(1, 1, 1, 16) == (16, 16)
    with pytest.raises(ValueError, match="area"):
        size_for_area(10, 10, 0, 16)
    with pytest.raises(ValueError, match="multiple"):
        size_for_area(10, 10, 100, 0)
    with pytest.raises(ValueError, match="rounding"):
        size_for_area(10, 10, 100, 16, "ceil")


def test_kontext_preferred_resolutions_match_diffusers():
    assert kontext_preferred_size(1000, 1000) == (1024, 1024)
    assert kontext_preferred_size(1920, 1080) == (1392, 752)  # 1.778: 1392/752=1.851 beats 1328/800=1.66
    for w, h in itertools.product(SIDES, SIDES):
        if min(w, h) < 16:
            continue
        ar = (w - w % 16) / (h - h % 16)  # the image processor's default size rounds each side down to 16 first
        _, ew, eh = min((abs(ar - a / b), a, b) for a, b in pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS)
        assert kontext_preferred_size(w, h) == (ew, eh)


# ---------------------------------------------------------------- max_aspect_ratio


def test_aspect_crop_box_crops_long_side_centred():
    assert aspect_crop_box(4000, 1000, 3.0) == (500, 0, 3500, 1000)
    assert aspect_crop_box(1000, 4000, 3.0) == (0, 500, 1000, 3500)
    assert aspect_crop_box(3001, 1000, 3.0) == (0, 0, 3000, 1000)  # odd excess: the extra pixel goes right
    assert aspect_crop_box(3000, 1000, 3.0) == (0, 0, 3000, 1000)  # exactly at the limit: untouched
    assert aspect_crop_box(1000, 700, 3.0) == (0, 0, 1000, 700)
    assert aspect_crop_box(9000, 10, None) == (0, 0, 9000, 10)
    assert aspect_crop_box(237, 100, 2.35) == (1, 0, 236, 100)
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        aspect_crop_box(100, 100, 0.5)


def test_aspect_crop_box_always_within_limit():
    for w, h in itertools.product(SIDES, SIDES):
        for r in [1.0, 1.5, 2.0, 2.35, 3.0]:
            left, top, right, bottom = aspect_crop_box(w, h, r)
            cw, ch = right - left, bottom - top
            assert 0 <= left and 0 <= top and right <= w and bottom <= h
            assert max(cw / ch, ch / cw) <= r + 1e-9
            # only the long side is cut, and at most one pixel more than needed
            if w >= h:
                assert ch == h and cw >= min(w, math.floor(h * r)) - 1
            else:
                assert cw == w and ch >= min(h, math.floor(w * r)) - 1


def test_choose_size_applies_max_aspect_before_sizing():
    # 4000x1000 (4:1) cropped to 3000x1000 (3:1), then sized at 1024^2 with qwen rounding
    got = choose_size(4000, 1000, target_area=1024 * 1024, multiple=32, max_aspect_ratio=3.0)
    assert got == pipeline_qwenimage_edit.calculate_dimensions(1024 * 1024, 3.0)[:2] == (1760, 576)
    uncapped = choose_size(4000, 1000, target_area=1024 * 1024, multiple=32, max_aspect_ratio=None)
    assert uncapped == (2048, 512)
    # area selection also uses the cropped area: 4000x1000 -> 3000x1000 = 3e6 px
    assert choose_size(4000, 1000, multi_resolutions=[3_000_000, 4_000_000], multiple=16, max_aspect_ratio=3.0) == (
        size_for_area(3000, 1000, 3_000_000, 16)
    )
    assert choose_size(4000, 1000, multi_resolutions=[3_000_000, 4_000_000], multiple=16) == (
        size_for_area(4000, 1000, 4_000_000, 16)
    )


# ---------------------------------------------------------------- priority and policy


def test_choose_size_priority():
    kw = dict(multiple=16)
    # fixed_size wins over everything
    assert choose_size(1920, 1080, fixed_size=(512, 768), multi_resolutions=["512*512"], target_area=4096, **kw) == (
        512,
        768,
    )
    # multi_resolutions wins over target_area
    assert choose_size(1024, 1024, multi_resolutions=["512*512", "640*640"], target_area=1024 * 1024, **kw) == (
        640,
        640,
    )
    # empty multi_resolutions counts as absent -> target_area
    assert choose_size(1024, 1024, multi_resolutions=[], target_area="768*768", **kw) == (768, 768)
    assert choose_size(1024, 1024, target_area=262144, **kw) == (512, 512)
    with pytest.raises(ValueError, match="No resolution configured"):
        choose_size(1024, 1024, **kw)
    with pytest.raises(ValueError, match="No resolution configured"):
        choose_size(1024, 1024, multi_resolutions=[], **kw)
    with pytest.raises(ValueError, match="multiple of 16"):
        choose_size(1024, 1024, fixed_size=(500, 512), **kw)
    with pytest.raises(ValueError, match="multiple"):
        choose_size(1024, 1024, target_area=1000, multiple=0)


def test_seed_multi_resolution_config():
    """Seed 001 §1.2.1 config: each sample picks its nearest area and keeps its aspect ratio (step 16)."""
    policy = ResolutionPolicy(
        multiple=16, multi_resolutions=["512*512", "640*640", "768*512", "832*576"], max_aspect_ratio=3.0
    )
    assert policy.multi_resolutions == (262144, 409600, 393216, 479232)
    assert policy.is_multi_resolution
    assert policy.plan(512, 512) == ResizePlan((0, 0, 512, 512), (512, 512))
    assert policy.plan(1024, 768) == ResizePlan((0, 0, 1024, 768), (800, 592))  # 786432 px -> 479232
    assert size_for_area(1024, 768, 479232, 16) == (800, 592)
    assert policy.plan(768, 512) == ResizePlan((0, 0, 768, 512), (768, 512))
    assert policy.plan(600, 700).size == size_for_area(600, 700, 409600, 16)  # 420000 px -> 409600
    # 3000x500 (6:1) -> crop 1500x500 (750000 px -> 479232) -> sized at 3:1
    assert policy.plan(3000, 500) == ResizePlan((750, 0, 2250, 500), size_for_area(1500, 500, 479232, 16))


def test_policy_fixed_size_and_model_policy():
    p = get_model("qwen_edit").policy(fixed_size=(1024, 768))
    assert (p.multiple, p.rounding, p.is_multi_resolution) == (32, "nearest", False)
    assert p.plan(2000, 1000) == ResizePlan((333, 0, 1666, 1000), (1024, 768))  # 1333x1000 is 4:3
    assert p.plan(800, 600) == ResizePlan((0, 0, 800, 600), (1024, 768))
    assert fixed_size_crop_box(600, 1000, (1024, 768)) == (0, 275, 600, 725)

    f = get_model("flux_kontext").policy(target_area="1024*1024")
    assert (f.multiple, f.rounding, f.target_area) == (16, "floor", 1048576)
    assert f.plan(1920, 1080).size == _flux_kontext_reference(1920, 1080, 1024 * 1024)

    q = get_model("qwen_edit_plus").policy(target_area=1024 * 1024, max_aspect_ratio=None)
    assert q.plan(1920, 1080).size == pipeline_qwenimage_edit_plus.calculate_dimensions(1024 * 1024, 1920 / 1080)

    with pytest.raises(ValueError, match="unknown model"):
        get_model("sdxl")
    with pytest.raises(ValueError, match="No resolution configured"):
        ResolutionPolicy(multiple=16)
    with pytest.raises(ValueError, match="Invalid resolution spec 'big'"):
        ResolutionPolicy(multiple=16, multi_resolutions=["512*512", "big"])
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        ResolutionPolicy(multiple=16, fixed_size=(512, 512), max_aspect_ratio=0.9)
    with pytest.raises(ValueError, match="rounding"):
        ResolutionPolicy(multiple=16, target_area=1024, rounding="up")


def test_control_plan_composes_a_planned_crop_with_the_aspect_crop():
    """A `control_size` that plans its own crop (FLUX.2's pipelines crop references to 16-multiples) crops inside
    the --max_aspect_ratio crop."""
    from common.models.flux2 import reference_plan

    policy = ResolutionPolicy(multiple=16, target_area=64 * 64, max_aspect_ratio=3.0, control_size=reference_plan)
    assert policy.control_plan(1000, 200) == ResizePlan((204, 4, 796, 196), (592, 192))  # 600x200 kept, then 592x192
    assert policy.control_plan(150, 100) == ResizePlan((3, 2, 147, 98), (144, 96))
    assert reference_plan(2000, 1000).size == (1440, 720)  # 1448x724 after the 1 MP scaling, floored to 16
