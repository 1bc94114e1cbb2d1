#!/usr/bin/env bash
# A GPU session's work as background jobs (started with setsid by one device call, polled by later calls).
# Results under $RESULTS, each step's log as it finishes; `collect`
# packs them into $OUT (at most 8 files).
#   setsid bash scripts/gpu_session.sh all &   # ~12 min: timings (#14), then two trainings (#15) + kernel tests
#   setsid bash scripts/gpu_session.sh kernels &   # the same without the trainings (~7 min)
#   bash scripts/gpu_session.sh collect        # in a later call
# The previous session's run (two tiny shapes trained side by side, the GPU tests, the batched 8B benchmark) is in
# git history (git log -- scripts/gpu_session.sh).
set -u
R=${RESULTS:-/tmp/gpu-results}
phase=${1:-all}
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
if [ "$phase" = all ] || [ "$phase" = kernels ]; then
  # timings first, on an idle GPU; then the two trainings side by side, and the kernel tests (no timings) beside them
  step "attention alone: splits x query blocks, batch 1-16"
  python3 scripts/bench_attention_splits.py --query-blocks 0,16,32,64 --rows 1,8,16 \
    --out "$R/attention-query-blocks.json" > "$R/attention-query-blocks.log" 2>&1
  step "attention bench rc $?"
  step "8B cycle (traced programs) for every splits x query block, batch 1 and 8"
  python3 scripts/sweep_attention_options.py --shape 8b --context 4096 --batches 1,8 --splits 4,8,16,32 \
    --query-blocks 0,16,32 --out "$R/sweep-8b.json" > "$R/sweep-8b.log" 2>&1
  step "sweep rc $?"
  a= b=
  if [ "$phase" = all ]; then
    step "tiny trained on from the shipped checkpoint, two ways side by side: drafter only / base then drafter"
    python3 scripts/train_tiny.py --out "$R/tiny-drafter" --init-from tiny --lm-seconds 0 --diff-seconds 300 \
      > "$R/train-drafter.log" 2>&1 &
    a=$!
    python3 scripts/train_tiny.py --out "$R/tiny-both" --init-from tiny --lm-seconds 120 --diff-seconds 180 \
      > "$R/train-both.log" 2>&1 &
    b=$!
  fi
  step "attention kernel tests (every query block) and the profiler's GPU test"
  python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -W ignore::FutureWarning \
    -k "triton_attention or triton_batched or profile_step or autotune" > "$R/gpu-kernel-tests.log" 2>&1
  step "kernel tests rc $?"
  [ -n "$a" ] && { wait $a; step "train drafter rc $?"; }
  [ -n "$b" ] && { wait $b; step "train both rc $?"; }
else
  echo "usage: gpu_session.sh all|kernels|collect" >&2
  exit 2
fi
echo finished > "$R/done-$phase"
