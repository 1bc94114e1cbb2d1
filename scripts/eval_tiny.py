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
        rows.append({"package": p.get("package"), "file": p["file"], "prompt_tokens": len(ids),
                     "new_tokens": len(r.output_ids), "accepted_per_pos": r.stats.accepted_per_pos,
                     "cycles": r.stats.cycles, "cycle_tokens": r.stats.cycle_tokens,
                     "passes": r.stats.draft_passes + r.stats.verify_passes,
                     "acceptance_length": r.stats.acceptance_length, "tpf": r.stats.tpf,
                     "equals_engine_ar": r.output_ids == ar.output_ids,
                     "equals_transformers": None if hf is None else r.output_ids == hf})
    tokens, cycles = sum(r["cycle_tokens"] for r in rows), sum(r["cycles"] for r in rows)
    by_pkg = {}
    for r in rows:
        t = by_pkg.setdefault(r["package"], [0, 0])
        t[0] += r["cycle_tokens"]
        t[1] += r["cycles"]
    return {
        "prompts": len(rows), "max_new_tokens": max_new_tokens,
        "acceptance_length_token_weighted": tokens / cycles,
        # [i]: the share of cycles whose draft token i+1 was accepted
        "acceptance_by_position": [sum(r["accepted_per_pos"][i] for r in rows) / cycles
                                   for i in range(len(rows[0]["accepted_per_pos"]))],
        "acceptance_length_by_package": {k: a / b for k, (a, b) in sorted(by_pkg.items())},
        "acceptance_length_per_prompt_mean": sum(r["acceptance_length"] for r in rows) / len(rows),
        "tpf_token_weighted": tokens / sum(r["passes"] for r in rows),
        "tpf_per_prompt_mean": sum(r["tpf"] for r in rows) / len(rows),
        "all_equal_engine_ar": all(r["equals_engine_ar"] for r in rows),
        "all_equal_transformers": all(r["equals_transformers"] for r in rows) if ref is not None else None,
        "rows": rows}


def history(log: dict) -> list[dict]:
    """The training runs that made a checkpoint, oldest first (``train_tiny.py --init-from`` nests its start's log)."""
    parts = [log]
    while parts[-1].get("init_from"):
        parts.append(parts[-1]["init_from"]["log"])
    return parts[::-1]


def command(part: dict) -> str:
    a = part["args"]
    chain = f" --chain-passes {a['chain_passes']}" if a.get("chain_passes") else ""
    if part.get("init_from"):
        return (f"--init-from tiny --lm-seconds {a['lm_seconds']:.0f} --diff-seconds {a['diff_seconds']:.0f} "
                f"--kl-decay {a['kl_decay']:g}{chain}")
    return (f"--layers {a['layers']} --lm-seconds {a['lm_seconds']:.0f} --diff-seconds {a['diff_seconds']:.0f} "
            f"--diff-data {a['diff_data']} --kl-decay {a['kl_decay']:g}{chain}")


def later_part(n: int, p: dict) -> str:
    """Item ``n`` of the card's training list: a run that trained on from the checkpoint before it."""
    rec = p["recipes"][p["chosen_recipe"]]
    chain = p["args"].get("chain_passes")
    target = (f" KL targets along the base's own greedy chain in each block ({chain} Jacobi passes of the base from the "
              f"teacher-forced logits: block positions 0..{chain} exact, i.e. what a greedy verify accepts) instead of "
              "along the text;" if chain else "")
    return (f"\n{n}. Trained on from the checkpoint above (`{command(p)}`):{target} base {p['lm']['steps']} steps in "
            f"{p['lm']['seconds']:.0f} s (kept step {p['lm']['best_step']}; step 0 is the starting weights), "
            f"validation cross-entropy {p['val_lm_loss']:.3f}, held-out packages {p['heldout_lm_loss']:.3f}; diffusion "
            f"set from {'the checkpoint' if p.get('diff_init') == 'checkpoint' else 'the AR set'}: "
            f"{p['diffusion']['steps']} steps in {p['diffusion']['seconds']:.0f} s (kept step "
            f"{p['diffusion']['best_step']}), validation block acceptance {p['val_block_acceptance']:.2f}, simulated "
            f"acceptance {rec['val_simulated_acceptance']:.2f} (validation) / {rec['heldout_simulated_acceptance']:.2f} "
            "(held-out).")


def card(folder: Path, log: dict, data: dict, ev: dict) -> str:
    parts = history(log)
    first = parts[0]
    cfg = json.loads((folder / "config.json").read_text())
    full, test = ev["full"], ev["test"]
    size_mb = sum(f.stat().st_size for f in folder.glob("model-*.safetensors")) / 1e6
    pk = data["packages"]
    top = sorted((k for k in pk if pk[k]["split"] == "train"), key=lambda k: -pk[k]["tokens"])[:12]
    held = sorted(k for k in pk if pk[k]["split"] == "heldout")
    tot = data["totals"]
    args = first["args"]
    lm = first["lm"]
    base_steps = sum(p["lm"]["best_step"] for p in parts)
    tokens_seen = base_steps * args["batch"] * args["seq"]
    pos = full["acceptance_by_position"]
    prev = ev["previous_test"]
    rows = "\n".join(f"| {k} | {pk[k]['version']} | {pk[k]['files']} | {pk[k]['tokens'] / 1e6:.2f} |" for k in top)
    hrows = "\n".join(f"| {k} | {pk[k]['version']} | {pk[k]['files']} | {pk[k]['tokens'] / 1e6:.2f} | "
                      f"{full['acceptance_length_by_package'].get(k, float('nan')):.2f} |" for k in held)
    runs = first.get("compared_runs", [])
    run_rows = "\n".join(
        f"| {r['layers']} | {r['params'] / 1e6:.1f} | {r['lm_steps']} | {r['val_lm_loss']:.3f} | {r['diff_steps']} | "
        f"{r['val_simulated_acceptance']:.2f} | {r['heldout_simulated_acceptance']:.2f} | "
        f"{'**shipped**' if r['shipped'] else ''} |" for r in runs)
    rec = first["recipes"]
    real = rec[first["chosen_recipe"]]
    resumed = "".join(f"; then trained on from that checkpoint by `train_tiny.py {command(p)}` on one {p['device']} "
                      f"({p['total_seconds']:.0f} s)" for p in parts[1:])
    later = "".join(later_part(i + 3, p) for i, p in enumerate(parts[1:]))
    return f"""# tiny — a small Orthrus-Qwen3 trained for this project

The embedded default model (`--model tiny`). Trained by `python3 scripts/train_tiny.py --out DIR --layers
{cfg['num_hidden_layers']} --lm-seconds {args['lm_seconds']:.0f} --diff-seconds {args['diff_seconds']:.0f} --diff-data
{args['diff_data']} --kl-decay {args['kl_decay']:g}` (these are the script's defaults) on one {first['device']}
({first['total_seconds']:.0f} s wall-clock, torch {first['torch']}), fixed seed 0, side by side on the same GPU with the
same command at `--layers 8` (`scripts/gpu_session.sh`){resumed}; stage lengths are wall-clock budgets, so step counts
(below) depend on what else runs on the GPU. Measured by `scripts/eval_tiny.py` with this project's runtime (CPU
engine, fp32, greedy).

## Model

Qwen3 layout: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} query /
{cfg['num_key_value_heads']} KV heads of {cfg['head_dim']}, MLP {cfg['intermediate_size']}, vocabulary
{cfg['vocab_size']} (byte-level BPE trained on every {args['tokenizer_every']}th training file), tied `lm_head`, block
size {cfg['block_size']}, mask token {cfg['mask_token_id']}. {log['params']['total'] / 1e6:.2f} M parameters, of which
the diffusion set is {log['params']['diffusion_set'] / 1e6:.2f} M
({100 * log['params']['diffusion_set'] / log['params']['total']:.0f}%). Weights bf16, {size_mb:.1f} MB in
{len(list(folder.glob('model-*.safetensors')))} safetensors shards; the folder is in the published Orthrus-Qwen3
layout.

Why this size: a draft is one pass, so predicting several tokens ahead needs depth; the two shapes below were trained
side by side with the same budget and the one with the better simulated acceptance on *validation* windows (from the
training packages, not the held-out ones) ships. The deeper model drafts better although its base saw fewer steps.
Its base saw {tokens_seen / 1e6:.0f} M tokens ({tokens_seen / log['params']['total']:.0f} per parameter) and was still
improving when its budget ended; a 40 MB model (20 M parameters) would see fewer still in the same GPU time, and the
model runs in every CPU test and in CI (2 cores, fp32), whose time grows with its size.

| layers | M params | base steps | validation CE | distillation steps | simulated acceptance, validation | simulated acceptance, held-out | |
|---|---|---|---|---|---|---|---|
{run_rows}

(Simulated acceptance: `train_tiny.simulated_acceptance`, the runtime's greedy cycle walked over every anchor's draft
on 32 windows of 96 tokens + 128 greedy tokens, bf16 on the GPU; checked on the previous checkpoint, fp32 on the CPU,
against the runtime: 3.76 where the
runtime measured 3.79 on the same prompt.)

## Data

{data['source']} (Python {data['python']}): {tot['train']['files']} training files ({tot['train']['bytes'] / 1e6:.0f} MB,
{tot['train']['tokens'] / 1e6:.1f} M tokens), {tot['val']['files']} validation files
({tot['val']['tokens'] / 1e6:.2f} M tokens), {tot['held']['files']} held-out files ({tot['held']['bytes'] / 1e6:.1f} MB,
{tot['held']['tokens'] / 1e6:.2f} M tokens). Split: {data['split']}. Skipped files: {data['skipped_files']}.
`data_manifest.json` lists every package with its version and counts (and every held-out file), and the sha256 of the
whole corpus; `heldout_prompts.json` holds one 96-token window from each of {full['prompts']} held-out files, taken
round-robin over the held-out packages.

Largest training packages:

| package | version | files | M tokens |
|---|---|---|---|
{rows}

Held-out packages (never trained on; vendored copies dropped from training):

| package | version | files | M tokens | acceptance length (full eval) |
|---|---|---|---|---|
{hrows}

## Training

1. Base language model, all weights: {lm['steps']} steps in {lm['seconds']:.0f} s, batch {args['batch']} ×
   {args['seq']} tokens, AdamW (peak lr 3e-3, warm-up then cosine), bf16 autocast; kept step {lm['best_step']}.
   Cross-entropy: validation {first['val_lm_loss']:.3f}, held-out packages {first['heldout_lm_loss']:.3f} nats/token.
2. Diffusion set only (`*_proj_diff`, `*_norm_diff`, initialised from the AR set; everything else frozen),
   KL(AR ‖ draft) on the training text with the Orthrus training mask (blocks of 32; block positions see the AR
   keys/values before their anchor and their own block bidirectionally; input `[x_anchor, M, …, M]`; single-step
   denoising), block position j weighted by exp(−j / {args['kl_decay']:g}) (a later draft only counts when every earlier
   one was accepted): {first['diffusion']['steps']} steps in {first['diffusion']['seconds']:.0f} s, keeping the weights with
   the best validation block acceptance ({real['val_block_acceptance']:.2f}; weighted held-out KL
   {real['heldout_kl']:.2f}). An earlier recipe, distilling on the base's own greedy continuations, accepted less on
   held-out code (2.33 vs 2.78 for the training text, previous checkpoint) and was not run again.{later}

![loss curves](loss_curves.png)

## Measured acceptance (held-out packages, greedy)

| prompts | new tokens | acceptance length (token-weighted / per-prompt mean) | TPF (token-weighted / per-prompt) |
|---|---|---|---|
| {full['prompts']} | ≤ {full['max_new_tokens']} | {full['acceptance_length_token_weighted']:.2f} / {full['acceptance_length_per_prompt_mean']:.2f} | {full['tpf_token_weighted']:.2f} / {full['tpf_per_prompt_mean']:.2f} |
| {test['prompts']} (test set) | ≤ {test['max_new_tokens']} | {test['acceptance_length_token_weighted']:.2f} / {test['acceptance_length_per_prompt_mean']:.2f} | {test['tpf_token_weighted']:.2f} / {test['tpf_per_prompt_mean']:.2f} |

Acceptance by draft position (full eval; share of cycles whose draft token i was accepted): {", ".join(
        f"{i + 1}: {v:.2f}" for i, v in enumerate(pos[:6]))}, beyond 6: {max(pos[6:], default=0):.2f} at most.

On the same test prompts the previous tiny ({ev.get('previous_label', 'the checkpoint before this one')}) accepts
{prev['acceptance_length_token_weighted']:.2f} tokens per cycle (draft positions 1 / 2 / 3 / 4:
{" / ".join(f"{v:.2f}" for v in prev['acceptance_by_position'][:4])}; this one: {" / ".join(
        f"{v:.2f}" for v in test['acceptance_by_position'][:4])}).

Target (≥ 4.5 token-weighted on the held-out packages): **{"reached" if full['acceptance_length_token_weighted'] >= 4.5
else "not reached"}** ({full['acceptance_length_token_weighted']:.2f}).
Orthrus output equals the engine's AR output on every prompt: {full['all_equal_engine_ar']}; equals `transformers`
`generate`: {full['all_equal_transformers']}. Measured {ev['date']} on {ev['host']} in {ev['seconds']:.0f} s.
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--card-only", action="store_true", help="rewrite README.md from the existing eval.json")
    ap.add_argument("--previous", help="a previous checkpoint folder to measure on the same test prompts")
    ap.add_argument("--previous-label", help="how the card names it (e.g. its git commit)")
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
        if a.previous:
            old = Engine.load(build(a.previous, out=Path(tmp) / "old", max_seq_len=512, progress=False))
            previous = measure(old, None, prompts[:TEST_PROMPTS], TEST_NEW_TOKENS)
    import platform
    ev = {"full": full, "test": test, "seconds": time.time() - t0, "host": platform.processor() or "cpu",
          "date": time.strftime("%Y-%m-%d")}
    if a.previous:
        ev["previous_test"] = previous
        ev["previous_label"] = a.previous_label or a.previous
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
