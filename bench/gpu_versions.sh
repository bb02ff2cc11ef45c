#!/usr/bin/env bash
# The CPU suite (or any pytest selection) under the GPU machine's library versions: Python 3.12, torch 2.11.0,
# torchvision 0.26.0, transformers 5.17.0, tokenizers 0.23.2, huggingface_hub 1.33.0, numpy 2.5.2, peft 0.21.0; the
# rest as requirements.txt pins it (diffusers, datasets and bitsandbytes are what bench/fetch_wheels.sh carries
# there). A difference between those versions and ours then shows here, before device time is spent on it.
# Makes .gpu_venv/ once (git-ignored; about 5.4 GB, torch's CUDA wheels, which run on CPU; minutes to install).
# Usage: bash bench/gpu_versions.sh [pytest arguments]   (the whole suite: about 20 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_PINS=(torch==2.11.0 torchvision==0.26.0 transformers==5.17.0 tokenizers==0.23.2 huggingface_hub==1.33.0
  numpy==2.5.2 peft==0.21.0)
if [ ! -x .gpu_venv/bin/python ]; then
  "${PYTHON:-python3.12}" -m venv .gpu_venv
  .gpu_venv/bin/python -m pip install -q --upgrade pip
  names="$(printf '%s\n' "${GPU_PINS[@]}" | sed 's/==.*//' | paste -sd'|')"
  .gpu_venv/bin/python -m pip install -q "${GPU_PINS[@]}" \
    $(grep -E '^[A-Za-z]' requirements.txt | grep -v -i -E "^(${names})==")
fi
exec .gpu_venv/bin/python -m pytest -p no:cacheprovider "$@"
