#!/usr/bin/env bash
# This session's GPU work in one background job (started with setsid by the device call, polled by later calls).
# Results under $RESULTS, each step's log as it finishes; `collect` packs them into $OUT (at most 8 files).
#   setsid bash scripts/gpu_session.sh run &   # then, in later calls: bash scripts/gpu_session.sh collect
set -u
R=${RESULTS:-/tmp/gpu-results}
if [ "${1:-run}" = collect ]; then
  # model shards travel one per file (16 MiB each at most); everything else as one archive
  for d in "$R"/tiny-*; do [ -d "$d" ] && for f in "$d"/model-*.safetensors; do
    cp "$f" "$OUT/$(basename "$d")-$(basename "$f")"; done; done
  tar czf "$OUT/results.tgz" -C "$R" --exclude='*.safetensors' .
  ls -la "$OUT"
  exit 0
fi
mkdir -p "$R"
export PYTHONUNBUFFERED=1
step() { echo "$(date +%T) $1" >> "$R/progress"; }
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$R/install.log" 2>&1
python3 -c "import orthrus_runtime" || { echo "install failed" > "$R/done"; exit 1; }
step "train A, train B, gpu tests (concurrently)"
# two shapes of tiny, trained side by side on the one GPU: 8 layers (the shipped shape) and 12 layers, both with
# position-decayed KL and a longer distillation
common=(--lm-seconds 270 --diff-seconds 420 --diff-data real --kl-decay 5)
python3 scripts/train_tiny.py --out "$R/tiny-a" "${common[@]}" --layers 8 > "$R/train-a.log" 2>&1 &
PA=$!
python3 scripts/train_tiny.py --out "$R/tiny-b" "${common[@]}" --layers 12 > "$R/train-b.log" 2>&1 &
PB=$!
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -W ignore::FutureWarning > "$R/gpu-tests.log" 2>&1 &
PT=$!
wait $PA; step "train A rc $?"
wait $PB; step "train B rc $?"
wait $PT; step "gpu tests rc $?"
step "batch 8b inductor"
python3 scripts/bench_batch.py --shapes 8b --compile inductor --out "$R/batch-8b-inductor.json" > "$R/batch-8b-inductor.log" 2>&1
step "bench rc $?"
echo finished > "$R/done"
