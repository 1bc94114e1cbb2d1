"""Sampling helpers shared by the acceptance op and the runtime (plain torch; traceable).

``filter_logits`` turns logits into the sampling distribution (temperature, then top-k, then top-p);
``sample_token`` draws from a distribution with a caller-supplied uniform number (inverse CDF), so every
random choice of a generation comes from one seeded stream the runtime owns.
"""

import torch


def validate_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not (temperature >= 0.0) or temperature != temperature or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Probabilities [N, V] (float32) of ``softmax(logits / temperature)`` restricted to the top-k tokens
    (``top_k == 0``: no limit) and then to the smallest set whose mass reaches ``top_p`` (``1.0``: no limit).
    The most likely token is always kept. Requires ``temperature > 0``."""
    x = logits.float() / temperature
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        sorted_p = torch.softmax(sorted_x, dim=-1)
        mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return torch.softmax(x, dim=-1)


def sample_token(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: for each row of ``probs`` [N, V] (need not be normalised) and ``u`` [N] in [0, 1),
    the first index whose cumulative mass exceeds ``u * total``. Zero-probability tokens are never drawn."""
    cdf = torch.cumsum(probs.float(), dim=-1)
    target = (u.float() * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)
