"""One cycle, written once: the device-tensor step bodies that every path runs, over a batch of rows.

A step runs ``b`` rows at once (b = the smallest batch bucket that holds the step's rows). Row ``i`` is one block of
one sequence: its cache slot, known token ``x``, cache length ``s``, sampling parameters, stop tokens and uniforms
are the row's inputs (``Steps.ints`` / ``Steps.floats``, written by the host before each step), so a step body is a
pure function of its rows and the cache, and one captured CUDA graph per (step, sampled, bucket) serves every
assignment of requests to rows. Padding rows point at the scratch slot (the cache's last) with length 0.

- ``cycle``: draft ``[x, M, …, M]`` -> drafts -> verify ``[x, d_1 … d_{B-1}]`` (writes K/V at s … s+B-1) ->
  ``orthrus::accept`` -> each row's tokens and count ``n``. A *prefill* row (``ints[:, PREFILL]``) verifies a chunk
  of its prompt instead (``ints[:, CHUNK:]``, ``chunk_len`` tokens at ``s``) and, as its output, the first new
  token chosen from the chunk's last logits (used by the host after the prompt's final chunk): prompts are prefilled
  inside the cycles of the running requests (chunked prefill), several chunks of one prompt in one step if rows
  allow.
- ``decode``: one AR step per row (the baseline).
- ``draft`` / ``verify``: one pass alone (benchmarks).

Drafts of sampled rows: ``argmax`` takes the draft distribution's argmax with a one-hot draft distribution
(``q = δ(d)``); ``sample`` draws them from the draft distribution. Both keep the output distributed exactly as the
base model's (speculative rejection sampling). Each body has a greedy and a sampled form (``sampled``: the sampling
parameters and uniforms are row tensors). The same body runs eagerly (CPU, tests, drafters) and is captured as CUDA
graphs on GPUs at load; the benchmark times the same replays. The host reads a step's result once.
"""

import statistics
import time
from dataclasses import dataclass, field

import torch

from orthrus_plugins.sampling import filter_logits, sample_token

MAX_EOS = 8
STEPS = ("cycle", "decode")
DRAFT_SAMPLING = ("argmax", "sample")
# columns of the int64 row inputs; CHUNK … CHUNK+B-1 hold a prefill row's prompt chunk
SLOT, X, S, TOP_K, PREFILL, CHUNK_LEN, EOS = range(7)
CHUNK = EOS + MAX_EOS
# columns of the float32 row inputs; U … U+2B-1: [B-1 draft draws | B acceptance draws | 1 first-token draw]
TEMPERATURE, TOP_P, U = range(3)


def buckets_for(max_rows: int) -> tuple[int, ...]:
    """The batch buckets of an engine: powers of two below ``max_rows``, and ``max_rows``."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    return tuple(out + [max_rows])


@dataclass
class Row:
    """One row of a step, as the host fills it."""
    slot: int
    x: int = 0
    s: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    eos: list[int] = field(default_factory=list)
    uniforms: torch.Tensor | None = None   # [2B] float32 (sampled rows)
    chunk: list[int] | None = None         # a prefill row's prompt chunk (≤ B tokens)
    drafts: list[int] | None = None        # an external drafter's B-1 tokens (eager only)


class Steps:
    def __init__(self, programs: dict, weights: dict, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_size: int, mask_token_id: int, vocab_size: int, device: torch.device,
                 buckets: tuple[int, ...] = (1,), draft_sampling: str = "sample"):
        if draft_sampling not in DRAFT_SAMPLING:
            raise ValueError(f"draft_sampling must be one of {DRAFT_SAMPLING}, got {draft_sampling!r}")
        self.programs, self.w, self.k_cache, self.v_cache = programs, weights, k_cache, v_cache
        self.b, self.vocab, self.device, self.mask = block_size, vocab_size, device, mask_token_id
        self.buckets, self.draft_sampling = tuple(buckets), draft_sampling
        self.scratch = k_cache.shape[1] - 1  # the padding rows' slot
        rows, b = self.buckets[-1], block_size
        self.ints = torch.zeros(rows, CHUNK + b, dtype=torch.int64, device=device)
        self.floats = torch.zeros(rows, U + 2 * b, dtype=torch.float32, device=device)
        self.out = torch.zeros(rows, 1 + b, dtype=torch.int64, device=device)  # [n | tokens]
        self.mask_tail = torch.full((b - 1,), mask_token_id, dtype=torch.int64, device=device)
        self.graphs: dict[tuple[str, bool, int], torch.cuda.CUDAGraph] = {}
        self.use_graphs = True                     # off: the same bodies run eagerly (tests compare the two)
        self._ext: tuple[torch.Tensor, torch.Tensor] | None = None  # external drafts (eager only)
        self.clear(rows)

    @property
    def max_rows(self) -> int:
        return self.buckets[-1]

    def bucket(self, rows: int) -> int:
        for b in self.buckets:
            if b >= rows:
                return b
        raise ValueError(f"{rows} rows exceed the largest batch bucket {self.buckets[-1]}")

    # ---- bodies -------------------------------------------------------------------------------------------------
    def _pass(self, name: str, tokens: torch.Tensor, s: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self.programs[name](self.w, tokens, s, slots, self.k_cache, self.v_cache)

    @staticmethod
    def _choose(logits, u, sampled: bool, temperature, top_k, top_p) -> torch.Tensor:
        """Argmax per row, or (sampled, temperature > 0) a draw from the filtered distribution with ``u``. Parameters
        are per row ``[b]``; ``logits`` ``[b, …, V]``."""
        best = logits.argmax(-1)
        if not sampled:
            return best
        hot = (temperature > 0).reshape(temperature.shape + (1,) * (best.dim() - 1))
        probs = filter_logits(logits, torch.where(temperature > 0, temperature, 1.0), top_k, top_p)
        return torch.where(hot, sample_token(probs, u), best)

    def body(self, kind: str, sampled: bool, rows: int) -> None:
        b = self.b
        ints, f = self.ints[:rows], self.floats[:rows]
        slots, x, s, top_k = ints[:, SLOT], ints[:, X], ints[:, S], ints[:, TOP_K]
        temperature, top_p, u = f[:, TEMPERATURE], f[:, TOP_P], f[:, U:]
        params = (temperature, top_k, top_p)
        if kind == "cycle":
            draft_in = torch.cat([x[:, None], self.mask_tail.expand(rows, b - 1)], dim=1)
            draft_logits = self._pass("draft", draft_in, s, slots)  # [b, B, V]
            if sampled and self.draft_sampling == "sample":
                drafts, q_logits = self._choose(draft_logits[:, :-1], u[:, :b - 1], True, *params), draft_logits
            else:  # argmax drafts; a sampled row's draft distribution is then the one-hot q = δ(d)
                drafts = draft_logits[:, :-1].argmax(-1)
                q_logits = self._one_hot(drafts) if sampled else draft_logits
            if self._ext is not None:  # drafts treated as certain: q = one-hot (keeps sampled output exact)
                ext, use = self._ext
                drafts = torch.where(use[:, None], ext, drafts)
                q_logits = torch.where(use[:, None, None], self._one_hot(ext), q_logits)
            prefill = ints[:, PREFILL] > 0
            block = torch.where(prefill[:, None], ints[:, CHUNK:], torch.cat([x[:, None], drafts], dim=1))
            verify_logits = self._pass("verify", block, s, slots)
            tokens, n = torch.ops.orthrus.accept(block, q_logits, verify_logits, u[:, b - 1:2 * b - 1],
                                                 ints[:, EOS:CHUNK], temperature, top_k, top_p, sampled)
            last = (ints[:, CHUNK_LEN] - 1).clamp(min=0)[:, None, None].expand(rows, 1, self.vocab)
            first = self._choose(verify_logits.gather(1, last)[:, 0], u[:, 2 * b - 1], sampled, *params)
            tokens = torch.cat([torch.where(prefill, first, tokens[:, 0])[:, None], tokens[:, 1:]], dim=1)
            n = torch.where(prefill, 1, n)
        elif kind == "decode":
            logits = self._pass("decode", x[:, None], s, slots)[:, 0]
            tokens = self._choose(logits, u[:, 0], sampled, *params)[:, None].expand(rows, b)
            n = torch.ones_like(x)
        elif kind in ("draft", "verify"):
            self._pass(kind, ints[:, CHUNK:], s, slots)
            return
        else:
            raise ValueError(f"unknown step {kind!r}")
        self.out[:rows, 0].copy_(n)
        self.out[:rows, 1:].copy_(tokens)

    def _one_hot(self, drafts: torch.Tensor) -> torch.Tensor:
        """Logits ``[b, B, V]`` of the one-hot distributions of ``drafts`` ``[b, B-1]`` (the last row, unused by
        acceptance, is uniform)."""
        rows, b = drafts.shape[0], self.b
        logits = torch.full((rows, b, self.vocab), float("-inf"), device=drafts.device)
        logits[:, :b - 1].scatter_(2, drafts[..., None], 0.0)
        logits[:, b - 1] = 0.0
        return logits

    # ---- CUDA graphs --------------------------------------------------------------------------------------------
    def capture(self) -> float:
        """Capture every step (greedy and sampled cycle and decode) at every bucket as CUDA graphs sharing one memory
        pool. The rows point at the scratch slot while capturing, so no sequence's cache is touched. Seconds."""
        t0 = time.perf_counter()
        self.graphs = {}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            self.warm_up()  # ascending: compiled programs specialise to 1 row, then to a symbolic row count
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for rows in reversed(self.buckets):  # the largest first: the pool's blocks then serve the smaller ones
            for kind in STEPS:
                for sampled in (False, True):
                    self.graphs[(kind, sampled, rows)] = self._capture(kind, sampled, rows, pool)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def warm_up(self) -> None:
        """Run every step once at every bucket, smallest first, on padding rows (compiles the programs)."""
        for rows in self.buckets:
            self.clear(rows)
            for kind in STEPS:
                self.body(kind, False, rows)

    def _capture(self, kind: str, sampled: bool, rows: int, pool=None) -> torch.cuda.CUDAGraph:
        self.clear(rows)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # the first call compiles (Inductor) and loads the kernels
                self.body(kind, sampled, rows)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool), torch.no_grad():
            self.body(kind, sampled, rows)
        return graph

    # ---- running ------------------------------------------------------------------------------------------------
    def clear(self, rows: int) -> None:
        """Rows 0 … rows-1 as padding: the scratch slot, length 0, greedy."""
        self.fill([], rows)

    def fill(self, rows: list[Row], bucket: int) -> None:
        """Write the rows' inputs (and padding up to ``bucket``) in one host-to-device copy per buffer (built as
        plain lists first: a tensor per field would cost more host time than a small model's step)."""
        b = self.b
        pad_ints = [self.scratch, 0, 0, 0, 0, 0] + [-1] * MAX_EOS + [self.mask] * b
        pad_floats = [0.0, 1.0] + [0.0] * (2 * b)
        ints, floats = [], []
        for r in rows:
            if len(r.eos) > MAX_EOS:
                raise ValueError(f"at most {MAX_EOS} stop tokens")
            chunk = r.chunk or []
            ints.append([r.slot, r.x, r.s, r.top_k, r.chunk is not None, len(chunk)]
                        + list(r.eos) + [-1] * (MAX_EOS - len(r.eos)) + list(chunk) + [self.mask] * (b - len(chunk)))
            u = r.uniforms.tolist() if r.uniforms is not None else [0.0] * (2 * b)
            floats.append([r.temperature, r.top_p] + u)
        ints += [pad_ints] * (bucket - len(rows))
        floats += [pad_floats] * (bucket - len(rows))
        self.ints[:bucket].copy_(torch.tensor(ints, dtype=torch.int64))
        self.floats[:bucket].copy_(torch.tensor(floats, dtype=torch.float32))

    def step(self, kind: str, rows: list[Row]) -> list[list[int]]:
        """Run one step over ``rows`` (its graph where captured; eagerly with external drafts) and return each row's
        emitted tokens (one host read). Sampled when any row has a temperature > 0."""
        bucket = self.bucket(len(rows))
        sampled = any(r.temperature > 0 for r in rows)
        self.fill(rows, bucket)
        if any(r.drafts is not None for r in rows):
            ext = torch.zeros(bucket, self.b - 1, dtype=torch.int64)
            use = torch.zeros(bucket, dtype=torch.bool)
            for i, r in enumerate(rows):
                if r.drafts is not None:
                    ext[i], use[i] = torch.tensor(r.drafts[:self.b - 1], dtype=torch.int64), True
            self._ext = (ext.to(self.device), use.to(self.device))
            try:
                self.body(kind, sampled, bucket)
            finally:
                self._ext = None
        elif self.graphs and self.use_graphs:
            self.graphs[(kind, sampled, bucket)].replay()
        else:
            self.body(kind, sampled, bucket)
        out = self.out[:len(rows)].tolist()
        return [o[1:1 + o[0]] for o in out]

    def _bench_rows(self, kind: str, context: int, sampled: bool, rows: int) -> int:
        """Fill ``rows`` benchmark rows (slots 0 … rows-1, every one at cache length ``context``, random block
        tokens; sampled rows at T 0.6, top-k 20, top-p 0.95) and return their bucket; on a GPU, capture the lone
        pass's graph if it is not there yet."""
        bucket = self.bucket(rows)
        if kind in ("draft", "verify") and self.device.type == "cuda" and (kind, False, bucket) not in self.graphs:
            self.graphs[(kind, False, bucket)] = self._capture(kind, False, bucket)
        gen = torch.Generator().manual_seed(0)
        self.fill([Row(slot=i, x=5, s=context, temperature=0.6 if sampled else 0.0, top_k=20 if sampled else 0,
                       top_p=0.95 if sampled else 1.0, uniforms=torch.rand(2 * self.b, generator=gen))
                   for i in range(rows)], bucket)
        self.ints[:bucket, CHUNK:].random_(0, self.vocab)
        return bucket

    def time(self, kind: str, context: int, iters: int, sampled: bool = False, rows: int = 1,
             warmup: int = 5) -> float:
        """Median milliseconds of one ``kind`` step over ``rows`` rows (slots 0 … rows-1, every one at cache length
        ``context``): CUDA events around graph replays on a GPU; the host clock around eager calls on the CPU.
        Overwrites those slots' cache and the row inputs."""
        bucket = self._bench_rows(kind, context, sampled, rows)
        cuda = self.device.type == "cuda"
        run = self.graphs[(kind, sampled, bucket)].replay if cuda else (lambda: self.body(kind, sampled, bucket))
        with torch.no_grad():  # the grad mode the programs were compiled and captured in
            times = time_it(run, iters, warmup, self.device)
        return statistics.median(times)

    def profile(self, kind: str, context: int, iters: int, sampled: bool = False, rows: int = 1) -> list[dict]:
        """What one ``kind`` step over ``rows`` rows (set up as ``time`` sets them up) spends its time in, from
        torch.profiler over ``iters`` eager calls of the step body (after one untimed call), per call. On a GPU:
        each CUDA kernel by name (``ms`` of device time, ``launches``); on the CPU: each operator's self time, with
        ``within`` naming the outermost ``orthrus::`` op it ran inside (the reference attention's matmuls belong to
        the attention), else None. Sorted by time, largest first. Overwrites those slots' cache and the row inputs."""
        from torch.profiler import ProfilerActivity, profile
        bucket = self._bench_rows(kind, context, sampled, rows)
        cuda = self.device.type == "cuda"
        with torch.no_grad():
            self.body(kind, sampled, bucket)
            if cuda:
                torch.cuda.synchronize()
            acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
            with profile(activities=acts) as prof:  # on a GPU, the kernels' device time is what is kept
                for _ in range(iters):
                    self.body(kind, sampled, bucket)
                if cuda:
                    torch.cuda.synchronize()
        table: dict = {}
        for e in prof.events():
            if cuda != (e.device_type == torch.autograd.DeviceType.CUDA):
                continue
            within, up = None, e.cpu_parent
            while up is not None and not cuda:
                within = up.name if up.name.startswith("orthrus::") else within
                up = up.cpu_parent
            ms = (e.device_time_total if cuda else e.self_cpu_time_total) / 1e3 / iters
            entry = table.setdefault((e.name, within), {"name": e.name, "within": within, "ms": 0.0, "launches": 0.0})
            entry["ms"] += ms
            entry["launches"] += 1 / iters
        for entry in table.values():
            entry["launches"] = round(entry["launches"], 2)
        return sorted(table.values(), key=lambda r: -r["ms"])


def graph_time(fn_of, copies: int, reps: int, iters: int) -> float:
    """Milliseconds per call of kernels too short to time one launch at a time (CUDA only): ``fn_of(i)`` for input
    set ``i % copies`` (several sets, so that each call reads its inputs from device memory rather than L2), ``reps``
    calls captured into one CUDA graph, the median over ``iters`` replays timed with CUDA events."""
    for i in range(copies):
        fn_of(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for r in range(reps):
            fn_of(r % copies)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
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
