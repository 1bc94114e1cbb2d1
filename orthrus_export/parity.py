"""Parity against the Hugging Face reference: per-pass logits within a dtype-derived tolerance, and tokens.

Tolerance per element: ``K * eps(dtype) * (rms(ref) + |ref|)`` — an absolute part scaled to the logits' size
plus a relative part, both in units of the engine dtype's machine epsilon. Reports give the max difference and
the share of the budget it used.
"""

import random

import torch

from orthrus_export.reference import Reference

EPS_MULTIPLIER = {torch.float32: 64.0, torch.bfloat16: 16.0, torch.float16: 32.0}


def compare(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> dict:
    actual, expected = actual.double(), expected.double()
    eps = torch.finfo(dtype).eps
    scale = expected.pow(2).mean().sqrt()
    bound = EPS_MULTIPLIER[dtype] * eps * (scale + expected.abs())
    diff = (actual - expected).abs()
    finite = bool(torch.isfinite(actual).all())
    used = float((diff / bound).max()) if finite else float("inf")
    return {"max_abs_diff": float(diff.max()), "budget_used": used, "ok": finite and used <= 1.0,
            "tolerance": f"{EPS_MULTIPLIER[dtype]:g} * eps({str(dtype).replace('torch.', '')}) * (rms(ref) + |ref|)"}


@torch.no_grad()
def pass_parity(engine, ref: Reference, seed: int = 0, prompt_len: int | None = None) -> dict:
    """Prefill (verify program on a prompt chunk), draft and verify logits of the engine vs the reference."""
    cfg, b = engine.config, engine.block_size
    rng = random.Random(seed)
    p = prompt_len or max(1, b // 2 + 3)
    assert p <= b
    prompt = [rng.randrange(cfg.vocab_size) for _ in range(p)]
    dtype = engine.dtype
    padded = prompt + [cfg.mask_token_id] * (b - p)
    cache = ref.new_cache()
    results = {"prefill": compare(engine.run_pass("verify", padded, 0)[:p].cpu(), ref.ar_pass(prompt, cache), dtype)}
    x = rng.randrange(cfg.vocab_size)
    block = [x] + [cfg.mask_token_id] * (b - 1)
    results["draft"] = compare(engine.run_pass("draft", block, p).cpu(), ref.draft_pass(block, cache), dtype)
    block = [x] + [rng.randrange(cfg.vocab_size) for _ in range(b - 1)]
    results["verify"] = compare(engine.run_pass("verify", block, p).cpu(), ref.ar_pass(block, cache), dtype)
    return results


def random_prompts(vocab: int, n: int, seed: int, lengths=(1, 7, 33, 64)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


def near_tie_bound(passes: dict) -> float:
    """Two logits whose fp32 values are closer than twice the engine's measured max |Δlogits| (per-pass parity)
    can swap order in the engine's arithmetic: a divergence there is a near-tie."""
    return 2 * max(r["max_abs_diff"] for r in passes.values())


@torch.no_grad()
def divergence_margin(ref: Reference, prompt: list[int], common: list[int], bound: float) -> dict:
    """fp32 re-score at the first divergence: the top-2 logit margin there and whether it is a near-tie."""
    logits = ref.ar_pass(prompt + common, ref.new_cache())[-1].double()
    top2 = torch.topk(logits, 2).values
    margin = float(top2[0] - top2[1])
    return {"fp32_top2_margin": margin, "near_tie_bound": bound, "near_tie": margin <= bound}


@torch.no_grad()
def token_parity(engine, ref: Reference, prompts: list[list[int]], max_new_tokens: int,
                 near_tie: float = 0.0, log=None) -> list[dict]:
    """Greedy tokens: engine Orthrus, engine AR and transformers' generate, per prompt. Where Orthrus differs
    from transformers, the fp32 top-2 margin at the first divergence is compared with ``near_tie``."""
    rows = []
    for prompt in prompts:
        expected = ref.generate_ar(prompt, max_new_tokens)
        orthrus = engine.generate(prompt, max_new_tokens=max_new_tokens, temperature=0.0)
        ar = engine.generate(prompt, max_new_tokens=max_new_tokens, use_drafts=False, temperature=0.0)
        first_diff = next((i for i, (a, e) in enumerate(zip(orthrus.output_ids, expected)) if a != e), None)
        rows.append({"prompt_tokens": len(prompt), "new_tokens": len(expected),
                     "orthrus_equals_transformers": orthrus.output_ids == expected,
                     "ar_equals_transformers": ar.output_ids == expected,
                     "orthrus_equals_engine_ar": orthrus.output_ids == ar.output_ids,
                     "first_divergence": first_diff,
                     "divergence": None if first_diff is None else
                     divergence_margin(ref, prompt, expected[:first_diff], near_tie),
                     "acceptance_length": orthrus.stats.acceptance_length, "tpf": orthrus.stats.tpf})
        if log:
            log(len(rows) - 1, rows[-1])
    return rows


@torch.no_grad()
def ar_consistency(engine, seed: int = 0) -> dict:
    """An engine against itself: a verify block's logits vs the same tokens decoded one at a time (decode program),
    within the compute dtype's tolerance — the property that makes Orthrus output equal the engine's own AR
    output. The parity self-check of engines that have no bit-level reference (FP8: lossless relative to the
    quantized base, DESIGN.md §2); the draft pass must be finite."""
    cfg, b = engine.config, engine.block_size
    rng = random.Random(seed)
    p = b // 2 + 3
    prompt = [rng.randrange(cfg.vocab_size) for _ in range(p)] + [cfg.mask_token_id] * (b - p)
    engine.run_pass("verify", prompt, 0)
    block = [rng.randrange(cfg.vocab_size) for _ in range(b)]
    draft = engine.run_pass("draft", [block[0]] + [cfg.mask_token_id] * (b - 1), p)
    verify = engine.run_pass("verify", block, p).cpu()
    steps = torch.cat([engine.run_pass("decode", [t], p + i).cpu() for i, t in enumerate(block)])
    result = compare(verify, steps, engine.dtype)
    result["draft_finite"] = bool(torch.isfinite(draft).all())
    result["ok"] = result["ok"] and result["draft_finite"]
    result["what"] = "verify-block logits vs one-token decode logits of the same tokens (the engine's own AR)"
    return {"verify_vs_decode": result}
