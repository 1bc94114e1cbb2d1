"""``orthrus::accept`` — acceptance of drafted blocks, one per sequence slot: greedy prefix match or speculative
rejection sampling, each slot with its own sampling parameters.

Contract
--------
``accept(block, draft_logits, verify_logits, uniforms, eos_ids, temperature, top_k, top_p, sampled)
-> (tokens, n_emitted)``

- ``block``: int64 ``[S, B]`` — each slot's verify input ``[x_s, d_1, …, d_{B-1}]``.
- ``draft_logits``: ``[S, B, V]`` — row ``i`` is the drafter's distribution ``q_i`` for ``d_{i+1}`` (the last row is
  unused). ``verify_logits``: ``[S, B, V]`` — row ``i`` is the base model's ``p_i`` for the token after
  ``block[i]``. Any float dtype; computed in float32.
- ``uniforms``: float32 ``[S, B]`` in [0, 1): ``uniforms[:, i]`` tests draft ``i+1``, ``uniforms[:, B-1]`` draws the
  final token. Unused for greedy slots.
- ``eos_ids``: int64 ``[S, E]`` (E may be 0): tokens that end each slot's generation; ``-1`` pads unused entries.
- ``temperature`` float32 ``[S]`` (``0`` = greedy), ``top_k`` int64 ``[S]`` (0 = off), ``top_p`` float32 ``[S]`` in
  (0, 1]: per-slot sampling parameters, applied to both distributions. Tensors, so that one captured CUDA graph
  serves every setting.
- ``sampled`` (bool attribute): ``False`` treats every slot as greedy (the parameters are ignored and no
  distribution is computed: the cheap greedy graph); ``True`` samples the slots whose temperature is > 0.
- ``tokens``: int64 ``[S, B]``; the first ``n_emitted[s]`` entries of row ``s`` are its emitted tokens
  ``d_1 … d_n, t``; entries after them are unspecified. ``n_emitted``: int64 ``[S]``, each in ``[1, B]``.

Greedy: ``n`` is the longest prefix with ``d_{i+1} == argmax p_i``; the emitted tokens are ``d_1 … d_n`` and the bonus
``argmax p_n``. Sampling: ``d_{i+1}`` is accepted while ``uniforms[i] * q_i(d) < p_i(d)`` (probability
``min(1, p/q)``); at the first rejection ``t`` is drawn from ``normalize(max(p_n − q_n, 0))``, and if all ``B-1`` drafts
are accepted from ``p_{B-1}`` — so emitted text is distributed exactly as the base model's. If an emitted token is in
the slot's ``eos_ids``, its ``n_emitted`` is cut to end with it. Slots are independent: a slot's result does not
depend on the other slots.

Implementation: the reference only, on every device (tensor ops, no host synchronisation, so it runs on the GPU as
it is). It runs in the runtime's cycle, outside the exported programs, so it has no ONNX translation.
"""

import torch

from orthrus_plugins.sampling import filter_logits, sample_token


def _accept_greedy(block, verify_logits):
    best = verify_logits.argmax(dim=-1)  # a_i  [S, B]
    match = (block[:, 1:] == best[:, :-1]).to(torch.int64)
    n = torch.cumprod(match, dim=1).sum(1)
    return best, n  # accepted drafts equal a_0..a_{n-1}, bonus is a_n: the emitted tokens are best[:n+1]


def _accept_sampled(block, draft_logits, verify_logits, uniforms, temperature, top_k, top_p):
    s, b = block.shape
    t = torch.where(temperature > 0, temperature, 1.0)  # greedy slots are replaced by the caller
    p = filter_logits(verify_logits, t[:, None], top_k[:, None], top_p[:, None])  # [S, B, V]
    q = filter_logits(draft_logits, t[:, None], top_k[:, None], top_p[:, None])
    drafts = block[:, 1:]
    p_d = p[:, :-1].gather(2, drafts[..., None]).squeeze(2)
    q_d = q[:, :-1].gather(2, drafts[..., None]).squeeze(2)
    ok = (uniforms[:, :-1].float() * q_d < p_d).to(torch.int64)
    n = torch.cumprod(ok, dim=1).sum(1)  # [S]
    idx = torch.clamp(n, max=b - 2)[:, None, None].expand(s, 1, p.shape[-1])
    p_n, q_n = p.gather(1, idx).squeeze(1), q.gather(1, idx).squeeze(1)
    residual = torch.clamp(p_n - q_n, min=0.0)
    # p == q up to rounding leaves no residual mass; the rejection then had probability ~0: fall back to p
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
    final_dist = torch.where((n == b - 1)[:, None], p[:, b - 1], residual)
    last = sample_token(final_dist, uniforms[:, -1])  # [S]
    pos = torch.arange(b, device=block.device)
    shifted = torch.cat([drafts, drafts[:, -1:]], dim=1)
    tokens = torch.where(pos[None, :] < n[:, None], shifted, last[:, None])
    return tokens, n


@torch.library.custom_op("orthrus::accept", mutates_args=())
def accept(block: torch.Tensor, draft_logits: torch.Tensor, verify_logits: torch.Tensor, uniforms: torch.Tensor,
           eos_ids: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           sampled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation (any device; no host synchronisation)."""
    s, b = block.shape
    if (draft_logits.shape != verify_logits.shape or draft_logits.shape[:2] != (s, b) or uniforms.shape != (s, b)
            or eos_ids.dim() != 2 or eos_ids.shape[0] != s
            or not temperature.shape == top_k.shape == top_p.shape == (s,)):
        raise ValueError(f"orthrus::accept: block {tuple(block.shape)}, draft_logits {tuple(draft_logits.shape)}, "
                         f"verify_logits {tuple(verify_logits.shape)}, uniforms {tuple(uniforms.shape)}, eos_ids "
                         f"{tuple(eos_ids.shape)}, temperature/top_k/top_p {tuple(temperature.shape)}/"
                         f"{tuple(top_k.shape)}/{tuple(top_p.shape)} disagree")
    tokens, n = _accept_greedy(block, verify_logits)
    if sampled:
        t_s, n_s = _accept_sampled(block, draft_logits, verify_logits, uniforms, temperature, top_k, top_p)
        hot = temperature > 0
        tokens, n = torch.where(hot[:, None], t_s, tokens), torch.where(hot, n_s, n)
    n_emitted = n + 1
    if eos_ids.shape[1] > 0:
        pos = torch.arange(b, device=block.device)
        is_eos = (tokens[:, :, None] == eos_ids[:, None, :]).any(dim=2) & (pos[None, :] < n_emitted[:, None])
        first = torch.where(is_eos, pos[None, :], b).min(dim=1).values
        n_emitted = torch.minimum(n_emitted, first + 1)
    return tokens.clone(), n_emitted.to(torch.int64).clone()


@accept.register_fake
def _(block, draft_logits, verify_logits, uniforms, eos_ids, temperature, top_k, top_p, sampled):
    return torch.empty_like(block), block.new_empty(block.shape[:1])
