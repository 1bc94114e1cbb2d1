"""In-flight batching: a thread-safe request queue and the scheduler thread that runs every request's steps.

``Scheduler.submit`` queues a request (bounded: a full queue refuses it at once) and returns its ``Handle``. One
thread owns the engine's step buffers and cache; each iteration it

1. finishes cancelled requests (their slot is free before the next step is built);
2. gives free cache slots to waiting requests, in arrival order;
3. builds one ``cycle`` step: a row for every running request (drafting), then prompt chunks of the requests still
   prefilling (chunked prefill: at most ``prefill_chunks`` rows a step, more when they only fill the bucket's
   padding), and one ``decode`` step for running requests that decode without drafts (the AR baseline);
4. hands each request its tokens: EOS, ``max_new_tokens`` and stop strings end it and free its slot at once.

Running requests never wait for a prompt: prefill chunks ride in the same passes. A request's random numbers come
from its own generator (seeded by the request), drawn per step whatever else is in the batch: its output does not
depend on the other requests. Errors in a step fail the requests in that step (their handles raise), and the
scheduler goes on serving the others.
"""

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from orthrus_runtime.cycle import Row, Steps
from orthrus_runtime.errors import OrthrusError
from orthrus_runtime.stats import EngineStats, GenerationStats
from orthrus_runtime.text import StopStrings

# A draft source other than the diffusion view (for experiments and tests): called with the cache length ``s``,
# the known token ``x`` and all tokens so far; returns B-1 draft tokens. Drafts are then treated as certain
# (q = one-hot), which keeps sampled output exact.
Drafter = Callable[[int, int, list[int]], list[int]]

_DONE = object()
IDLE_EXIT_S = 2.0


class QueueFull(OrthrusError):
    """The scheduler's queue is full: the request was not queued."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    seed: int
    eos_ids: list[int]
    stats: GenerationStats
    use_drafts: bool = True
    drafter: Drafter | None = None
    stops: StopStrings | None = None
    id: int = 0
    # scheduler state
    slot: int | None = None
    prefilled: int = 0
    x: int = 0
    out: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    submitted: float = 0.0
    admitted: float = 0.0
    first_at: float = 0.0
    chunks: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    finished: bool = False

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)


class Handle:
    """A submitted request: iterate it for the new tokens as they are emitted (lists of ids), ``cancel()`` it, or
    ``wait()`` for all of them. ``stats`` fill in as it runs; ``finish_reason`` is set when it ends."""

    def __init__(self, scheduler: "Scheduler", request: Request):
        self._scheduler, self._req = scheduler, request
        self.id = request.id
        self.stats = request.stats
        self.prompt_ids = request.prompt
        self.stops = request.stops
        self._consumed = False

    def __iter__(self):
        if self._consumed:
            raise RuntimeError("a request's handle can be iterated once")
        self._consumed = True
        while True:
            item = self._req.chunks.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def wait(self) -> list[int]:
        """All new tokens (blocks until the request ends)."""
        return [t for chunk in self for t in chunk]

    def cancel(self) -> None:
        """Stop generating: the request's slot is freed before the scheduler's next step."""
        self._scheduler.cancel(self._req)

    @property
    def finished(self) -> bool:
        return self._req.finished

    @property
    def finish_reason(self) -> str | None:
        return self.stats.finish_reason

    @property
    def output_ids(self) -> list[int]:
        return list(self._req.out)


class Scheduler:
    def __init__(self, steps: Steps, slots: int, lock: threading.RLock, max_queue: int = 256,
                 prefill_chunks: int | None = None, name: str = "orthrus-scheduler"):
        self.steps, self.slots, self.lock = steps, slots, lock
        self.max_queue = max_queue
        self.prefill_chunks = max(1, prefill_chunks or steps.max_rows)
        self.name = name
        self.stats = EngineStats(slots=slots)
        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []            # admitted, in admission order
        self._free = list(range(slots))
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stop = False

    # ---- callers' side ------------------------------------------------------------------------------------------
    def submit(self, req: Request) -> Handle:
        with self._cv:
            if self._stop:
                raise OrthrusError("the engine is closed: load it again")
            if len(self._waiting) >= self.max_queue:
                self.stats.requests_rejected += 1
                raise QueueFull(f"the request queue is full ({len(self._waiting)} waiting, max_queue "
                                f"{self.max_queue}): retry later or raise max_queue")
            req.id = next(self._ids)
            req.submitted = time.perf_counter()
            req.generator = torch.Generator().manual_seed(req.seed)
            self._waiting.append(req)
            self.stats.waiting = len(self._waiting)
            if self._thread is None:  # started on demand; it ends when idle
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cv.notify()
        return Handle(self, req)

    def cancel(self, req: Request) -> None:
        with self._cv:
            if req.finished:
                return
            req.cancelled = True
            if req in self._waiting:  # never admitted: ends now
                self._waiting.remove(req)
                self.stats.waiting = len(self._waiting)
                self._finish(req, "cancelled")
            self._cv.notify()

    @property
    def busy(self) -> bool:
        with self._cv:
            return bool(self._waiting or self._active)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            thread = self._thread
            self._cv.notify()
        if thread is not None:
            thread.join()

    # ---- the scheduler thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        """The scheduler thread. It ends after ``IDLE_EXIT_S`` without work (``submit`` starts a new one), so an
        engine nobody uses holds no thread, and its cache can be freed."""
        torch.set_grad_enabled(False)  # the grad mode the programs were compiled and captured in (per thread)
        while True:
            with self._cv:
                if not self._stop and not self._waiting and not self._active:
                    self._cv.wait(timeout=IDLE_EXIT_S)
                    if not self._stop and not self._waiting and not self._active:
                        self._thread = None
                        return
                if self._stop:
                    for req in list(self._waiting) + self._active:
                        self._fail(req, OrthrusError("the engine was closed"))
                    return
                self._drop_cancelled()
                self._admit()
                work = list(self._active)
            if work:
                try:
                    self._iteration(work)
                except Exception as e:  # a bug here must not kill the thread that serves everyone
                    with self._cv:
                        for req in work:
                            self._fail(req, e)

    def _drop_cancelled(self) -> None:
        for req in [r for r in self._active if r.cancelled]:
            self._finish(req, "cancelled")

    def _admit(self) -> None:
        now = time.perf_counter()
        while self._free and self._waiting:
            req = self._waiting.popleft()
            req.slot = self._free.pop(0)
            req.admitted = now
            req.stats.queue_s = now - req.submitted
            self._active.append(req)
        self.stats.waiting = len(self._waiting)
        self.stats.slots_in_use = len(self._active)

    def _iteration(self, work: list[Request]) -> None:
        """One cycle step (running drafters plus prefill chunks) and one decode step (running AR requests)."""
        b = self.steps.b
        cycle, decode = [], []
        for req in work:
            if req.prefilling:
                continue
            try:
                row = self._row(req)
            except Exception as e:  # e.g. a drafter that raises: that request fails, the others go on
                with self._cv:
                    self._fail(req, e)
                continue
            (cycle if req.use_drafts else decode).append((req, row))
        # prompt chunks in admission order: at most prefill_chunks rows, or more where they only fill rows the bucket
        # pads anyway; never more rows than the largest bucket
        chunks = []
        for req in (r for r in work if r.prefilling):
            for start in range(req.prefilled, len(req.prompt), b):
                chunks.append((req, start))
        chunks = chunks[:self.steps.max_rows - len(cycle)]
        if len(chunks) > self.prefill_chunks:
            fill = self.steps.bucket(len(cycle) + self.prefill_chunks) - len(cycle)
            chunks = chunks[:max(self.prefill_chunks, fill)]
        for req, start in chunks:
            chunk = req.prompt[start:start + b]
            final = start + len(chunk) == len(req.prompt)
            cycle.append((req, Row(slot=req.slot, s=start, chunk=chunk, **self._params(req, draw=final)),
                          start + len(chunk)))
        for kind, items in (("cycle", cycle), ("decode", decode)):
            if items:
                self._step(kind, items)

    def _params(self, req: Request, draw: bool) -> dict:
        """A row's sampling inputs; ``draw``: the row chooses tokens (not a prompt chunk before the last), so a
        sampled request draws its uniforms for it from its own generator."""
        sp = req.sampling
        if not draw or sp.greedy:
            return dict(eos=req.eos_ids)
        return dict(temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, eos=req.eos_ids,
                    uniforms=torch.rand(2 * self.steps.b, generator=req.generator))

    def _row(self, req: Request) -> Row:
        s = len(req.prompt) + len(req.out) - 1  # the known token x is not in the cache yet
        drafts = None
        if req.drafter is not None and req.use_drafts:
            drafts = req.drafter(s, req.x, req.prompt + req.out)
        return Row(slot=req.slot, x=req.x, s=s, drafts=drafts, **self._params(req, draw=True))

    def _step(self, kind: str, items: list[tuple]) -> None:
        rows = [it[1] for it in items]
        try:
            with self.lock:
                emitted = self.steps.step(kind, rows)
        except Exception as e:  # fail this step's requests, keep serving
            with self._cv:
                for req in {it[0] for it in items}:
                    self._fail(req, e)
            return
        now = time.perf_counter()
        bucket = self.steps.bucket(len(rows))
        with self._cv:
            st = self.stats
            st.steps += 1
            st.rows += len(rows)
            st.padded_rows += bucket
            st.passes += 2 if kind == "cycle" else 1
            st.active_hist[min(len({id(it[0]) for it in items}), self.slots)] += 1
            for it, tokens in zip(items, emitted):
                req = it[0]
                if req.finished:
                    continue
                if req.cancelled:
                    self._finish(req, "cancelled")
                    continue
                if len(it) == 3:  # a prefill chunk
                    st.prefill_rows += 1
                    req.prefilled = it[2]
                    req.stats.prefill_passes += 1
                    if req.prefilling:
                        continue
                    tokens = tokens[:1]  # the first new token
                    req.first_at = now
                    req.stats.ttft_s = now - req.submitted
                    req.stats.prefill_s = now - req.admitted
                elif kind == "cycle":
                    req.stats.record_cycle(len(tokens))
                    req.stats.draft_passes += req.drafter is None
                    req.stats.verify_passes += 1
                else:
                    req.stats.decode_passes += 1
                self._emit(req, tokens, now)

    def _emit(self, req: Request, tokens: list[int], now: float) -> None:
        req.x = tokens[-1]
        tokens = tokens[:req.max_new_tokens - len(req.out)]
        reason = None
        if req.stops is not None:
            k = req.stops.cut(req.out, tokens)
            if k is not None:
                tokens, reason = tokens[:k], "stop"
        req.out += tokens
        self.stats.tokens += len(tokens)
        req.stats.decode_s = now - req.first_at
        if tokens:
            req.chunks.put(tokens)
        if reason is None and req.out and req.out[-1] in req.eos_ids:
            reason = "eos"
        if reason is None and len(req.out) >= req.max_new_tokens:
            reason = "length"
        if reason is not None:
            self._finish(req, reason)

    def _release(self, req: Request) -> None:
        if req in self._active:
            self._active.remove(req)
            self._free.append(req.slot)
            self._free.sort()
        self.stats.slots_in_use = len(self._active)

    def _finish(self, req: Request, reason: str) -> None:
        req.finished = True
        req.stats.finish_reason = reason
        req.stats.new_tokens = len(req.out)
        self._release(req)
        if reason == "cancelled":
            self.stats.requests_cancelled += 1
        else:
            self.stats.requests_finished += 1
        req.chunks.put(_DONE)

    def _fail(self, req: Request, error: BaseException) -> None:
        if req.finished:
            return
        req.finished = True
        req.stats.finish_reason = "error"
        self._release(req)
        self.stats.requests_failed += 1
        if not isinstance(error, OrthrusError):
            error = OrthrusError(f"generation failed: {type(error).__name__}: {str(error)[:200]}")
        req.chunks.put(error)
