#!/usr/bin/env bash
# The GPU benchmark in one call on a lent GPU machine (H100/H200, torch + triton installed,
# no network): install the wheels carried in .whl/ (made here by bench/gpu_wheels.sh), record
# the machine, run `python -m bench.gpu`, and leave everything under $OUT.
#
#   bash bench/gpu_wheels.sh                                    # here, once: ~18 MB into .whl/
#   device tool: run(command="bash bench/gpu_device_run.sh", carry=[".whl"], timeout_s=560)
#
# bench.gpu keeps to its --budget-s (sections past it are skipped, not cut mid-way) and the
# whole script to ~8 minutes, leaving room in a 15-minute device budget for one rerun.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "installing the carried wheels failed: run bench/gpu_wheels.sh here and carry .whl" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MOE_SERVE_CACHE=/tmp/moe-serve-cache
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import grpc, google.protobuf, mistral_common, msgspec, torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "grpc", grpc.__version__,
      "protobuf", google.protobuf.__version__, "msgspec", msgspec.__version__, "mistral_common", mistral_common.__version__)
print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
PY
timeout 520 python3 -m bench.gpu --out "$OUT/gpu.json" --budget-s 400 2>&1 | tee "$OUT/gpu.txt"
status=${PIPESTATUS[0]}
echo "bench.gpu exit status $status" | tee -a "$OUT/gpu.txt"
exit "$status"
