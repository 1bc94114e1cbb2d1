"""Batch invariance of greedy decoding: each held-out prompt run alone vs all of them at once (in-flight batching).

    python scripts/batch_invariance.py --engine engines/orthrus-qwen3-tiny.h200.bf16 --prompts 24 --out r.json

Reports how many outputs are identical alone and in the batch; for each that differs, the position of the first
difference and the fp32 ``transformers`` reference's margin there (top-1 minus top-2 logit after the common prefix):
a divergence at a near-tie is the rounding of a different batch arithmetic, anything else a bug.
"""

import argparse
import json
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch

    from orthrus_export.checkpoint import TINY_DIR, open_checkpoint
    from orthrus_export.reference import Reference
    from orthrus_runtime import Engine
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", required=True)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out")
    a = ap.parse_args()
    engine = Engine.load(a.engine)
    heldout = json.loads((TINY_DIR / "heldout_prompts.json").read_text())[:a.prompts]
    prompts = [engine.encode(p["text"]) for p in heldout]
    alone = [engine.generate(p, max_new_tokens=a.max_new_tokens).output_ids for p in prompts]
    batched: list = [None] * len(prompts)

    def run(i):
        batched[i] = engine.generate(prompts[i], max_new_tokens=a.max_new_tokens).output_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ref = Reference(open_checkpoint("tiny"))
    diverged = []
    for i, (x, y) in enumerate(zip(alone, batched)):
        if x == y:
            continue
        k = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        logits = ref.ar_pass(prompts[i] + x[:k], ref.new_cache())[-1].float()
        top = torch.topk(logits, 2).values
        diverged.append({"prompt": i, "position": k, "reference_margin": float(top[0] - top[1]),
                         "alone_token": x[k] if k < len(x) else None, "batched_token": y[k] if k < len(y) else None})
    report = {"engine": engine.path.name, "device": engine.manifest["gpu"]["device_name"],
              "precision": engine.manifest["precision"], "prompts": len(prompts),
              "max_new_tokens": a.max_new_tokens, "identical": len(prompts) - len(diverged), "diverged": diverged,
              "scheduler": engine.scheduler_stats()}
    print(f"{engine.path.name}: {report['identical']}/{len(prompts)} identical alone and batched; divergences: "
          + (", ".join(f"prompt {d['prompt']} at {d['position']} (margin {d['reference_margin']:.3f})"
                       for d in diverged) or "none"), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
