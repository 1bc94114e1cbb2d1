#!/usr/bin/env bash
# This session's GPU work in one background job (started with setsid by the device call, polled by later calls):
# the GPU tests, then the user's-path benchmark at the 1.7B and 8B shapes. Results under $RESULTS.
set -u
R=${RESULTS:-/tmp/gpu-results}
mkdir -p "$R"
export PYTHONUNBUFFERED=1
# the interpreter that holds torch (a bare `pip` there belongs to another one)
python -m pip install --no-deps --no-build-isolation . > "$R/install.log" 2>&1 || { echo "install failed" > "$R/done"; exit 1; }
python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -W ignore::FutureWarning > "$R/gpu-tests.log" 2>&1
python scripts/bench_load.py --shapes ${SHAPES:-1.7b,8b} --work /tmp/orthrus-load --out "$R/load.json" > "$R/load.log" 2>&1
echo finished > "$R/done"
