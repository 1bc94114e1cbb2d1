#!/usr/bin/env bash
# A GPU session's work as background jobs (started with setsid by one device call, polled by later calls).
# Results under $RESULTS, each step's log as it finishes; `collect`
# packs them into $OUT (at most 8 files).
#   setsid bash scripts/gpu_session.sh all &       # ~19 min: the launch sweep on an idle GPU (#14), then tiny
#                                                  # trained on two ways side by side (#15) with the GPU tests beside
#   bash scripts/gpu_session.sh collect            # in a later call, within 30 s of the last (the machine goes back)
# (`kernels` and `train` run the parts alone; SWEEP_S, DRAFTER_DIFF_S, BOTH_LM_S, BOTH_DIFF_S shorten them.)
# A training that survives the machine going back between calls: one call per part, each in the foreground,
#   DRAFTER_DIFF_S=420 bash scripts/gpu_session.sh part        # ~9 min: the drafter trained on, collected into $OUT
# then, on this machine, the returned shards + results.tgz's tiny-drafter/ files make a folder DIR (in a folder
# .git/info/exclude ignores, carried), and the next call runs INIT=DIR ... part.
# The next session's calls, each one foreground call that collects its own results into $OUT (most useful first):
#   bash scripts/gpu_session.sh profile     # in the background (setsid): the linear layers' tilings swept, then the
#                                           # compiled 8B cycle (bf16, fp8) by kind, on an idle GPU (#14) (TESTS=1:
#                                           # the GPU tests after); this call waits (at most AWAIT_S), then collects
#   AWAIT=profile bash scripts/gpu_session.sh await # the next call, at once: waits for the rest, then collects
#   bash scripts/gpu_session.sh tests       # ~6 min: the 28 GPU tests a shared GPU did not reach on 2026-12-06
#   DRAFTER_DIFF_S=420 bash scripts/gpu_session.sh part    # ~9 min: the shipped tiny's drafter trained on (#15)
# A training longer than one call (one learning-rate schedule over it), on a machine kept warm by calls in a row:
#   DRAFTER_DIFF_S=900 bash scripts/gpu_session.sh long    # starts it (setsid), runs the GPU tests meanwhile
#   bash scripts/gpu_session.sh await                      # the next call, at once: waits for it, then collects
# (TESTS=0: no GPU tests beside the training; the first call waits for it as `await` does)
# (CHAIN_PASSES=N: the drafter distilled towards the base's greedy chain in each block, train_tiny.py --chain-passes)
# The previous session's run (two tiny shapes trained side by side, the GPU tests, the batched 8B benchmark) is in
# git history (git log -- scripts/gpu_session.sh).
set -u
R=${RESULTS:-/tmp/gpu-results}
phase=${1:-}
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
python3 -c "import orthrus_export, orthrus_runtime" 2>/dev/null ||
  python3 -m pip install -q --no-deps --no-build-isolation -e . > "$R/install.log" 2>&1
python3 -c "import orthrus_runtime" || { echo "install failed" > "$R/done-$phase"; exit 1; }
sweep() {  # timings first, on an idle GPU
  step "attention launch configurations (tile, warps, stages, merge rows), batch 1 and 8"
  timeout "${SWEEP_S:-240}" python3 scripts/sweep_attention_launch.py --out "$R/attention-launch.json" \
    > "$R/attention-launch.log" 2>&1
  step "launch sweep rc $?"
}
kernel_tests_k() {  # the GPU tests that -k "$TESTS_K" selects
  step "GPU tests -k $TESTS_K"
  timeout "${TESTS_S:-400}" python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -W ignore::FutureWarning \
    -k "$TESTS_K" -rA > "$R/gpu-tests-k.log" 2>&1
  step "GPU tests -k rc $?"
}
kernel_tests() {  # no timings: may share the GPU
  step "the autotuner's and the profiler's GPU tests"
  timeout 300 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -W ignore::FutureWarning \
    -k "profile_step or autotune" > "$R/gpu-kernel-tests.log" 2>&1
  step "kernel tests rc $?"
}
train() {  # NAME ARGS...: --init-from tiny; if this machine's corpus is not tiny's, one fresh run (base + drafter)
  local name=$1; shift
  python3 scripts/train_tiny.py --out "$R/tiny-$name" --init-from "${INIT:-tiny}" "$@" > "$R/train-$name.log" 2>&1
  local rc=$?
  if [ "$name" = drafter ] && grep -q "is not the one" "$R/train-$name.log"; then
    step "train $name: corpus differs from tiny's, a fresh run instead"
    python3 scripts/train_tiny.py --out "$R/tiny-$name" --lm-seconds "${FRESH_LM_S:-330}" \
      --diff-seconds "${FRESH_DIFF_S:-390}" \
      > "$R/train-$name-fresh.log" 2>&1
    rc=$?
  fi
  step "train $name rc $rc"
}
trainings() {  # two ways of training on from the shipped checkpoint, side by side: drafter only / base, then drafter
  step "tiny trained on from the shipped checkpoint: drafter only / base then drafter, side by side"
  train drafter --lm-seconds 0 --diff-seconds "${DRAFTER_DIFF_S:-720}" --chain-passes "${CHAIN_PASSES:-0}" &
  [ "${ONE:-}" = 1 ] || { train both --lm-seconds "${BOTH_LM_S:-270}" --diff-seconds "${BOTH_DIFF_S:-450}" & }
  wait
}
linear_sweep() {  # timings: the fp8 (and bf16) GEMM's tilings against cuBLAS at the 8B projections (#14)
  step "linear layers: Triton GEMM tilings vs cuBLAS / _scaled_mm, 8B shapes, M = 32, 256, 1"
  timeout "${SWEEP_S:-300}" python3 scripts/sweep_linear.py --shapes "${SWEEP_SHAPES:-8b}" \
    --kinds "${SWEEP_KINDS:-fp8,bf16}" --out "$R/linear-sweep.json" > "$R/linear-sweep.log" 2>&1
  step "linear sweep rc $?"
}
profile() {  # timings: alone on the GPU; Inductor compiles the 8B engine for batch 1 and 8 first (> 270 s)
  step "compiled 8B cycle by kind, batch 1 and 8 (GEMM floor: bytes or FLOPs)"
  timeout "${PROFILE_S:-900}" python3 scripts/profile_gpu.py --shape 8b --context 4096 --batches 1,8 \
    --steps cycle --compile inductor --top 30 --out "$R/profile-8b-inductor.json" > "$R/profile-8b-inductor.log" 2>&1
  step "profile rc $?"
  step "compiled 8B FP8 cycle by kind, batch 1"
  timeout "${PROFILE_S:-900}" python3 scripts/profile_gpu.py --shape 8b --context 4096 --batches "${FP8_BATCHES:-1}" \
    --steps cycle --compile inductor --precision fp8 --top 30 --out "$R/profile-8b-fp8-inductor.json" \
    > "$R/profile-8b-fp8-inductor.log" 2>&1
  step "fp8 profile rc $?"
}
gpu_tests() {  # the 28 engine-level GPU tests (the 192 kernel tests before them passed on 2026-12-06)
  step "GPU tests: batched passes, exactness, graphs, per-engine kernel options, autotuner, fp8, profiler"
  timeout "${TESTS_S:-500}" python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
    -W ignore::FutureWarning -k "not test_triton_attention_matches_reference and not test_triton_batched_attention" \
    -rA > "$R/gpu-tests.log" 2>&1
  step "GPU tests rc $?"
}
case "$phase" in
  profile)  # the profile, then the GPU tests, in a new process session (they outlive this call)
    ( setsid nohup bash "$0" profile-bg > "$R/profile-bg.out" 2>&1 & )
    AWAIT=profile exec bash "$0" await ;;
  profile-bg) linear_sweep; profile; echo finished > "$R/done-profile"
    [ "${TESTS:-0}" = 1 ] && { gpu_tests; echo finished > "$R/done-tests"; }
    [ -n "${TESTS_K:-}" ] && { kernel_tests_k; echo finished > "$R/done-tests"; } ;;
  tests) gpu_tests; echo finished > "$R/done-$phase"; exec bash "$0" collect ;;
  kernels) sweep; kernel_tests ;;
  train) trainings ;;
  all) sweep; kernel_tests & trainings; wait ;;
  long)  # one long drafter training in a new process session (it outlives this call), the GPU tests meanwhile
    ( setsid nohup bash "$0" part-bg > "$R/part-bg.out" 2>&1 & )
    if [ "${TESTS:-1}" = 1 ]; then gpu_tests; exec bash "$0" collect; fi
    exec bash "$0" await ;;  # TESTS=0: the GPU left to the training, this call waits for it as `await` does
  part-bg) ONE=1 FRESH_LM_S=${FRESH_LM_S:-150} FRESH_DIFF_S=${FRESH_DIFF_S:-200} trainings ;;
  await)  # the next call, at once: waits for `long`'s training (AWAIT=profile|tests: for those) (at most AWAIT_S seconds), then collects
    for _ in $(seq "${AWAIT_S:-560}"); do [ -e "$R/done-${AWAIT:-part-bg}" ] && break; sleep 1; done
    exec bash "$0" collect ;;
  part) ONE=1 FRESH_LM_S=${FRESH_LM_S:-150} FRESH_DIFF_S=${FRESH_DIFF_S:-200} trainings; echo finished > "$R/done-$phase"; exec bash "$0" collect ;;
  *) echo "usage: gpu_session.sh profile|tests|long|await|part|all|kernels|train|collect" >&2; exit 2 ;;
esac
echo finished > "$R/done-$phase"
