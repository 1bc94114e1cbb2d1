#!/usr/bin/env bash
# Batch-1 cycle of an earlier commit's runtime (8B shape, random weights, bf16, Inductor, 4k), to compare with today's
# in the same GPU session ("batch 1 must not get slower").
#   here (with git):      bash scripts/bench_old_b1.sh prepare a59540b   -> ./oldref (untracked; delete after)
#   on the GPU machine:   bash scripts/bench_old_b1.sh run
set -eu
case "${1:-}" in
prepare)
  rm -rf oldref && mkdir oldref
  git archive "${2:?commit}" pyproject.toml orthrus_export plugins runtime | tar -x -C oldref
  rm -rf oldref/orthrus_export/assets/*  # the embedded model is not needed for random weights
  ;;
run)
  python -m pip install --no-deps --no-build-isolation --target /tmp/oldpkgs ./oldref > /tmp/oldpip.log 2>&1
  cd /tmp && PYTHONPATH=/tmp/oldpkgs python - <<'PY'
import torch, orthrus_export
print("old package at", orthrus_export.__file__)
from orthrus_export.bench import build_random
cfg, e, ex, ld, _ = build_random("8b", torch.bfloat16, 4096, compile=True)
for k in ("cycle", "decode"):
    print(f"OLD b1 {k} {e.time_step(k, 4096, 30):.3f} ms", flush=True)
PY
  ;;
*) echo "usage: bench_old_b1.sh prepare COMMIT | run" >&2; exit 2 ;;
esac
