"""The Orthrus draft/verify loop (and the plain AR loop) over an engine's traced programs.

Lives apart from the model: it only calls ``draft``, ``verify`` and ``decode`` programs and ``orthrus::accept``.
One cycle at cache length ``s`` with known token ``x``:
draft ``[x, M, …, M]`` -> drafts ``d_1 … d_{B-1}`` -> verify ``[x, d_1 … d_{B-1}]`` (writes K/V at s … s+B-1)
-> accept -> emit ``n+1`` tokens, cache length ``s+n+1`` (rejected K/V are overwritten later), ``x`` = last token.
The host reads the cycle's result once (the emitted tokens).
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

import orthrus_plugins
from orthrus_plugins.sampling import filter_logits, sample_token
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


class Loop:
    def __init__(self, programs: dict, weights: dict, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_size: int, mask_token_id: int, device: torch.device, vocab_size: int):
        self.programs, self.w = programs, weights
        self.k_cache, self.v_cache = k_cache, v_cache
        self.b, self.mask, self.device, self.vocab_size = block_size, mask_token_id, device, vocab_size
        self.graphs = None  # runtime.graphs.GraphedSteps on CUDA: whole greedy cycles as CUDA graphs
        self.attention_splits = orthrus_plugins.DEFAULT_ATTENTION_SPLITS  # the engine's tuned kernel setting

    def _pass(self, name: str, tokens: torch.Tensor, start: int) -> torch.Tensor:
        return self.programs[name](self.w, tokens, torch.tensor(start, device=self.device), self.k_cache, self.v_cache)

    def _choose(self, logits: torch.Tensor, sampling: Sampling, gen: torch.Generator) -> torch.Tensor:
        if sampling.greedy:
            return logits.argmax(-1)
        u = torch.rand(logits.shape[0], generator=gen, device=self.device)
        return sample_token(filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p), u)

    def prefill(self, prompt: list[int], stats: GenerationStats) -> torch.Tensor:
        """Fill the cache with the prompt in chunks of B (verify program); logits of the last prompt token."""
        last = None
        for c in range(0, len(prompt), self.b):
            chunk = prompt[c:c + self.b]
            tokens = torch.full((self.b,), self.mask, dtype=torch.int64)
            tokens[:len(chunk)] = torch.tensor(chunk)
            logits = self._pass("verify", tokens.to(self.device), c)
            last = logits[len(chunk) - 1]  # padded positions write K/V past the prompt: overwritten later
            stats.prefill_passes += 1
        return last

    def run(self, prompt: list[int], max_new_tokens: int, sampling: Sampling, seed: int, eos_ids: list[int],
            stats: GenerationStats, use_drafts: bool = True, drafter: Drafter | None = None) -> Iterator[list[int]]:
        """Yield the new tokens cycle by cycle (EOS included when generated; at most max_new_tokens in all)."""
        orthrus_plugins.set_attention_splits(self.attention_splits)  # the eager passes launch what graphs captured
        gen = torch.Generator(device=self.device).manual_seed(seed)
        eos = set(eos_ids)
        eos_t = torch.tensor(eos_ids, dtype=torch.int64, device=self.device)
        t0 = time.perf_counter()
        logits = self.prefill(prompt, stats)
        x = int(self._choose(logits[None], sampling, gen)[0])
        stats.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = [x]
        yield [x]
        s = len(prompt)
        graphed = self.graphs is not None and sampling.greedy and drafter is None
        if graphed:
            self.graphs.start(x, s, eos_ids)
        while len(out) < max_new_tokens and x not in eos:
            if graphed:
                emitted = self._graphed_step(use_drafts, stats)
            elif use_drafts:
                emitted = self._cycle(x, s, sampling, gen, eos_t, stats, drafter, prompt + out)
            else:
                logits = self._pass("decode", torch.tensor([x], device=self.device), s)
                stats.decode_passes += 1
                emitted = [int(self._choose(logits, sampling, gen)[0])]
            s += len(emitted)
            x = emitted[-1]
            emitted = emitted[:max_new_tokens - len(out)]
            out += emitted
            stats.decode_s = time.perf_counter() - t0
            yield emitted
        stats.decode_s = time.perf_counter() - t0

    def _graphed_step(self, use_drafts: bool, stats: GenerationStats) -> list[int]:
        g = self.graphs
        (g.cycle if use_drafts else g.decode).replay()
        n = int(g.n)  # the one host read of the cycle
        if use_drafts:
            stats.draft_passes += 1
            stats.verify_passes += 1
            stats.record_cycle(n)
        else:
            stats.decode_passes += 1
        return g.tokens[:n].tolist()

    def _cycle(self, x, s, sampling, gen, eos_t, stats, drafter, history) -> list[int]:
        b = self.b
        if drafter is None:
            block = torch.full((b,), self.mask, dtype=torch.int64, device=self.device)
            block[0] = x
            draft_logits = self._pass("draft", block, s)
            stats.draft_passes += 1
            drafts = self._choose(draft_logits[:-1], sampling, gen)
        else:
            drafts = torch.tensor(drafter(s, x, history)[:b - 1], dtype=torch.int64, device=self.device)
            draft_logits = torch.full((b, self.vocab_size), float("-inf"), device=self.device)
            draft_logits[torch.arange(b - 1), drafts] = 0.0  # q = one-hot at the draft
            draft_logits[b - 1] = 0.0
        block = torch.cat([torch.tensor([x], device=self.device), drafts])
        verify_logits = self._pass("verify", block, s)
        stats.verify_passes += 1
        u = (torch.rand(b, generator=gen, device=self.device) if not sampling.greedy
             else torch.zeros(b, device=self.device))
        tokens, n_emitted = torch.ops.orthrus.accept(block, draft_logits, verify_logits, u, eos_t,
                                                     sampling.temperature, sampling.top_k, sampling.top_p)
        n = int(n_emitted)  # the one host read of the cycle
        stats.record_cycle(n)
        return tokens[:n].tolist()
