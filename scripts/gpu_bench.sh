#!/usr/bin/env bash
# One device session: the GPU benchmarks (python -m refimpl.bench) and the CUDA tests.
# Usage on a CUDA machine: OUT=results/bench bash scripts/gpu_bench.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 TORCH_LOGS="perf_hints"
OUT=${OUT:?set OUT to the folder for the results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/nvidia_smi.csv"
start=$(date +%s)
timeout 400 python3 -m refimpl.bench --device cuda --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
echo "bench exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py tests/test_bench.py 2>&1 | tail -15 | tee "$OUT/pytest.log"
echo "total $(( $(date +%s) - start )) s"
