"""Chi-square goodness of fit without scipy: p-value from the regularised upper incomplete gamma function."""

import torch


def chi_square_pvalue(counts: dict, probs: dict, min_expected: float = 5.0) -> tuple[float, float, int]:
    """Pearson's test of observed ``counts`` against exact ``probs`` (cells with small expectation pooled).
    Returns (statistic, p-value, degrees of freedom)."""
    n = sum(counts.values())
    cells, pooled_obs, pooled_exp = [], 0.0, 0.0
    for key, p in probs.items():
        e = p * n
        if e < min_expected:
            pooled_obs += counts.get(key, 0)
            pooled_exp += e
        else:
            cells.append((counts.get(key, 0), e))
    extra = sum(c for k, c in counts.items() if k not in probs)
    if pooled_exp > 0 or extra:
        cells.append((pooled_obs + extra, max(pooled_exp, 1e-12)))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    dof = len(cells) - 1
    p = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                      torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, p, dof
