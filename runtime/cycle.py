"""One cycle, written once: the device-tensor step bodies that every path runs.

``Steps`` owns the device buffers of a generation step (known token ``x``, cache length ``s``, emitted tokens and
their count, stop tokens, sampling parameters, uniforms) and the bodies of its steps:

- ``cycle``: draft ``[x, M, …, M]`` -> drafts (argmax, or sampled from the draft distribution) -> verify
  ``[x, d_1 … d_{B-1}]`` (writes K/V at s … s+B-1) -> ``orthrus::accept`` -> tokens, ``n``, next ``x``, ``s + n``;
- ``decode``: one AR step (the baseline);
- ``draft`` / ``verify``: one pass alone (benchmarks).

Each body exists in a greedy and a sampled form (``sampled``: the sampling parameters and uniforms are device
tensors, so one body serves every temperature/top-k/top-p). The same body runs eagerly (CPU, tests, drafters) and is
captured as a CUDA graph on GPUs (every greedy and sampled step at load), and the benchmark times the same
replays. The host reads a step's result once (count and tokens in one transfer).
"""

import statistics
import time

import torch

from orthrus_plugins.sampling import filter_logits, sample_token

MAX_EOS = 8
STEPS = ("cycle", "decode")


class Steps:
    def __init__(self, programs: dict, weights: dict, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_size: int, mask_token_id: int, vocab_size: int, device: torch.device):
        self.programs, self.w, self.k_cache, self.v_cache = programs, weights, k_cache, v_cache
        self.b, self.vocab, self.device = block_size, vocab_size, device
        b, dev = block_size, device
        i64 = dict(dtype=torch.int64, device=dev)
        self.x = torch.zeros(1, 1, **i64)
        self.s = torch.zeros((), **i64)
        self.tokens = torch.zeros(1, b, **i64)
        self.n = torch.zeros(1, **i64)
        self.eos = torch.full((1, MAX_EOS), -1, **i64)
        self.temperature = torch.zeros(1, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(1, **i64)
        self.top_p = torch.ones(1, dtype=torch.float32, device=dev)
        self.u = torch.zeros(1, 2 * b, dtype=torch.float32, device=dev)  # [B-1 draft draws | B acceptance draws | 1]
        self.mask_tail = torch.full((b - 1,), mask_token_id, **i64)
        self.drafts = torch.zeros(b - 1, **i64)    # an external drafter's tokens (eager only)
        self.block = torch.zeros(b, **i64)         # the input of a lone draft/verify pass (benchmarks)
        self.graphs: dict[tuple[str, bool], torch.cuda.CUDAGraph] = {}
        self.use_graphs = True                     # off: the same bodies run eagerly (tests compare the two)

    # ---- bodies -------------------------------------------------------------------------------------------------
    def _pass(self, name: str, tokens: torch.Tensor) -> torch.Tensor:
        return self.programs[name](self.w, tokens, self.s, self.k_cache, self.v_cache)

    def _params(self):
        hot = self.temperature > 0
        return hot, torch.where(hot, self.temperature, 1.0)

    def _choose(self, logits: torch.Tensor, u: torch.Tensor, sampled: bool) -> torch.Tensor:
        """Argmax per row, or (sampled, temperature > 0) a draw from the filtered distribution with ``u``."""
        best = logits.argmax(-1)
        if not sampled:
            return best
        hot, t = self._params()
        probs = filter_logits(logits, t, self.top_k, self.top_p)
        return torch.where(hot, sample_token(probs, u), best)

    def body(self, kind: str, sampled: bool, external_drafts: bool = False) -> None:
        b = self.b
        if kind == "cycle":
            x = self.x[0]
            if external_drafts:  # drafts treated as certain: q = one-hot (keeps sampled output exact)
                drafts = self.drafts
                draft_logits = torch.full((b, self.vocab), float("-inf"), device=self.device)
                draft_logits[torch.arange(b - 1, device=self.device), drafts] = 0.0
                draft_logits[b - 1] = 0.0
            else:
                draft_logits = self._pass("draft", torch.cat([x, self.mask_tail]))
                drafts = self._choose(draft_logits[:-1], self.u[0, :b - 1], sampled)
            block = torch.cat([x, drafts])
            verify_logits = self._pass("verify", block)
            tokens, n = torch.ops.orthrus.accept(block[None], draft_logits[None], verify_logits[None],
                                                 self.u[:, b - 1:2 * b - 1], self.eos, self.temperature, self.top_k,
                                                 self.top_p, sampled)
            self.tokens.copy_(tokens)
            self.n.copy_(n)
            self.x.copy_(tokens.gather(1, (n - 1)[:, None]))
            self.s.add_(n[0])
        elif kind == "decode":
            logits = self._pass("decode", self.x[0])
            nxt = self._choose(logits, self.u[0, :1], sampled)
            self.tokens[:, :1].copy_(nxt[None])
            self.n.fill_(1)
            self.x.copy_(nxt[None])
            self.s.add_(1)
        elif kind in ("draft", "verify"):
            self._pass(kind, self.block)
        else:
            raise ValueError(f"unknown step {kind!r}")

    # ---- CUDA graphs --------------------------------------------------------------------------------------------
    def capture(self) -> float:
        """Capture every step (greedy and sampled cycle and decode) as CUDA graphs sharing one memory pool; the
        warm-up runs write the cache at s = 0, so this runs before any generation (at load). Returns seconds."""
        t0 = time.perf_counter()
        self.graphs = {}
        pool = torch.cuda.graph_pool_handle()
        for kind in STEPS:
            for sampled in (False, True):
                self.graphs[(kind, sampled)] = self._capture(kind, sampled, pool)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def _capture(self, kind: str, sampled: bool, pool=None) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # the first call compiles (Inductor) and loads the kernels
                self.s.zero_()
                self.body(kind, sampled)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.s.zero_()
        with torch.cuda.graph(graph, pool=pool), torch.no_grad():
            self.body(kind, sampled)
        return graph

    # ---- running ------------------------------------------------------------------------------------------------
    def start(self, x: int, s: int, eos_ids: list[int], temperature: float = 0.0, top_k: int = 0,
              top_p: float = 1.0) -> None:
        if len(eos_ids) > MAX_EOS:
            raise ValueError(f"at most {MAX_EOS} stop tokens")
        self.x.fill_(x)
        self.s.fill_(s)
        self.eos.fill_(-1)
        if eos_ids:
            self.eos[0, :len(eos_ids)] = torch.tensor(eos_ids, device=self.device)
        self.temperature.fill_(temperature)
        self.top_k.fill_(top_k)
        self.top_p.fill_(top_p)

    def step(self, kind: str, sampled: bool, uniforms: torch.Tensor | None = None,
             drafts: list[int] | None = None) -> list[int]:
        """Run one step (its graph where captured) and return the emitted tokens (one host read)."""
        if uniforms is not None:
            self.u.copy_(uniforms)
        if drafts is not None:
            self.drafts.copy_(torch.tensor(drafts[:self.b - 1], dtype=torch.int64))
            self.body(kind, sampled, external_drafts=True)
        elif self.graphs and self.use_graphs:
            self.graphs[(kind, sampled)].replay()
        else:
            self.body(kind, sampled)
        out = torch.cat([self.n, self.tokens[0]]).tolist()
        return out[1:1 + out[0]]

    def time(self, kind: str, context: int, iters: int, sampled: bool = False, warmup: int = 5) -> float:
        """Median milliseconds of one ``kind`` step at cache length ``context`` (CUDA events around graph replays
        on a GPU; the host clock around eager calls on the CPU). Overwrites the cache and the step buffers."""
        cuda = self.device.type == "cuda"
        if kind in ("draft", "verify") and cuda and (kind, False) not in self.graphs:
            self.graphs[(kind, False)] = self._capture(kind, False)
        self.x.fill_(5)
        self.block.random_(0, self.vocab)
        run = self.graphs[(kind, sampled)].replay if cuda else (lambda: self.body(kind, sampled))
        with torch.no_grad():  # the grad mode the programs were compiled and captured in
            times = time_it(run, iters, warmup, self.device, setup=lambda: self.s.fill_(context))
        return statistics.median(times)


def time_it(fn, iters: int, warmup: int = 5, device: torch.device = torch.device("cuda"),
            setup=None) -> list[float]:
    """Milliseconds per call of ``fn`` after ``warmup`` calls: CUDA events around each call on a GPU, the host clock
    on the CPU. ``setup`` (untimed) runs before every call."""
    cuda = device.type == "cuda"
    times = []
    for i in range(warmup + iters):
        if setup is not None:
            setup()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return times
