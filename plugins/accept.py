"""``orthrus::accept`` — acceptance of a drafted block: greedy prefix match or speculative rejection sampling.

Contract
--------
``accept(block, draft_logits, verify_logits, uniforms, eos_ids, temperature, top_k, top_p) -> (tokens, n_emitted)``

- ``block``: int64 ``[B]`` — the verify pass's input ``[x_s, d_1, …, d_{B-1}]``.
- ``draft_logits``: ``[B, V]`` — row ``i`` is the drafter's distribution ``q_i`` for ``d_{i+1}`` (the last row is
  unused). ``verify_logits``: ``[B, V]`` — row ``i`` is the base model's ``p_i`` for the token after ``block[i]``.
  Any float dtype; computed in float32.
- ``uniforms``: float32 ``[B]`` in [0, 1): ``uniforms[i]`` tests draft ``i+1``, ``uniforms[B-1]`` draws the final
  token. Unused when greedy.
- ``eos_ids``: int64 ``[E]`` (E may be 0): tokens that end generation.
- ``temperature`` (float attribute): ``0`` = greedy. ``top_k`` (int, 0 = off), ``top_p`` (float in (0, 1]) are applied
  to both distributions.
- ``tokens``: int64 ``[B]``; the first ``n_emitted`` entries are the emitted tokens ``d_1 … d_n, t``; entries after them
  are unspecified. ``n_emitted``: int64 scalar in ``[1, B]``.

Greedy: ``n`` is the longest prefix with ``d_{i+1} == argmax p_i``; the emitted tokens are ``d_1 … d_n`` and the bonus
``argmax p_n``. Sampling: ``d_{i+1}`` is accepted while ``uniforms[i] * q_i(d) < p_i(d)`` (probability
``min(1, p/q)``); at the first rejection ``t`` is drawn from ``normalize(max(p_n − q_n, 0))``, and if all ``B-1`` drafts
are accepted from ``p_{B-1}`` — so emitted text is distributed exactly as the base model's. If an emitted token is in
``eos_ids``, ``n_emitted`` is cut to end with it.
"""

import torch

from orthrus_plugins.sampling import filter_logits, sample_token


def _accept_greedy(block, verify_logits):
    best = verify_logits.argmax(dim=-1)  # a_i
    match = (block[1:] == best[:-1]).to(torch.int64)
    n = torch.cumprod(match, dim=0).sum()
    return best, n  # accepted drafts equal a_0..a_{n-1}, bonus is a_n: the emitted tokens are best[:n+1]


def _accept_sampled(block, draft_logits, verify_logits, uniforms, temperature, top_k, top_p):
    b = block.shape[0]
    p = filter_logits(verify_logits, temperature, top_k, top_p)  # [B, V]
    q = filter_logits(draft_logits, temperature, top_k, top_p)
    drafts = block[1:]
    p_d = p[:-1].gather(1, drafts[:, None]).squeeze(1)
    q_d = q[:-1].gather(1, drafts[:, None]).squeeze(1)
    ok = (uniforms[:-1].float() * q_d < p_d).to(torch.int64)
    n = torch.cumprod(ok, dim=0).sum()
    idx = torch.clamp(n, max=b - 2)
    residual = torch.clamp(p[idx] - q[idx], min=0.0)
    # p == q up to rounding leaves no residual mass; the rejection then had probability ~0: fall back to p
    residual = torch.where(residual.sum() > 0, residual, p[idx])
    final_dist = torch.where(n == b - 1, p[b - 1], residual)
    last = sample_token(final_dist[None], uniforms[-1:])[0]
    pos = torch.arange(b, device=block.device)
    shifted = torch.cat([drafts, drafts[-1:]])
    tokens = torch.where(pos < n, shifted, last)
    return tokens, n


@torch.library.custom_op("orthrus::accept", mutates_args=())
def accept(block: torch.Tensor, draft_logits: torch.Tensor, verify_logits: torch.Tensor, uniforms: torch.Tensor,
           eos_ids: torch.Tensor, temperature: float, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation (any device; no host synchronisation)."""
    b = block.shape[0]
    if draft_logits.shape != verify_logits.shape or draft_logits.shape[0] != b or uniforms.shape != (b,):
        raise ValueError(f"orthrus::accept: block {tuple(block.shape)}, draft_logits {tuple(draft_logits.shape)}, "
                         f"verify_logits {tuple(verify_logits.shape)}, uniforms {tuple(uniforms.shape)} disagree")
    if temperature == 0.0:
        tokens, n = _accept_greedy(block, verify_logits)
    else:
        tokens, n = _accept_sampled(block, draft_logits, verify_logits, uniforms, temperature, top_k, top_p)
    n_emitted = n + 1
    if eos_ids.numel() > 0:
        pos = torch.arange(b, device=block.device)
        is_eos = (tokens[:, None] == eos_ids[None, :]).any(dim=1) & (pos < n_emitted)
        first = torch.where(is_eos, pos, b).min()
        n_emitted = torch.minimum(n_emitted, first + 1)
    return tokens.clone(), n_emitted.to(torch.int64).clone()


@accept.register_fake
def _(block, draft_logits, verify_logits, uniforms, eos_ids, temperature, top_k, top_p):
    return torch.empty_like(block), block.new_empty(())
