#!/usr/bin/env bash
# This session's GPU work in one background job (started with setsid by the device call, polled by later calls).
# Results under $RESULTS, each step's log as it finishes.
set -u
R=${RESULTS:-/tmp/gpu-results}
mkdir -p "$R"
export PYTHONUNBUFFERED=1
# the interpreter that holds torch (a bare `pip` there belongs to another one)
python -m pip install --no-deps --no-build-isolation . > "$R/install.log" 2>&1 || { echo "install failed" > "$R/done"; exit 1; }
step() { echo "$(date +%T) $1" >> "$R/progress"; }
step "batch 8b inductor"
python scripts/bench_batch.py --shapes 8b --compile inductor --out "$R/batch-8b-inductor.json" > "$R/batch-8b-inductor.log" 2>&1
if [ -d oldref ]; then step "old b1 inductor"; bash scripts/bench_old_b1.sh run > "$R/old-b1-inductor.log" 2>&1; fi
step "tiny bf16 build"
orthrus-export build --model tiny --gpu auto --precision bf16 --out /tmp/tiny-bf16 --force --no-progress > "$R/tiny-build.log" 2>&1
step "invariance"
python scripts/batch_invariance.py --engine /tmp/tiny-bf16 --prompts 24 --out "$R/invariance-tiny-bf16.json" > "$R/invariance.log" 2>&1
step "serving"
python scripts/bench_serving.py --engine /tmp/tiny-bf16 --concurrency 1,4,8,16,32 --rate 20 --requests 64 --max-new-tokens 64 --out "$R/serving-tiny-gpu.json" > "$R/serving.log" 2>&1
step "gpu tests"
python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -W ignore::FutureWarning > "$R/gpu-tests.log" 2>&1
step "batch 1.7b inductor"
python scripts/bench_batch.py --shapes 1.7b,4b --compile inductor --out "$R/batch-1.7b-4b-inductor.json" > "$R/batch-1.7b-4b-inductor.log" 2>&1
echo finished > "$R/done"
