#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has torch 2.11, transformers 5.17, accelerate, peft, safetensors, pyarrow, pandas,
# xxhash, fsspec, zipp, pytest, but no diffusers or datasets), saved to .whl/ (git-ignored, about 7 MB) to be carried
# there: diffusers and importlib_metadata for everything; datasets and dill, multiprocess, lazy-importer for the
# CUDA trainer tests (the cache is a datasets Arrow table). Pure-Python wheels, for the machine's Python 3.12.
# Usage: bash bench/fetch_wheels.sh   (then see README.md, "Benchmarks", for the device command)
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 importlib_metadata==10.2.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 lazy-importer==0.1.0
ls -l .whl
