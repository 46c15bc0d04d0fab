#!/usr/bin/env bash
# Fetch, here (where pip reaches PyPI), the wheels the GPU machine lacks, into .whl/ at the
# repository root (ignored by git; the device tool carries it). The GPU image has torch 2.11,
# triton 3.6, numpy, safetensors, sentencepiece, tiktoken, pyyaml, requests, pillow and attrs;
# it needs our wire stubs' protobuf/grpcio, msgspec, mistral-common and their needs.
# Python 3.12, x86-64 manylinux: the GPU machine's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS=(
  msgspec==0.23.0 protobuf==7.36.2 grpcio==1.85.3 opentelemetry-api==1.45.2 typing-extensions==4.16.0
  mistral-common==1.13.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  pydantic-extra-types==2.11.1 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
  rpds-py==2026.9.1
)
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
du -sh .whl && ls .whl
