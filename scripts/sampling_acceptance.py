"""Acceptance of sampled requests: drafts sampled from the diffusion distribution (q = the draft distribution) vs
drafts taken as its argmax with a one-hot draft distribution (q = δ(d)). Both keep the output distributed exactly as
the base model's (speculative rejection sampling); only how many drafts are accepted differs.

    python scripts/sampling_acceptance.py --engine engines/orthrus-qwen3-tiny.cpu.fp32 --out benchmarks/cpu-sampling-acceptance.json

Held-out prompts of the trained ``tiny`` (real drafts), several seeds each, at each temperature with the published
top-k 20 / top-p 0.95 filter; all requests of a setting are submitted at once (in-flight batching). Reports the
token-weighted acceptance length (tokens per cycle) per mode and temperature.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from orthrus_export.checkpoint import TINY_DIR
    from orthrus_runtime import Engine
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", required=True)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--temperatures", default="0.6,1.0")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out")
    a = ap.parse_args()
    heldout = json.loads((TINY_DIR / "heldout_prompts.json").read_text())[:a.prompts]
    report = {"engine": Path(a.engine).name, "prompts": a.prompts, "seeds": a.seeds, "top_k": 20, "top_p": 0.95,
              "max_new_tokens": a.max_new_tokens, "results": []}
    for mode in ("argmax", "sample"):
        engine = Engine.load(a.engine, draft_sampling=mode, max_queue=1024)
        prompts = [engine.encode(p["text"]) for p in heldout]
        for t in [float(x) for x in a.temperatures.split(",")]:
            handles = [engine.submit(p, max_new_tokens=a.max_new_tokens, temperature=t, top_k=20, top_p=0.95,
                                     seed=s) for p in prompts for s in range(a.seeds)]
            for h in handles:
                h.wait()
            cycles = sum(h.stats.cycles for h in handles)
            tokens = sum(h.stats.cycle_tokens for h in handles)
            row = {"draft_sampling": mode, "temperature": t, "requests": len(handles), "cycles": cycles,
                   "acceptance_length": tokens / cycles}
            report["results"].append(row)
            print(f"{mode:>6} drafts, T {t}: acceptance length {row['acceptance_length']:.3f} "
                  f"({tokens} tokens / {cycles} cycles)", flush=True)
        engine.close()
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
