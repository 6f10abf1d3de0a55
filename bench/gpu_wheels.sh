#!/usr/bin/env bash
# Fetch / build into .whl/ (git-ignored) the wheels the GPU machine lacks, for CPython 3.12 manylinux x86_64.
#
#   bash bench/gpu_wheels.sh            # run here (the CPU machine, which reaches PyPI), from the repo root
#
# The GPU machine (Python 3.12, torch 2.11 cu130, no registry access) has torch, numpy, transformers, tokenizers,
# sentencepiece, safetensors, pyyaml, xxhash, einops, msgpack, ninja, psutil, py-cpuinfo, tqdm, packaging, pytest,
# triton, but not megatron-core, deepspeed, hjson or pydantic (and pydantic needs a newer typing-extensions than it
# may have). Our own code travels as the working tree (PYTHONPATH=.), not as a wheel. bench/gpu_check.sh installs
# .whl/*.whl into /tmp/site there. Versions follow pyproject.toml; one version of each (two break the install).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.whl
rm -rf "$DEST" && mkdir -p "$DEST"

# Binary wheels for the target interpreter / platform (the device README's recipe).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" \
    megatron-core==0.16.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0 hjson==3.1.0

# DeepSpeed is an sdist on PyPI: build a pure-Python wheel (no compiled ops; they JIT-build where used, and the
# trainer uses none of them). No build isolation: its setup.py imports torch, which the venv has.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$DEST" deepspeed==0.19.8

ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1
