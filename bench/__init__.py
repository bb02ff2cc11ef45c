"""Benchmarks and the GPU check, run as `python -m bench.X`. Importing `common` first installs its filter of
irrelevant library warnings (common/errors.py) before a bench module imports diffusers or peft, as in the scripts."""

import common  # noqa: F401
