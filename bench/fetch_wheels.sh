#!/usr/bin/env bash
# What the GPU machine lacks (it has Python 3.12, torch 2.11 cu130, transformers 5.17, accelerate, peft, safetensors,
# pillow, matplotlib, pyarrow, pandas, xxhash, fsspec, pytest; no diffusers, datasets, bitsandbytes or wandb),
# installed for its Python into .gpu_site/ (git-ignored) to be carried there and put on PYTHONPATH: diffusers and
# importlib_metadata for everything; datasets and dill, multiprocess, lazy-importer for the CUDA trainer tests and
# the trainers (the cache is a datasets Arrow table); bitsandbytes for nf4/int8, whose wheel ships a library per CUDA
# build (about 125 MB unpacked): only its CUDA 13 one (torch cu130) and the CPU one are kept, so the folder stays
# far below the 64 MiB a device call can carry. Prints the folder's size.
# Usage: bash bench/fetch_wheels.sh   (then see README.md, "Benchmarks", for the device command)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
rm -rf .gpu_site
"$PYTHON" -m pip install -q --target .gpu_site --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  diffusers==0.42.1 importlib_metadata==10.2.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  lazy-importer==0.1.0 bitsandbytes==0.50.2
find .gpu_site/bitsandbytes -maxdepth 1 -name 'libbitsandbytes_*.so' \
  ! -name 'libbitsandbytes_cuda130.so' ! -name 'libbitsandbytes_cpu.so' -delete
rm -rf .gpu_site/bin  # console scripts for this machine's interpreter; nothing runs them there
du -sh .gpu_site
