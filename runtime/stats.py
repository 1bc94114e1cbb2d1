"""Statistics of one generation. Acceptance length (tokens per cycle) and TPF (tokens per forward pass) are
different metrics: a cycle is two passes, so TPF ≈ acceptance length / 2."""

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

    def __post_init__(self):
        if not self.acceptance_hist:
            self.acceptance_hist = [0] * (self.block_size + 1)

    def record_cycle(self, emitted: int) -> None:
        self.cycles += 1
        self.cycle_tokens += emitted
        self.acceptance_hist[emitted] += 1

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
        for k in ("acceptance_length", "tpf", "tokens_per_s", "decode_tokens_per_s"):
            d[k] = getattr(self, k)
        return d

    def summary(self) -> str:
        return (f"{self.new_tokens} tokens in {self.prefill_s + self.decode_s:.3f} s "
                f"({self.tokens_per_s:.1f} tok/s; prefill {self.prompt_tokens} tokens {self.prefill_s * 1e3:.1f} ms) | "
                f"cycles {self.cycles}, acceptance length {self.acceptance_length:.2f}, TPF {self.tpf:.2f}")
