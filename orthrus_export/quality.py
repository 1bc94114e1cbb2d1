"""Quality of a quantized engine against the BF16 base: teacher-forced top-1 agreement and perplexity.

The engine's logits come from its verify program run over the text in blocks (exactly as prefill runs); the BF16
logits from the ``transformers`` reference in bfloat16 (the base model the engine was quantized from). Top-1
agreement = share of positions whose argmax is the same; perplexity = exp(mean NLL of the next token).
"""

import math
import random

import torch

from orthrus_export.reference import Reference


@torch.no_grad()
def teacher_forced_logits(engine, tokens: list[int]) -> torch.Tensor:
    b, out = engine.block_size, []
    for c in range(0, len(tokens), b):
        chunk = tokens[c:c + b]
        padded = chunk + [engine.config.mask_token_id] * (b - len(chunk))
        out.append(engine.run_pass("verify", padded, c)[:len(chunk)].float().cpu())
    return torch.cat(out)


def _nll(logits: torch.Tensor, tokens: list[int]) -> tuple[float, int]:
    targets = torch.tensor(tokens[1:])
    lp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return float(-lp.gather(1, targets[:, None]).sum()), len(tokens) - 1


@torch.no_grad()
def quality_vs_bf16(engine, ckpt, sequences: list[list[int]]) -> dict:
    ref = Reference(ckpt, torch.bfloat16)
    agree = total = 0
    nll_e = nll_r = 0.0
    n_tok = 0
    for tokens in sequences:
        tokens = tokens[:engine.max_seq_len]
        e = teacher_forced_logits(engine, tokens)
        r = ref.ar_pass(tokens, ref.new_cache()).float()
        agree += int((e.argmax(-1) == r.argmax(-1)).sum())
        total += len(tokens)
        a, n = _nll(e, tokens)
        c, _ = _nll(r, tokens)
        nll_e, nll_r, n_tok = nll_e + a, nll_r + c, n_tok + n
    ppl_e, ppl_r = math.exp(nll_e / n_tok), math.exp(nll_r / n_tok)
    return {"sequences": len(sequences), "positions": total, "top1_agreement": agree / total,
            "perplexity_engine": ppl_e, "perplexity_bf16": ppl_r, "perplexity_delta": ppl_e - ppl_r,
            "perplexity_delta_relative": ppl_e / ppl_r - 1, "reference": "transformers bf16"}


def default_sequences(engine, n: int = 8, length: int = 256, seed: int = 0) -> tuple[list[list[int]], str]:
    """The tiny model's held-out text when the engine is tiny's, else random token sequences."""
    import json

    from orthrus_export.checkpoint import TINY_DIR
    if engine.manifest["model"]["source"] == "tiny" and engine.tokenizer is not None:
        prompts = json.loads((TINY_DIR / "heldout_prompts.json").read_text())
        seqs = [engine.tokenizer.encode(p["text"]) for p in prompts]
        return [s for s in seqs if len(s) > 1][:n * 4], "tiny held-out prompts"
    rng = random.Random(seed)
    length = min(length, engine.max_seq_len)
    return [[rng.randrange(engine.config.vocab_size) for _ in range(length)] for _ in range(n)], "random tokens"
