"""The pass/fail rule per precision, written once: the build's self-check and ``orthrus-export check`` both use it.

- fp32: per-pass logits within the dtype tolerance of the fp32 ``transformers`` reference, and greedy tokens equal to
  ``transformers`` ``generate`` (Orthrus and the engine's own AR).
- bf16/fp16: per-pass logits within tolerance; Orthrus == the engine's own AR; every divergence from ``transformers``
  a near-tie in an fp32 re-score.
- fp8: lossless relative to the quantized base: verify-block logits equal one-token decode logits (the engine's own
  AR) within tolerance, and Orthrus == the engine's own AR; identity with ``transformers`` is informational.
"""

from orthrus_runtime.errors import OrthrusError


def pass_checks(engine, ckpt, seed: int = 0, ref=None) -> dict:
    """Per-pass results ``{name: {max_abs_diff, budget_used, ok, ...}}`` for the engine's precision."""
    import torch

    from orthrus_export.parity import ar_consistency, pass_parity
    from orthrus_export.reference import Reference
    if engine.manifest["precision"] == "fp8":
        return ar_consistency(engine, seed=seed)
    return pass_parity(engine, ref or Reference(ckpt, torch.float32), seed=seed)


def passes_ok(passes: dict) -> bool:
    return all(r["ok"] for r in passes.values())


def tokens_ok(precision: str, rows: list[dict]) -> bool:
    """Token verdict over ``parity.token_parity`` rows."""
    ok = all(r["orthrus_equals_engine_ar"] for r in rows)
    if precision == "fp32":
        return ok and all(r["orthrus_equals_transformers"] and r["ar_equals_transformers"] for r in rows)
    if precision == "fp8":
        return ok
    return ok and all(r["divergence"] is None or r["divergence"]["near_tie"] for r in rows)


def self_check(engine, ckpt) -> dict:
    """The build's parity self-check (per-pass rule); raises when it fails, so that no engine is written."""
    passes = pass_checks(engine, ckpt)
    if not passes_ok(passes):
        failed = [k for k, r in passes.items() if not r["ok"]]
        worst = max(passes.values(), key=lambda r: r["budget_used"])
        raise OrthrusError(f"parity self-check failed for {', '.join(failed)} (max |Δlogits| "
                           f"{worst['max_abs_diff']:.3g}, {worst['budget_used']:.1f}x the tolerance): "
                           "the engine was not written")
    fp8 = engine.manifest["precision"] == "fp8"
    return {"reference": "the engine's own AR decode steps" if fp8 else "transformers fp32", "passes": passes}
