"""The whole greedy cycle at a published shape (random weights, traced programs), for every attention option the
autotuner could choose: key-range splits × query blocks, at batch 1 and a batched size, one CUDA-graph replay each
(median, CUDA events), all in one run on one engine. This is the autotuner itself (``orthrus_export.autotune``)
given more candidates than a build tries, so its figures say which candidates a build should try.

    python scripts/sweep_attention_options.py --shape 8b --context 4096 --batches 1,8 \
        --splits 4,8,16,32 --query-blocks 0,16,32 --out $OUT/sweep-8b.json
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orthrus_export.autotune import autotune  # noqa: E402
from orthrus_export.bench import build_random, copy_bandwidth  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--splits", default="4,8,16,32")
    ap.add_argument("--query-blocks", default="0,16,32")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    batches = ints(a.batches)
    bw = copy_bandwidth(torch.device("cuda"))
    cfg, engine, export_s, load_s, _ = build_random(a.shape, torch.bfloat16, a.context, max_batch_size=max(batches))
    print(f"qwen3-{a.shape}: traced {export_s:.1f} s, captured {load_s:.1f} s; copy bandwidth {bw / 1e9:.0f} GB/s",
          flush=True)
    engine, record = autotune(engine, ["none"], [a.context], a.iters, ints(a.splits), lambda m: print(m, flush=True),
                              query_blocks=ints(a.query_blocks), batches=batches)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": a.shape,
              "context": a.context, "copy_bandwidth_GBps": bw / 1e9, "tuning": record}
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    engine.close()
    best = min(record["candidates"], key=lambda c: sum(c["cycle_ms"]))
    print(f"best: splits {best['attention_splits']} query block {best['attention_query_block']}: "
          + ", ".join(f"{m:.3f} ms x{b}" for m, (_, b) in zip(best["cycle_ms"], record["points"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
