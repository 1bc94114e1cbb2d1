"""Time the attention kernels (split + merge, CUDA-graph replays) at the 8B shapes for launch configurations other
than the default (``Launch``: keys per tile, warps, pipeline stages, merge rows per program), at batch 1 and 8,
verify and draft, several split counts; each output compared with the default configuration's. Issue #14's batch-1
lever: the kernel runs at ~5x its K/V floor (27.6 us vs 5.6 us, H100), and each program has only a few tiles of
keys, so the pipeline's prologue and the register footprint of a [128, 128] fp32 accumulator are the suspects.

    python scripts/sweep_attention_launch.py --out $OUT/attention-launch.json
    python scripts/sweep_attention_launch.py --merge-only --out m.json    # merge rows only, ~1 min
    TRITON_INTERPRET=1 python scripts/sweep_attention_launch.py --smoke    # the CPU: small shapes, no timings
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_attention_splits import inputs, setup, timed  # noqa: E402  (scripts/ is on sys.path when run as a script)

from orthrus_plugins.attention_common.kernel import DEFAULT_LAUNCH, Launch, attention  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--splits", default="4,8,16")
    ap.add_argument("--keys", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--merge-only", action="store_true", help="the default split launch, merge rows 4/8/16/32 only")
    a = ap.parse_args()
    dev, dtype, shape, g, header = setup(a.smoke, a.keys)
    _, _, d, blk, keys = shape
    split_configs = [Launch(block_n=bn, num_warps=w, num_stages=st) for bn, w, st in
                     itertools.product((32, 64, 128), (4, 8), (1, 2, 3))]
    if a.merge_only:
        split_configs = [DEFAULT_LAUNCH]
    if a.smoke:
        split_configs = split_configs[:3] + [Launch(block_n=128, num_warps=8, num_stages=2)]
    results = {**header, "rows": []}
    for rows in map(int, a.rows.split(",")):
        q, k, v, kc, vc, slots = inputs(rows, dev, dtype, shape, g)
        for causal, splits in itertools.product((True, False), map(int, a.splits.split(","))):
            lens = torch.full((rows,), keys - blk if causal else keys, device=dev, dtype=torch.int64)

            def run(launch):
                return attention(q, k, v, kc, vc, lens, 0, d ** -0.5, causal, splits=splits, slots=slots,
                                 launch=launch)
            ref = run(DEFAULT_LAUNCH).float()
            base_us = timed(lambda: run(DEFAULT_LAUNCH), a.reps)
            timings = []
            for launch in split_configs:
                try:
                    us = timed(lambda: run(launch), a.reps)
                    diff = float((run(launch).float() - ref).abs().max())
                except Exception as e:  # a configuration the compiler refuses (shared memory, registers)
                    us, diff = float("nan"), repr(e).splitlines()[0][:160]
                timings.append((launch, us, diff))
            best = min((t for t in timings if t[1] == t[1]), key=lambda t: t[1], default=(DEFAULT_LAUNCH, base_us, 0))
            for rows_m in (r for r in (4, 8, 16, 32) if r != best[0].merge_rows):  # merge rows per program, for
                # the best split configuration
                launch = Launch(best[0].block_n, best[0].num_warps, best[0].num_stages, rows_m)
                us = timed(lambda: run(launch), a.reps)
                timings.append((launch, us, float((run(launch).float() - ref).abs().max())))
            mode = "verify" if causal else "draft"
            for launch, us, diff in timings:
                results["rows"].append({"rows": rows, "mode": mode, "splits": splits, **launch.__dict__, "us": us,
                                        "default_us": base_us, "max_abs_diff_vs_default": diff})
            top = sorted((t for t in timings if t[1] == t[1]), key=lambda t: t[1])[:3]
            print(f"rows {rows} {mode:6s} splits {splits:2d}: default {base_us:7.1f} us; best " +
                  "; ".join(f"{t[1]:.1f} us {t[0]}" for t in top), flush=True)
            if a.out:  # after every group: a run cut short by its time limit keeps what it measured
                Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
