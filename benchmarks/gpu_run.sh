#!/usr/bin/env bash
# Run ON the lent GPU machine, after `benchmarks/gpu_prepare.sh` here and with `carry: [".device"]`:
#
#   bash benchmarks/gpu_run.sh train   # benchmarks.gpu_train_bench: 1.39B Llama, 8x1024, bf16 (~2-3 min)
#   bash benchmarks/gpu_run.sh tofu    # benchmarks.tofu_bench --scale gpu: full TOFU, 3 splits (<= 10 min)
#
# Further arguments go to the benchmark (e.g. `tofu --scale gpu-forget10` for one split). The
# benchmark is stopped after LIMIT_S seconds (default 540, inside the device's 600 s per command), so
# that whatever it finished (each TOFU split writes its results when done) is still packed.
# PYTHON (default python3) and NO_WHEELS=1 let the test suite run the same script on CPU
# (`gpu_run.sh train --tiny`).
#
# Installs the carried wheels, runs the benchmark and leaves its results in $OUT: the files the
# benchmark writes (JSON, Markdown, PNG) packed into one archive, because the device returns at most
# 8 files, plus the console log.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: gpu_run.sh train|tofu [benchmark arguments]}
shift
out=${OUT:?OUT is the folder the device machine returns}
py=${PYTHON:-python3}
if [ "${NO_WHEELS:-0}" != 1 ]; then
  test -d .device/whl || { echo "no .device/whl: run benchmarks/gpu_prepare.sh first and carry .device" >&2; exit 3; }
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
results=$(mktemp -d /tmp/results-"$what"-XXXX)
case "$what" in
  train) timeout "${LIMIT_S:-540}" "$py" -m benchmarks.gpu_train_bench --out-dir "$results" "$@" 2>&1 | tee "$out/gpu_train.log" ;;
  tofu) timeout "${LIMIT_S:-540}" "$py" -m benchmarks.tofu_bench --scale gpu --tofu-root .device/tofu --no-progress \
          --work-dir /tmp/tofu-work --out-dir "$results" "$@" 2>&1 | tee "$out/tofu_gpu.log" ;;
  *) echo "unknown benchmark $what (train|tofu)" >&2; exit 2 ;;
esac
status=${PIPESTATUS[0]}
tar -C "$results" -czf "$out/$what-results.tar.gz" .
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv"
exit "$status"
