"""What the user sees when something goes wrong: one line for their mistakes, a traceback for our bugs.

A `UserError` is a mistake the user can fix (a flag out of range, a missing file, a bad row, a cache built with
other settings): the scripts' entry point (`run_script`) prints its message as one line and exits with status 2,
without a traceback. Ctrl-C is one line too (`Interrupted`: where training stopped, how to resume), status 130.
Anything else is a bug and keeps its traceback. Under `accelerate launch`, accelerate itself adds a
`CalledProcessError` traceback for any failed child; `accelerate launch -q` hides it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a program stopped by Ctrl-C


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler writing to whatever sys.stderr is at the time (redirections and test capture see it)."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write the record to the current sys.stderr."""
        self.stream = sys.stderr
        super().emit(record)


_HANDLER = _StderrHandler()
_HANDLER.setFormatter(logging.Formatter("%(levelname)s %(message)s"))


class UserError(ValueError):
    """A mistake in the user's flags, files or data; its message names the flag, file or row and how to fix it."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while training; the message says where the run stopped and how to resume it."""


def run_script(main: Callable[[], T]) -> T:
    """Run a script's main: a UserError becomes one line on stderr and exit status 2, Ctrl-C one line (on rank 0)
    and status 130, without a traceback; other errors propagate."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        return main()
    except UserError as error:
        prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{prefix}error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt as interrupt:  # every rank gets the terminal's SIGINT: rank 0 speaks for all
        if rank == 0:
            said = str(interrupt) if isinstance(interrupt, Interrupted) else "(Ctrl-C)"
            print(f"\ninterrupted: {said}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)


# Library warnings about code paths this project never takes, dropped so that a run's first lines are its own:
# bitsandbytes (0.50, imported by peft and diffusers) warns at import, on CPUs with AVX512-BF16 (GPU hosts too), that
# its optional CPU nf4 kernel (the `kernels` hub package) is missing; nf4 here runs only on CUDA, and is refused
# elsewhere. {logger name: message prefix}
IRRELEVANT_LIBRARY_WARNINGS = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward"}


def drop_irrelevant_library_warnings() -> None:
    """Filter IRRELEVANT_LIBRARY_WARNINGS out of their loggers; other records of those loggers still pass. Must run
    before the library is imported (common/__init__.py runs it), since the warning comes at import."""
    for name, prefix in IRRELEVANT_LIBRARY_WARNINGS.items():
        logging.getLogger(name).addFilter(lambda record, p=prefix: not record.getMessage().startswith(p))


def configure_logging(quiet: bool = False) -> None:
    """INFO lines of this project's loggers on stderr (WARNING with quiet); library loggers are left as they are.

    accelerate's `get_logger` adapters filter by process themselves, so main-process-only lines stay on rank 0.
    """
    for name in ("common", "__main__", "precompute_cache"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING if quiet else logging.INFO)
        if _HANDLER not in logger.handlers:
            logger.addHandler(_HANDLER)
