#!/usr/bin/env bash
# Train tiny on the GPU machine and bring the result back under $OUT (at most 8 files): the kept checkpoint's
# shards, the other recipe's shards (with --diff-data both), and everything else as one archive.
#   bash scripts/train_tiny_gpu.sh [train_tiny.py arguments]
set -uo pipefail
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/pip.log 2>&1
python3 -c "import orthrus_runtime" || { tail -3 /tmp/pip.log; exit 1; }
export PYTHONUNBUFFERED=1
rm -rf /tmp/tiny
python3 scripts/train_tiny.py --out /tmp/tiny "$@" 2>&1 | tee /tmp/train.log | grep -v "step [0-9]*[1-9]00 " 
cp /tmp/train.log "$OUT/train.log"
for f in /tmp/tiny/model-*.safetensors; do cp "$f" "$OUT/"; done
for d in /tmp/tiny/recipe-*; do [ -d "$d" ] && for f in "$d"/model-*.safetensors; do cp "$f" "$OUT/$(basename "$d")-$(basename "$f")"; done; done
tar czf "$OUT/tiny-rest.tgz" -C /tmp --exclude='*.safetensors' tiny
ls -la "$OUT"
