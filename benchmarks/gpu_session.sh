#!/usr/bin/env bash
# All GPU work of a session in one call, from the repository root of a GPU machine:
# build avfast._C, run the GPU tests (compiled Triton), run the benchmarks, and copy logs
# and results to $OUT (default ./gpu-out). Commit benchmarks/results/<device>/ afterwards.
#   bash benchmarks/gpu_session.sh [bench args, e.g. --level op]
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee "$OUT/build.log"
python3 -m pytest -q -m cuda -x tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
python3 benchmarks/bench_av_pair_attention.py "$@" 2>&1 | tee "$OUT/bench.log" | tail -40
python3 benchmarks/bench_blockwise_infonce.py "$@" 2>&1 | tee "$OUT/bench-infonce.log" | tail -40
python3 benchmarks/bench_av_adapter.py "$@" 2>&1 | tee "$OUT/bench-av-adapter.log" | tail -40
python3 -m avfast bench train-step 2>&1 | tee "$OUT/bench-train-step.log" | tail -40
# the data benchmark needs DALI, carried in parts (../shared/tools/device-wheels/README.md)
if python3 -c "import nvidia.dali" 2>/dev/null; then
    python3 -m avfast bench data --cache /tmp/avfast-bench-data 2>&1 | tee "$OUT/bench-data.log" | tail -20
else
    echo "DALI not installed: skipped avfast bench data" | tee "$OUT/bench-data.log"
fi
for f in benchmarks/results/*/av_pair_attention.* benchmarks/results/*/blockwise_infonce.* benchmarks/results/*/av_adapter.* \
         benchmarks/results/*/train_step.* benchmarks/results/*/data_pipeline.*; do
    case "$f" in *-quick/*) ;; *) cp "$f" "$OUT/";; esac
done
ls -l "$OUT"
