"""Per-sample target sizes for mixed-resolution training without bucketing.

Every sample keeps its own aspect ratio: it is (optionally) centre-cropped, then resized to the pixel area
chosen for it, with width and height rounded to the model's multiple the way the matching diffusers pipeline
rounds them, so that training sees the same sizes as inference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

Rounding = Literal["nearest", "floor"]

# Default area the pipelines resize to.
DEFAULT_AREA: int = 1024 * 1024


def parse_resolution(spec: str | int) -> int:
    """Parse "512*512", "512x768", "512X768", "262144" or 262144 into a pixel area, so configs can use either form."""
    if isinstance(spec, bool) or not isinstance(spec, (str, int)):
        raise ValueError(f"Invalid resolution spec {spec!r}: expected 'W*H', 'WxH' or a pixel count")
    if isinstance(spec, int):
        if spec <= 0:
            raise ValueError(f"Invalid resolution spec {spec!r}: the pixel area must be positive")
        return spec
    text = spec.strip()
    for sep in ("*", "x", "X"):
        if sep in text:
            parts = [p.strip() for p in text.split(sep)]
            if len(parts) != 2 or not all(p.isdecimal() for p in parts):
                raise ValueError(f"Invalid resolution spec {spec!r}: expected 'W{sep}H' with two positive integers")
            w, h = int(parts[0]), int(parts[1])
            if w <= 0 or h <= 0:
                raise ValueError(f"Invalid resolution spec {spec!r}: width and height must be positive")
            return w * h
    if not text.isdecimal():
        raise ValueError(f"Invalid resolution spec {spec!r}: expected 'W*H', 'WxH' or a pixel count")
    area = int(text)
    if area <= 0:
        raise ValueError(f"Invalid resolution spec {spec!r}: the pixel area must be positive")
    return area


def select_area(width: int, height: int, candidates: Sequence[int]) -> int:
    """Pick the candidate area closest to w*h in relative error (ties: the smaller), to resample each image least.

    Relative errors share the denominator w*h, so they are compared exactly as integers |A - w*h|. Two distinct
    areas never tie after the "smaller area" rule, and equal areas give the same size, so no further tie-break
    (e.g. on aspect ratio) can change the outcome.
    """
    _check_dims(width, height)
    if not candidates:
        raise ValueError("select_area needs at least one candidate area")
    for a in candidates:
        if isinstance(a, bool) or not isinstance(a, int) or a <= 0:
            raise ValueError(f"Invalid candidate area {a!r}: expected a positive int (use parse_resolution)")
    orig = width * height
    return min(candidates, key=lambda a: (abs(a - orig), a))


def size_for_area(width: int, height: int, area: int, multiple: int, rounding: Rounding = "nearest") -> tuple[int, int]:
    """(w, h) with the aspect ratio of width/height and about `area` pixels, each a multiple of `multiple`.

    rounding="nearest" reproduces diffusers' Qwen-Image-Edit(-Plus) `calculate_dimensions(area, w / h)` exactly
    (with multiple=32); rounding="floor" reproduces FluxKontextPipeline's `round(sqrt(area * ar))` followed by
    `// multiple * multiple`. Each side is at least `multiple` (the diffusers functions could return 0 there).
    """
    _check_dims(width, height)
    if area <= 0:
        raise ValueError(f"area must be positive, got {area}")
    if multiple <= 0:
        raise ValueError(f"multiple must be positive, got {multiple}")
    ratio = width / height
    if rounding == "nearest":
        # Same float operations as diffusers.pipelines.qwenimage.pipeline_qwenimage_edit.calculate_dimensions.
        w_f = math.sqrt(area * ratio)
        h_f = w_f / ratio
        w, h = round(w_f / multiple) * multiple, round(h_f / multiple) * multiple
    elif rounding == "floor":
        # Same operations as diffusers.pipelines.flux.pipeline_flux_kontext.FluxKontextPipeline.__call__.
        w = round((area * ratio) ** 0.5) // multiple * multiple
        h = round((area / ratio) ** 0.5) // multiple * multiple
    else:
        raise ValueError(f"rounding must be 'nearest' or 'floor', got {rounding!r}")
    return max(w, multiple), max(h, multiple)


def aspect_crop_box(width: int, height: int, max_aspect_ratio: float | None) -> tuple[int, int, int, int]:
    """Centred (left, top, right, bottom) box cutting the long side so max(w/h, h/w) <= max_aspect_ratio.

    Over-long images are cropped rather than rejected or squashed: dropping edit pairs silently loses data,
    squashing distorts them, and a centre crop keeps most of the content at a shape the model was trained on.
    Returns the full image when max_aspect_ratio is None or not exceeded.
    """
    _check_dims(width, height)
    if max_aspect_ratio is None:
        return 0, 0, width, height
    if not max_aspect_ratio >= 1.0:
        raise ValueError(f"max_aspect_ratio must be >= 1 (it bounds max(w/h, h/w)), got {max_aspect_ratio}")
    if width > height * max_aspect_ratio:
        new_w = max(1, math.floor(height * max_aspect_ratio + 1e-9))
        left = (width - new_w) // 2
        return left, 0, left + new_w, height
    if height > width * max_aspect_ratio:
        new_h = max(1, math.floor(width * max_aspect_ratio + 1e-9))
        top = (height - new_h) // 2
        return 0, top, width, top + new_h
    return 0, 0, width, height


def fixed_size_crop_box(width: int, height: int, fixed_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Centred (left, top, right, bottom) box with the aspect ratio of fixed_size, so resizing to it never distorts."""
    _check_dims(width, height)
    tw, th = fixed_size
    _check_dims(tw, th)
    if width * th > tw * height:  # too wide: crop width
        new_w = min(width, max(1, round(height * tw / th)))
        left = (width - new_w) // 2
        return left, 0, left + new_w, height
    if width * th < tw * height:  # too tall: crop height
        new_h = min(height, max(1, round(width * th / tw)))
        top = (height - new_h) // 2
        return 0, top, width, top + new_h
    return 0, 0, width, height


def choose_size(
    width: int,
    height: int,
    *,
    fixed_size: tuple[int, int] | None = None,
    multi_resolutions: Sequence[int | str] | None = None,
    target_area: int | str | None = None,
    multiple: int,
    max_aspect_ratio: float | None = None,
    rounding: Rounding = "nearest",
) -> tuple[int, int]:
    """Target (w, h) for an image of width x height; priority fixed_size > multi_resolutions > target_area.

    width/height are the image's size *before* cropping: the max_aspect_ratio crop (see aspect_crop_box) is
    applied first for the area modes; fixed_size ignores max_aspect_ratio (use fixed_size_crop_box). An empty
    multi_resolutions counts as not given (seed 001 §1.1). Use ResolutionPolicy.plan to get the crop box too.
    """
    _check_dims(width, height)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple <= 0:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    if fixed_size is not None:
        fw, fh = fixed_size
        _check_dims(fw, fh)
        if fw % multiple or fh % multiple:
            raise ValueError(f"fixed_size {fixed_size} must be a multiple of {multiple} on both sides")
        return fw, fh
    left, top, right, bottom = aspect_crop_box(width, height, max_aspect_ratio)
    cw, ch = right - left, bottom - top
    if multi_resolutions:
        area = select_area(cw, ch, [parse_resolution(r) for r in multi_resolutions])
    elif target_area is not None:
        area = parse_resolution(target_area)
    else:
        raise ValueError("No resolution configured: give fixed_size, multi_resolutions or target_area")
    return size_for_area(cw, ch, area, multiple, rounding)


class ResizePlan(NamedTuple):
    """What to do with one image: crop to crop_box (left, top, right, bottom), then resize to size (w, h)."""

    crop_box: tuple[int, int, int, int]
    size: tuple[int, int]


@dataclass(frozen=True)
class ResolutionPolicy:
    """Parsed resolution config (seed 001 §1.1) planning crop + resize per image; reuse the plan for control/mask."""

    multiple: int
    fixed_size: tuple[int, int] | None = None
    multi_resolutions: Sequence[int | str] | None = None  # stored as tuple[int, ...]
    target_area: int | str | None = None  # stored as int
    max_aspect_ratio: float | None = 3.0  # seed 001 default; None disables the crop
    rounding: Rounding = "nearest"
    # (w, h) of a control image after the aspect crop -> its size, or a ResizePlan within that crop (for pipelines
    # that crop references rather than resize them); None: sized like a target (`plan`)
    control_size: Callable[[int, int], tuple[int, int] | ResizePlan] | None = None

    def __post_init__(self) -> None:
        """Parse string areas and fail at config time rather than on the first sample."""
        if self.multi_resolutions is not None:
            object.__setattr__(self, "multi_resolutions", tuple(parse_resolution(r) for r in self.multi_resolutions))
        if self.target_area is not None:
            object.__setattr__(self, "target_area", parse_resolution(self.target_area))
        if self.fixed_size is not None:
            object.__setattr__(self, "fixed_size", (int(self.fixed_size[0]), int(self.fixed_size[1])))
        if self.rounding not in ("nearest", "floor"):
            raise ValueError(f"rounding must be 'nearest' or 'floor', got {self.rounding!r}")
        aspect_crop_box(1, 1, self.max_aspect_ratio)  # validates max_aspect_ratio even in fixed_size mode
        self.plan(1024, 1024)  # validates that some mode is configured, multiples, max_aspect_ratio

    @property
    def is_multi_resolution(self) -> bool:
        """True when per-sample areas are chosen from multi_resolutions (fixed_size disables it)."""
        return self.fixed_size is None and bool(self.multi_resolutions)

    def plan(self, width: int, height: int) -> ResizePlan:
        """Crop box and target size for an image of width x height."""
        size = choose_size(
            width,
            height,
            fixed_size=self.fixed_size,
            multi_resolutions=self.multi_resolutions,
            target_area=self.target_area,
            multiple=self.multiple,
            max_aspect_ratio=self.max_aspect_ratio,
            rounding=self.rounding,
        )
        if self.fixed_size is not None:
            box = fixed_size_crop_box(width, height, self.fixed_size)
        else:
            box = aspect_crop_box(width, height, self.max_aspect_ratio)
        return ResizePlan(box, size)

    def control_plan(self, width: int, height: int) -> ResizePlan:
        """Crop box and size for a control image: like a target unless `control_size` sizes controls apart, in
        which case the aspect crop (and any crop `control_size` plans inside it) applies, not a fixed target size's
        shape."""
        if self.control_size is None:
            return self.plan(width, height)
        box = aspect_crop_box(width, height, self.max_aspect_ratio)
        planned = self.control_size(box[2] - box[0], box[3] - box[1])
        if not isinstance(planned, ResizePlan):
            return ResizePlan(box, planned)
        left, top, right, bottom = planned.crop_box
        return ResizePlan((box[0] + left, box[1] + top, box[0] + right, box[1] + bottom), planned.size)


def _check_dims(width: int, height: int) -> None:
    """Reject non-positive or non-integer sizes early with a message naming them."""
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
