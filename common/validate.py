"""Rows checked against the chosen model before anything is cached or trained, and the data summary users see.

`validate_rows` is the one path `precompute_cache.py` and the uncached trainer take: each row is decoded, cropped
and sized exactly as for encoding (`common.data.prepare_sample`: reference count of the model, image modes and
sizes, mask shape), so a row that would fail later fails here, naming row and file, or is skipped and listed with
`--skip_bad_samples`. The summary (`DataReport`) says how many rows are used, which were skipped and why, how many
have no control image, and which images their crop cut by more than `CROP_REPORT_SHARE` of their area.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from accelerate import PartialState

from common.data import EditRow, PreparedSample, prepare_all, prepare_sample, token_grid
from common.errors import UserError
from common.models import EditModel
from common.resolution import ResolutionPolicy

# Crops (by --max_aspect_ratio or a fixed --resolution) removing more than this share of an image are reported.
# Cropping is the documented policy, so they are not refused; the report makes sure no big crop goes unseen.
CROP_REPORT_SHARE = 0.10
_LISTED = 10  # rows named per report line
logger = logging.getLogger(__name__)


@dataclass
class CheckedRow:
    """A row that prepares cleanly, with what the sampler and the summary need."""

    row: EditRow
    img_shapes: list[list[int]]  # packed token grids [1, h, w] of its target and controls, as its encoded row's
    cropped: float  # largest share of one of its images removed by the crop
    composited: list[str] = field(default_factory=list)  # its images with transparency put over the background

    @property
    def tokens(self) -> int:
        """Image tokens: target and every control."""
        return sum(math.prod(grid) for grid in self.img_shapes)


@dataclass
class DataReport:
    """What happened to the rows of a data set (merge reports of several processes with `+`)."""

    rows: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample_id, reason)
    without_control: list[str] = field(default_factory=list)
    cropped: list[tuple[str, float]] = field(default_factory=list)  # (sample_id, share) above CROP_REPORT_SHARE
    composited: list[str] = field(default_factory=list)  # "sample_id (image)" of images with transparent pixels

    @property
    def used(self) -> int:
        """Rows that will be cached or trained on."""
        return self.rows - len(self.skipped)

    def __add__(self, other: DataReport) -> DataReport:
        """The report of both sets of rows."""
        return DataReport(
            self.rows + other.rows,
            self.skipped + other.skipped,
            self.without_control + other.without_control,
            self.cropped + other.cropped,
            self.composited + other.composited,
        )

    def log(self, where: str) -> None:
        """INFO summary line, one WARNING per skipped row, one WARNING naming big crops (on the main process)."""
        if not PartialState().is_main_process:
            return
        logger.info(
            f"{where}: {self.rows} rows, {self.used} rows used, {len(self.skipped)} skipped, "
            f"{len(self.without_control)} without control image{_named(self.without_control, ' ({})')}, "
            f"{len(self.cropped)} cropped by more than {CROP_REPORT_SHARE:.0%} of an image"
        )
        for sample_id, reason in self.skipped:
            logger.warning(f"skipped {sample_id}: {reason}")
        self.log_composited()
        if self.cropped:
            named = ", ".join(f"{s} ({share:.0%})" for s, share in sorted(self.cropped)[:_LISTED])
            more = f" and {len(self.cropped) - _LISTED} more" if len(self.cropped) > _LISTED else ""
            logger.warning(
                f"{len(self.cropped)} row(s) had an image cropped by more than {CROP_REPORT_SHARE:.0%} of its area "
                f"(--max_aspect_ratio or --resolution): {named}{more}"
            )

    def log_composited(self) -> None:
        """One WARNING naming the images whose transparent pixels were composited over white (main process)."""
        if self.composited and PartialState().is_main_process:
            logger.warning(
                f"{len(self.composited)} image(s) have transparent pixels, trained as composited over white (your "
                f"files are unchanged; composite them over white at inference too): {_named(self.composited)}"
            )

    def require_rows(self, where: str) -> None:
        """UserError when no row is usable (an empty data set is a failure, not a success with 0 rows)."""
        if self.used < 1:
            first = f"; first: {self.skipped[0][1]}" if self.skipped else ""
            raise UserError(f"{where}: no usable rows ({self.rows} rows, {len(self.skipped)} skipped{first})")


def _named(sample_ids: list[str], template: str = "{}") -> str:
    """The first `_LISTED` ids, comma-separated, "and N more" after them, put into `template`; "" for none."""
    if not sample_ids:
        return ""
    more = f" and {len(sample_ids) - _LISTED} more" if len(sample_ids) > _LISTED else ""
    return template.format(", ".join(sample_ids[:_LISTED]) + more)


def check_target_only(rows: list[EditRow], allow_target_only: bool, where: str) -> None:
    """UserError naming the rows without a control image when other rows have one (a forgotten stem_control.png
    would otherwise train on its target alone, unseen), unless --allow_target_only says they are meant so.
    Listing is enough: nothing is decoded. A data set with no control image at all (text-to-image) passes."""
    missing = [row.sample_id for row in rows if not row.controls]
    if allow_target_only or not missing or len(missing) == len(rows):
        return
    raise UserError(
        f"{where}: {len(missing)} of {len(rows)} rows have no control image while the others have one: "
        f"{_named(missing)}; add their control images (folder layout: stem_control.png), or pass "
        "--allow_target_only to train them on their target alone"
    )


def _img_shapes(sample: PreparedSample) -> list[list[int]]:
    """Packed token grids [1, h, w] of a prepared sample's target and controls."""
    return [[1, *token_grid(*image.shape[1:])] for image in [sample.target, *sample.controls]]


def validate_rows(
    rows: list[EditRow], model: EditModel | str, policy: ResolutionPolicy, *, skip_bad_samples: bool
) -> tuple[list[CheckedRow], DataReport]:
    """Prepare every row as for encoding (the decoded images are dropped at once): the rows that passed, and the
    report; without skip_bad_samples the first bad row raises its BadSampleError."""

    def check(row: EditRow) -> CheckedRow:
        sample = prepare_sample(row, model, policy)
        return CheckedRow(row, _img_shapes(sample), sample.cropped, sample.composited)

    checked, skipped = prepare_all(rows, check, skip_bad_samples=skip_bad_samples)
    report = DataReport(
        rows=len(rows),
        skipped=skipped,
        without_control=[c.row.sample_id for c in checked if not c.row.controls],
        cropped=[(c.row.sample_id, c.cropped) for c in checked if c.cropped > CROP_REPORT_SHARE],
        composited=[f"{c.row.sample_id} ({what})" for c in checked for what in c.composited],
    )
    return checked, report
