#!/usr/bin/env bash
# The next GPU session's work as background jobs (started with setsid by one device call, polled by later calls).
# Written without a GPU (2026-12-05): not run yet. Results under $RESULTS, each step's log as it finishes; `collect`
# packs them into $OUT (at most 8 files).
#   setsid bash scripts/gpu_session.sh kernels &   # issue 14: ~10 min, timings on an otherwise idle GPU
#   setsid bash scripts/gpu_session.sh train &     # issue 15: ~16 min, after `kernels` (it would disturb timings)
#   bash scripts/gpu_session.sh collect            # in a later call
# The previous session's run (two tiny shapes trained side by side, the GPU tests, the batched 8B benchmark) is in
# git history (git log -- scripts/gpu_session.sh).
set -u
R=${RESULTS:-/tmp/gpu-results}
phase=${1:-kernels}
if [ "$phase" = collect ]; then
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
python3 -c "import orthrus_runtime" || { echo "install failed" > "$R/done-$phase"; exit 1; }
if [ "$phase" = kernels ]; then
  step "attention kernel tests (every query block) and the profiler's GPU test"
  python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -W ignore::FutureWarning \
    -k "triton_attention or triton_batched or profile_step" > "$R/gpu-kernel-tests.log" 2>&1
  step "kernel tests rc $?"
  step "attention alone: splits x query blocks, batch 1-16"
  python3 scripts/bench_attention_splits.py --query-blocks 0,16,32,64 --out "$R/attention-query-blocks.json" \
    > "$R/attention-query-blocks.log" 2>&1
  step "attention bench rc $?"
  step "8B compiled cycle by kind (batch 1 and 8)"
  python3 scripts/profile_gpu.py --shape 8b --compile inductor --batches 1,8 --steps verify,draft,cycle \
    --out "$R/profile-8b-inductor.json" > "$R/profile-8b-inductor.log" 2>&1
  step "profile rc $?"
elif [ "$phase" = train ]; then
  step "tiny: base and drafter trained on from the shipped checkpoint (the whole GPU)"
  python3 scripts/train_tiny.py --out "$R/tiny-resumed" --init-from tiny --lm-seconds 300 --diff-seconds 540 \
    > "$R/train-resumed.log" 2>&1
  step "train rc $?"
else
  echo "usage: gpu_session.sh kernels|train|collect" >&2
  exit 2
fi
echo finished > "$R/done-$phase"
