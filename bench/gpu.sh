#!/usr/bin/env bash
# nanoseek's CUDA checks on a GPU machine, in one go: the CUDA tests (tests/cuda: forward vs CPU, bf16,
# grouped experts, the CUDA backend vs the reference, compiled CUDA-graph decode vs eager, training
# steps), then bench/gpu.py. On an H200 with empty compile caches the tests took 59 s, and the
# benchmark's default parts under 6.5 min, most of it Inductor compiling decode buckets (bench/RESULTS.md).
# Every part runs even if one before it
# fails; the logs go to $OUT (or ./gpu-logs). Uses the python that has a CUDA torch (PYTHON=...),
# with the repository on PYTHONPATH when nanoseek is not installed there.
#
#     bash bench/gpu.sh                      # tests, then the benchmark
#     bash bench/gpu.sh --lite-batches 1 8   # arguments go to bench/gpu.py
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-gpu-logs}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NANOSEEK_CACHE_DIR=${NANOSEEK_CACHE_DIR:-$(mktemp -d)}
status=0
{ nvidia-smi -L; $PYTHON -c 'import torch, sys; print(sys.version.split()[0], "torch", torch.__version__,
  "cuda", torch.version.cuda, torch.cuda.get_device_name())'; } 2>&1 | tee "$LOGS/env.txt"
t=$(date +%s)
$PYTHON -m pytest tests/cuda -m cuda -p no:cacheprovider -q -rfE --timeout=300 2>&1 | tee "$LOGS/tests.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "tests: $(( $(date +%s) - t )) s"
t=$(date +%s)
$PYTHON bench/gpu.py "$@" 2>&1 | tee "$LOGS/bench.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "bench: $(( $(date +%s) - t )) s"
exit $status
