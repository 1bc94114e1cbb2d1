"""Sampling helpers shared by the acceptance op and the runtime (plain torch; traceable; no host synchronisation).

``filter_logits`` turns logits into the sampling distribution (temperature, then top-k, then top-p) with the
parameters given per row as tensors (or plain numbers), so one captured CUDA graph serves every setting and every
row of a batch its own; ``sample_token`` draws from a distribution with a caller-supplied uniform number (inverse
CDF), so every random choice of a request comes from one seeded stream the runtime owns for that request.
"""

import torch


def validate_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not (temperature >= 0.0) or temperature != temperature or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _rows(value, logits: torch.Tensor, dtype) -> torch.Tensor:
    """A per-row parameter broadcast to ``logits.shape[:-1] + (1,)``."""
    t = torch.as_tensor(value, dtype=dtype, device=logits.device)
    return t.reshape(t.shape + (1,) * (logits.dim() - t.dim()))


def filter_logits(logits: torch.Tensor, temperature, top_k, top_p) -> torch.Tensor:
    """Probabilities ``[..., V]`` (float32) of ``softmax(logits / temperature)`` restricted to the top-k tokens
    (``top_k == 0``: no limit; tokens tied with the k-th are kept) and then to the smallest set whose mass reaches
    ``top_p`` (``1.0``: no limit). The most likely token is always kept. ``temperature`` (> 0), ``top_k`` and
    ``top_p`` are numbers or tensors of ``logits.shape[:-1]`` (or a prefix of it): one value per row."""
    vocab = logits.shape[-1]
    x = logits.float() / _rows(temperature, logits, torch.float32)
    k = _rows(top_k, logits, torch.int64)
    p = _rows(top_p, logits, torch.float32)
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    k = torch.where((k > 0) & (k < vocab), k, vocab).expand(x.shape[:-1] + (1,))
    kth = sorted_x.gather(-1, k - 1)
    sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
    sorted_p = torch.softmax(sorted_x, dim=-1)
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of strictly more likely tokens
    drop_sorted = (mass_before >= p) & (p < 1.0)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    x = x.masked_fill(drop | (x < kth), float("-inf"))
    return torch.softmax(x, dim=-1)


def sample_token(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: for each row of ``probs`` [..., V] (need not be normalised) and ``u`` [...] in [0, 1),
    the first index whose cumulative mass exceeds ``u * total``. Zero-probability tokens are never drawn."""
    cdf = torch.cumsum(probs.float(), dim=-1)
    target = (u.float() * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)
