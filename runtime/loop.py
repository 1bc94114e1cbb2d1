"""The host side of a generation: prefill, then steps (``runtime.cycle``) until a stop, yielding tokens.

Lives apart from the model: it calls the engine's ``verify`` program for prefill and ``Steps`` for every cycle (or AR
step). Random numbers come from a per-request generator on the host (seeded by the request), drawn per step and
copied to the device: a request's samples do not depend on anything else the engine runs.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from orthrus_plugins.sampling import filter_logits, sample_token
from orthrus_runtime.cycle import Steps
from orthrus_runtime.stats import GenerationStats


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# A draft source other than the diffusion view (for experiments and tests): called with the cache length ``s``,
# the known token ``x`` and all tokens so far; returns B-1 draft tokens. Drafts are then treated as certain
# (q = one-hot), which keeps sampled output exact.
Drafter = Callable[[int, int, list[int]], list[int]]


def prefill(run_pass, prompt: list[int], block_size: int, mask: int, device, stats: GenerationStats) -> torch.Tensor:
    """Fill the cache with the prompt in chunks of B (verify program); logits of the last prompt token."""
    last = None
    for c in range(0, len(prompt), block_size):
        chunk = prompt[c:c + block_size]
        tokens = torch.full((block_size,), mask, dtype=torch.int64)
        tokens[:len(chunk)] = torch.tensor(chunk)
        logits = run_pass("verify", tokens.to(device), c)
        last = logits[len(chunk) - 1]  # padded positions write K/V past the prompt: overwritten later
        stats.prefill_passes += 1
    return last


def generate(steps: Steps, run_pass, prompt: list[int], max_new_tokens: int, sampling: Sampling, seed: int,
             eos_ids: list[int], stats: GenerationStats, use_drafts: bool = True,
             drafter: Drafter | None = None) -> Iterator[list[int]]:
    """Yield the new tokens step by step (EOS included when generated; at most max_new_tokens in all)."""
    b = steps.b
    gen = torch.Generator().manual_seed(seed)
    sampled = not sampling.greedy
    eos = set(eos_ids)
    t0 = time.perf_counter()
    logits = prefill(run_pass, prompt, b, int(steps.mask_tail[0]), steps.device, stats)
    if sampled:
        probs = filter_logits(logits[None].cpu(), sampling.temperature, sampling.top_k, sampling.top_p)
        x = int(sample_token(probs, torch.rand(1, generator=gen))[0])
    else:
        x = int(logits.argmax())
    stats.prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = [x]
    yield [x]
    s = len(prompt)
    steps.start(x, s, eos_ids, sampling.temperature, sampling.top_k, sampling.top_p)
    kind = "cycle" if use_drafts else "decode"
    while len(out) < max_new_tokens and x not in eos:
        uniforms = torch.rand(1, 2 * b, generator=gen) if sampled else None
        drafts = drafter(s, x, prompt + out) if drafter is not None and use_drafts else None
        emitted = steps.step(kind, sampled, uniforms, drafts)
        if use_drafts:
            stats.draft_passes += drafter is None
            stats.verify_passes += 1
            stats.record_cycle(len(emitted))
        else:
            stats.decode_passes += 1
        s += len(emitted)
        x = emitted[-1]
        emitted = emitted[:max_new_tokens - len(out)]
        out += emitted
        stats.decode_s = time.perf_counter() - t0
        yield emitted
    stats.decode_s = time.perf_counter() - t0
