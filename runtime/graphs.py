"""CUDA graphs for whole greedy cycles (and AR decode steps): no host synchronisation inside a cycle.

The captured cycle reads the known token ``x`` and the cache length ``s`` from device buffers, runs
draft -> argmax -> verify -> ``orthrus::accept`` on the device, and leaves the emitted tokens, their count, the
next ``x`` and ``s + n`` in device buffers, so cycles can be replayed back to back; the host reads the emitted tokens
once per cycle. Needs the plugins' GPU kernels (their reference kernels read the cache length on the host).
"""

import torch

MAX_EOS = 8


class GraphedSteps:
    def __init__(self, loop, vocab_size: int):
        self.loop = loop
        dev, b = loop.device, loop.b
        self.x = torch.zeros(1, dtype=torch.int64, device=dev)
        self.s = torch.zeros((), dtype=torch.int64, device=dev)
        self.tokens = torch.zeros(b, dtype=torch.int64, device=dev)
        self.n = torch.zeros((), dtype=torch.int64, device=dev)
        self.eos = torch.full((MAX_EOS,), -1, dtype=torch.int64, device=dev)
        self.mask_tail = torch.full((b - 1,), loop.mask, dtype=torch.int64, device=dev)
        self.u = torch.zeros(b, device=dev)
        self.cycle = self._capture(self._cycle_body)
        self.decode = self._capture(self._decode_body)

    def _cycle_body(self):
        lp = self.loop
        block = torch.cat([self.x, self.mask_tail])
        draft_logits = lp.programs["draft"](lp.w, block, self.s, lp.k_cache, lp.v_cache)
        drafts = draft_logits[:-1].argmax(-1)
        verify_in = torch.cat([self.x, drafts])
        verify_logits = lp.programs["verify"](lp.w, verify_in, self.s, lp.k_cache, lp.v_cache)
        tokens, n = torch.ops.orthrus.accept(verify_in, draft_logits, verify_logits, self.u, self.eos, 0.0, 0, 1.0)
        self.tokens.copy_(tokens)
        self.n.copy_(n)
        self.x.copy_(tokens.gather(0, (n - 1).reshape(1)))
        self.s.add_(n)

    def _decode_body(self):
        lp = self.loop
        logits = lp.programs["decode"](lp.w, self.x, self.s, lp.k_cache, lp.v_cache)
        nxt = logits.argmax(-1)
        self.tokens[:1].copy_(nxt)
        self.n.fill_(1)
        self.x.copy_(nxt)
        self.s.add_(1)

    def _capture(self, body) -> torch.cuda.CUDAGraph:
        # the warm-up runs write the cache at s = 0: harmless, prefill rewrites it
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.s.zero_()
                body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.s.zero_()
        with torch.cuda.graph(graph):
            body()
        return graph

    def start(self, x: int, s: int, eos_ids: list[int]) -> None:
        if len(eos_ids) > MAX_EOS:
            raise ValueError(f"at most {MAX_EOS} stop tokens")
        self.x.fill_(x)
        self.s.fill_(s)
        self.eos.fill_(-1)
        if eos_ids:
            self.eos[:len(eos_ids)] = torch.tensor(eos_ids, device=self.eos.device)
