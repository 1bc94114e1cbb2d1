"""Statistics of one generation and of an engine's scheduler. Acceptance length (tokens per cycle) and TPF (tokens
per forward pass) are different metrics: a cycle is two passes, so TPF ≈ acceptance length / 2.

Timing (``GenerationStats``): ``queue_s`` submission -> a slot; ``ttft_s`` submission -> first token;
``prefill_s`` slot -> first token (the prompt's chunks, shared with other requests' cycles); ``decode_s`` first ->
last token; ``itl_s`` the mean gap between successive tokens after the first (a cycle's tokens arrive together: its
gap is spread over them, as vLLM and TensorRT-LLM report inter-token latency)."""

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationStats:
    block_size: int
    prompt_tokens: int = 0
    new_tokens: int = 0
    cycles: int = 0
    cycle_tokens: int = 0          # tokens emitted by cycles (after an EOS cut, before the max_new_tokens cut)
    acceptance_hist: list[int] = field(default_factory=list)  # acceptance_hist[k]: cycles that emitted k tokens
    prefill_passes: int = 0
    draft_passes: int = 0
    verify_passes: int = 0
    decode_passes: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    queue_s: float = 0.0
    ttft_s: float = 0.0
    accepted_per_pos: list[int] = field(default_factory=list)  # [i]: cycles whose draft i+1 was accepted
    finish_reason: str | None = None  # eos, length, stop, cancelled

    def __post_init__(self):
        if not self.acceptance_hist:
            self.acceptance_hist = [0] * (self.block_size + 1)
        if not self.accepted_per_pos:
            self.accepted_per_pos = [0] * (self.block_size - 1)

    def record_cycle(self, emitted: int) -> None:
        """A cycle that emitted ``emitted`` tokens: ``emitted - 1`` accepted drafts (positions 1 … emitted-1) and the
        verifier's token."""
        self.cycles += 1
        self.cycle_tokens += emitted
        self.acceptance_hist[emitted] += 1
        for i in range(emitted - 1):
            self.accepted_per_pos[i] += 1

    @property
    def acceptance_by_position(self) -> list[float]:
        """Fraction of cycles whose draft at position i+1 was accepted (vLLM's ``num_accepted_tokens_per_pos`` over
        the number of cycles)."""
        return [a / self.cycles for a in self.accepted_per_pos] if self.cycles else []

    @property
    def itl_s(self) -> float:
        return self.decode_s / (self.new_tokens - 1) if self.new_tokens > 1 else 0.0

    @property
    def acceptance_length(self) -> float:
        """Mean tokens per cycle (n+1): what the Orthrus paper and vLLM call acceptance length."""
        return self.cycle_tokens / self.cycles if self.cycles else 0.0

    @property
    def tpf(self) -> float:
        """Tokens per forward pass in the decode phase (draft and verify passes, or decode steps, all count)."""
        passes = self.draft_passes + self.verify_passes + self.decode_passes
        tokens = self.cycle_tokens if self.cycles else self.decode_passes
        return tokens / passes if passes else 0.0

    @property
    def tokens_per_s(self) -> float:
        """New tokens over the whole generation time (prefill included)."""
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the decode time (prefill excluded)."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("acceptance_length", "tpf", "tokens_per_s", "decode_tokens_per_s", "itl_s",
                  "acceptance_by_position"):
            d[k] = getattr(self, k)
        return d

    def summary(self) -> str:
        return (f"{self.new_tokens} tokens in {self.prefill_s + self.decode_s:.3f} s "
                f"({self.tokens_per_s:.1f} tok/s; prefill {self.prompt_tokens} tokens {self.prefill_s * 1e3:.1f} ms) | "
                f"cycles {self.cycles}, acceptance length {self.acceptance_length:.2f}, TPF {self.tpf:.2f}")


@dataclass
class EngineStats:
    """Counters of an engine's scheduler since load (``Engine.scheduler_stats()``)."""
    slots: int
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_rejected: int = 0       # refused at submission: the queue was full
    requests_failed: int = 0
    steps: int = 0                   # cycle and decode steps (each one pass pair, or one pass)
    rows: int = 0                    # rows run by those steps (occupied, not padding)
    padded_rows: int = 0             # the buckets' rows (occupied + padding)
    prefill_rows: int = 0
    tokens: int = 0                  # tokens emitted
    passes: int = 0                  # forward passes run (a cycle is two)
    slots_in_use: int = 0            # now
    waiting: int = 0                 # now
    active_hist: list[int] = field(default_factory=list)  # [k]: steps that ran k requests' rows

    def __post_init__(self):
        if not self.active_hist:
            self.active_hist = [0] * (self.slots + 1)

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.passes if self.passes else 0.0

    @property
    def mean_batch(self) -> float:
        return self.rows / self.steps if self.steps else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_pass"], d["mean_batch"] = self.tokens_per_pass, self.mean_batch
        return d
