"""Measure the trained ``tiny`` model with the project's runtime (CPU, fp32, greedy) on its held-out prompts and
write ``eval.json`` and the model card (README.md) into the model folder.

    python scripts/eval_tiny.py [--model tiny] [--max-new-tokens 128]

Reports acceptance length (tokens per cycle) and TPF (tokens per forward pass), token-weighted and per prompt, and
checks that every Orthrus output equals the engine's AR output and transformers' generate.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orthrus_export.builder import build  # noqa: E402
from orthrus_export.checkpoint import open_checkpoint  # noqa: E402
from orthrus_export.reference import Reference  # noqa: E402
from orthrus_runtime import Engine  # noqa: E402

# the configuration the regression test (tests/test_tiny_model.py) uses
TEST_PROMPTS, TEST_NEW_TOKENS = 24, 64


def measure(engine, ref, prompts, max_new_tokens):
    rows = []
    for p in prompts:
        ids = engine.encode(p["text"])
        r = engine.generate(ids, max_new_tokens=max_new_tokens)
        ar = engine.generate(ids, max_new_tokens=max_new_tokens, use_drafts=False)
        hf = ref.generate_ar(ids, max_new_tokens) if ref is not None else None
        rows.append({"file": p["file"], "prompt_tokens": len(ids), "new_tokens": len(r.output_ids),
                     "cycles": r.stats.cycles, "cycle_tokens": r.stats.cycle_tokens,
                     "passes": r.stats.draft_passes + r.stats.verify_passes,
                     "acceptance_length": r.stats.acceptance_length, "tpf": r.stats.tpf,
                     "equals_engine_ar": r.output_ids == ar.output_ids,
                     "equals_transformers": None if hf is None else r.output_ids == hf})
    tokens = sum(r["cycle_tokens"] for r in rows)
    return {
        "prompts": len(rows), "max_new_tokens": max_new_tokens,
        "acceptance_length_token_weighted": tokens / sum(r["cycles"] for r in rows),
        "acceptance_length_per_prompt_mean": sum(r["acceptance_length"] for r in rows) / len(rows),
        "tpf_token_weighted": tokens / sum(r["passes"] for r in rows),
        "tpf_per_prompt_mean": sum(r["tpf"] for r in rows) / len(rows),
        "all_equal_engine_ar": all(r["equals_engine_ar"] for r in rows),
        "all_equal_transformers": all(r["equals_transformers"] for r in rows) if ref is not None else None,
        "rows": rows}


def card(folder: Path, log: dict, data: dict, ev: dict) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    full, test = ev["full"], ev["test"]
    size_mb = sum(f.stat().st_size for f in folder.glob("model-*.safetensors")) / 1e6
    return f"""# tiny — a small Orthrus-Qwen3 trained for this project

The embedded default model (`--model tiny`). Trained by
`python scripts/train_tiny.py --out DIR --lm-seconds 150 --diff-seconds 250` on one {log['device']}
({log['total_seconds']:.0f} s wall-clock, torch {log['torch']}), fixed seed 0; stage lengths are wall-clock
budgets, so step counts (below) can differ slightly between runs; the kept weights are those with the best
held-out loss. Measured by `scripts/eval_tiny.py` with this project's runtime
(CPU engine, fp32, greedy).

## Model

Qwen3 layout: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} query /
{cfg['num_key_value_heads']} KV heads of {cfg['head_dim']}, MLP {cfg['intermediate_size']}, vocabulary
{cfg['vocab_size']} (byte-level BPE trained on the training files), tied `lm_head`, block size {cfg['block_size']},
mask token {cfg['mask_token_id']}. {log['params']['total'] / 1e6:.2f} M parameters, of which the diffusion set is
{log['params']['diffusion_set'] / 1e6:.2f} M ({100 * log['params']['diffusion_set'] / log['params']['total']:.0f}%).
Weights bf16, {size_mb:.1f} MB in two safetensors shards; the folder is in the published Orthrus-Qwen3 layout.

## Data

{data['source']}, Python {data['python']}: {len(data['train_files'])} training files
({data['train_bytes'] / 1e6:.1f} MB, {data['train_tokens'] / 1e6:.2f} M tokens) and {len(data['heldout_files'])}
held-out files ({data['heldout_bytes'] / 1e6:.2f} MB); split: {data['split']}. Every file is listed in
`data_manifest.json`; `heldout_prompts.json` holds 96-token windows of the held-out files (the prompts below).

## Training

1. Base language model, all weights: {log['lm']['steps']} steps in {log['lm']['seconds']:.0f} s, batch 128 × 512
   tokens, AdamW (peak lr 3e-3, warm-up then cosine), bf16 autocast. Final training loss
   {log['lm']['curve'][-1][2]:.3f}; held-out cross-entropy {log['heldout_lm_loss']:.3f} nats/token.
2. Diffusion set only (`*_proj_diff`, `*_norm_diff`, initialised from the AR set; everything else frozen):
   {log['diffusion']['steps']} steps in {log['diffusion']['seconds']:.0f} s, KL(AR ‖ draft) on blocks of 32 with the
   Orthrus training mask (block positions see the AR keys/values before their anchor and their own block
   bidirectionally; input `[x_anchor, M, …, M]`; single-step denoising). Final training KL
   {log['diffusion']['curve'][-1][2]:.3f}; held-out KL {log['heldout_kl']:.3f}.

![loss curves](loss_curves.png)

## Measured acceptance (held-out prompts, greedy)

| prompts | new tokens | acceptance length (token-weighted / per-prompt mean) | TPF (token-weighted / per-prompt) |
|---|---|---|---|
| {full['prompts']} | ≤ {full['max_new_tokens']} | {full['acceptance_length_token_weighted']:.2f} / {full['acceptance_length_per_prompt_mean']:.2f} | {full['tpf_token_weighted']:.2f} / {full['tpf_per_prompt_mean']:.2f} |
| {test['prompts']} (test set) | ≤ {test['max_new_tokens']} | {test['acceptance_length_token_weighted']:.2f} / {test['acceptance_length_per_prompt_mean']:.2f} | {test['tpf_token_weighted']:.2f} / {test['tpf_per_prompt_mean']:.2f} |

Target was acceptance length ≥ 4 on held-out code: **not reached** token-weighted ({full['acceptance_length_token_weighted']:.2f});
the per-prompt mean passes it because prompts whose continuation settles into a repeating pattern accept whole
blocks. The limit is the data: {data['train_tokens'] / 1e6:.1f} M tokens of standard library (the training machine's
Python ships no test suite), on which the base model overfits after ~{log['lm']['best_step']} steps (held-out
cross-entropy {log['heldout_lm_loss']:.2f} nats/token). A self-distillation variant (`--gen-seconds 90`) drafted
worse (2.14 on the test prompts). Orthrus output equals the engine's AR output on every prompt:
{full['all_equal_engine_ar']}; equals `transformers` `generate`: {full['all_equal_transformers']}.
Measured {ev['date']} on {ev['host']} in {ev['seconds']:.0f} s.
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--card-only", action="store_true", help="rewrite README.md from the existing eval.json")
    a = ap.parse_args()
    ckpt = open_checkpoint(a.model)
    folder = ckpt.path
    if a.card_only:
        ev = json.loads((folder / "eval.json").read_text())
        log = json.loads((folder / "train_log.json").read_text())
        data = json.loads((folder / "data_manifest.json").read_text())
        (folder / "README.md").write_text(card(folder, log, data, ev))
        return
    prompts = json.loads((folder / "heldout_prompts.json").read_text())
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine.load(build(a.model, out=Path(tmp) / "e", max_seq_len=512, progress=False))
        ref = Reference(ckpt)
        full = measure(engine, ref, prompts, a.max_new_tokens)
        test = measure(engine, None, prompts[:TEST_PROMPTS], TEST_NEW_TOKENS)
    import platform
    ev = {"full": full, "test": test, "seconds": time.time() - t0, "host": platform.processor() or "cpu",
          "date": time.strftime("%Y-%m-%d")}
    (folder / "eval.json").write_text(json.dumps(ev, indent=1))
    log = json.loads((folder / "train_log.json").read_text())
    data = json.loads((folder / "data_manifest.json").read_text())
    (folder / "README.md").write_text(card(folder, log, data, ev))
    for name, r in (("full", full), ("test", test)):
        print(f"{name}: {r['prompts']} prompts, acceptance length {r['acceptance_length_token_weighted']:.2f} "
              f"(per prompt {r['acceptance_length_per_prompt_mean']:.2f}), TPF {r['tpf_token_weighted']:.2f}, "
              f"equal to AR: {r['all_equal_engine_ar']}")


if __name__ == "__main__":
    main()
