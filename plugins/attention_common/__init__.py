"""What ``orthrus::cached_attention`` and ``orthrus::diffusion_attention`` share: the plain attention of their
reference implementations (here), one Triton kernel for both (``kernel.py``), the standard-ONNX spelling of the
attention (``onnx.py``) and the ONNX Runtime helpers (``onnxruntime.py``). Not an op itself.

Both ops come in two layouts (see their contracts):

- **single sequence**: ``q`` ``[T, Hq, D]``, caches ``[L, Hkv, C, D]``, ``cache_len`` a scalar, ``slots`` None (the
  ONNX export's graphs);
- **batched**: ``q`` ``[b·T, Hq, D]`` (b rows of T tokens, row-major), caches ``[L, S, Hkv, C, D]`` (S sequence
  slots), ``cache_len`` ``[b]`` and ``slots`` ``[b]`` int64: row ``i`` is a block of T tokens of the sequence in
  cache slot ``slots[i]`` at positions ``cache_len[i] …``. Several rows may name one slot (consecutive prefill
  chunks of one prompt): the causal op writes every row's K/V before any row attends.
"""

from dataclasses import dataclass

import torch

DEFAULT_SPLITS = 16  # the attention ops' default ``splits`` (key ranges); engines record their own (tuned) value
DEFAULT_BLOCK_N = 64  # the attention ops' default ``block_n`` (keys per kernel loop iteration); engines may set 32


@dataclass(frozen=True)
class Launch:
    """How the kernels are launched (not what they compute: every choice gives the same function, each its own
    summation order — and ``partials`` its own rounding of each split's output; a row's result never depends on the
    other rows for any of them). ``None``: the default
    (``num_warps`` 8 for a [M_BLOCK, D] accumulator of at least 128×64 elements, else 4; ``num_stages`` Triton's).
    ``scripts/sweep_attention_launch.py`` and ``scripts/bench_attention_splits.py --launches`` time the alternatives
    on a GPU. The ops take it as their ``launch`` attribute, a :meth:`from_spec` string (an engine's
    ``attention_launch`` option, which the build's autotuner chooses among ``LAUNCH_CANDIDATES``)."""
    block_n: int = DEFAULT_BLOCK_N  # keys per loop iteration of the split kernel
    num_warps: int | None = None
    num_stages: int | None = None
    # query rows per merge program: one program a head serialised 36 us a layer on an H100; 16 rows gave 27.7 us
    # at batch 1 (verify, 16 splits), 4 rows 24.4 us, bitwise the same output (benchmarks/h100-attention-launch.json)
    merge_rows: int = 4
    # the dtype of the split partials' outputs (each split's attention output, normalised by its own sum) as stored
    # for the merge; None: the inputs' (bf16 engines bf16, fp32 engines fp32), as vLLM's split attention stores
    # them. In fp32, at 16 splits, they were as many bytes as the K/V they summarise (a program's 128 query rows of
    # 128 values against its 256 keys' K and V in bf16); bf16 halves that traffic for one rounding of each split's
    # output, the same in a row's decode step and verify block. Maxima and sums stay fp32.
    partials: torch.dtype | None = None
    # a cap on the split kernel's registers a thread (Triton's maxnreg), None: the compiler's choice. Statically
    # (scripts/kernel_report.py --attention-launch): at 128 every 8B and 1.7B split launch compiles without spills,
    # where the compiler's choice is 174-224 at 8 warps, one program an SM; with num_stages 2 (96 KB of shared
    # memory at 8B) two programs then fit an SM. Measured on the H100 (8B, 16 splits; the one-tile merge then, the
    # same in every launch): the cap alone slower (verify 25.0 -> 27.3 us at batch 1, 159 -> 172 at batch 8); with two
    # stages slower at batch 1 (27.9) and 6-12 us faster at batch 8 (verify 150, draft 182 vs 194, decode 101 vs 107;
    # benchmarks/h100-2026-12-07-night-attention-*.log): an option, not the default.
    max_registers: int | None = None
    # the split kernel's programs as the rows grow: each takes FOLD consecutive key-range splits (the largest power
    # of two dividing the splits that keeps at least this many programs an SM), one after the other, each from
    # scratch and stored as its own part — the same partials and the same merge as one split a program, so a row's
    # result never depends on the fold (bitwise; the GPU tests compare rows alone, unfolded, with their batched
    # rows). None: one split a program. A batch-8 8B verify call was 1,024 programs of four 64-key iterations,
    # each loading its 128 query rows and filling its pipeline first; at batch 1 (128 programs) nothing folds.
    # Measured on the H100 (8B, 16 splits): programs_per_sm=1 took a batch-8 verify call alone 125.2 -> 119.1 us,
    # draft 116.5 -> 111.3, batch 1 unchanged; the compiled batch-8 cycle 25.26 -> 25.04 ms, within run-to-run
    # noise (benchmarks/h100-2026-12-07-eighth-*): an option and an autotuner candidate, not the default.
    programs_per_sm: int | None = None

    def __post_init__(self):
        """However a launch is made (a spec, ``replace``, a benchmark), its tiles and warps are powers of two."""
        for name in ("block_n", "merge_rows", "num_warps"):
            value = getattr(self, name)
            if value is not None and (value < 1 or value & (value - 1)):
                raise ValueError(f"{name} must be a power of two, got {value}")

    def fold(self, splits: int, programs: int, sms: int) -> int:
        """Splits a split-kernel program takes: ``programs`` at one split each, on a device of ``sms`` SMs."""
        fold = 1
        while (self.programs_per_sm and splits % (2 * fold) == 0
               and programs // (2 * fold) >= self.programs_per_sm * sms):
            fold *= 2
        return fold

    @classmethod
    def from_spec(cls, spec: str) -> "Launch":
        """A launch from ``"field=value,..."`` over the defaults (``"default"`` or ``""``: the defaults), e.g.
        ``"num_stages=2,max_registers=128"`` or ``"partials=float32"``. ValueError (one line) for anything else:
        an unknown field, a value that is not a positive integer (block sizes and warps: powers of two), partials
        other than float32, bfloat16 or float16."""
        fields = {}
        for item in filter(None, spec.replace("default", "").split(",")):
            name, _, value = item.partition("=")
            dtype = getattr(torch, value, None) if name == "partials" else None
            ok = (dtype in (torch.float32, torch.bfloat16, torch.float16) if name == "partials"
                  else value.isdigit() and int(value) > 0)
            if name not in cls.__dataclass_fields__ or not ok:
                raise ValueError(f"attention launch spec {spec!r}: {item!r} is not field=value of "
                                 f"{', '.join(cls.__dataclass_fields__)} (a positive integer, a power of two for "
                                 "block_n, merge_rows and num_warps; float32, bfloat16 or float16 for partials)")
            fields[name] = dtype if name == "partials" else int(value)
        try:
            return cls(**fields)
        except ValueError as e:  # a block size or warp count not a power of two (__post_init__)
            raise ValueError(f"attention launch spec {spec!r}: {e}") from None

    def spec(self) -> str:
        """The :meth:`from_spec` string of this launch: its fields that differ from the defaults ("" for none)."""
        return ",".join(f"{name}={str(value).removeprefix('torch.')}" for name, value in
                        ((f, getattr(self, f)) for f in self.__dataclass_fields__)
                        if value != getattr(DEFAULT_LAUNCH, name))


DEFAULT_LAUNCH = Launch()

# launches the build's autotuner times (at the best splits and key tile), the default first: two programs an SM at
# batch 8 (6-12 us faster a call on the H100, 2-3 us slower at batch 1), fp32 split outputs (bf16 ones were 6-11%
# slower at batch 1, 10% faster at batch 8: the README's "GPU engines") and folded split programs (5% faster a
# batch-8 call alone, within noise in the cycle; bitwise the default's output, so the autotuner's timing decides)
LAUNCH_CANDIDATES = ("", "num_stages=2,max_registers=128", "partials=float32", "programs_per_sm=1")


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
           mask: torch.Tensor | None) -> torch.Tensor:
    """Plain GQA attention in float32.

    q: [T, Hq, D]; keys, values: [Hkv, S, D]; mask: bool [T, S] (True = may attend) or None.
    Returns [T, Hq, D] in q's dtype.
    """
    t, hq, d = q.shape
    hkv = keys.shape[0]
    group = hq // hkv
    qf = q.float().reshape(t, hkv, group, d).permute(1, 2, 0, 3)  # [Hkv, G, T, D]
    scores = torch.matmul(qf, keys.float().transpose(-1, -2).unsqueeze(1)) * scale  # [Hkv, G, T, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values.float().unsqueeze(1))  # [Hkv, G, T, D]
    return out.permute(2, 0, 1, 3).reshape(t, hq, d).to(q.dtype).contiguous()


def batched_view(k_cache, v_cache, cache_len, slots):
    """Both layouts as the batched one: ``(k_cache [L, S, Hkv, C, D], v_cache, cache_len [b], slots [b])``. A
    single-sequence call is one row in slot 0 (the caches are viewed, not copied)."""
    if slots is None:
        return k_cache.unsqueeze(1), v_cache.unsqueeze(1), cache_len.reshape(1), cache_len.new_zeros(1)
    return k_cache, v_cache, cache_len, slots


def check_shapes(name: str, q, k, v, k_cache, v_cache, cache_len, layer: int, slots) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{name}: q, k, v must be [T, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    want = 4 if slots is None else 5
    layout = "[L, Hkv, C, D]" if slots is None else "[L, S, Hkv, C, D] (with slots)"
    if k_cache.dim() != want or k_cache.shape != v_cache.shape:
        raise ValueError(f"{name}: k_cache and v_cache must both be {layout}, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    hkv_cache = k_cache.shape[-3]
    if q.shape[1] % k.shape[1] != 0 or k.shape[1] != hkv_cache:
        raise ValueError(f"{name}: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads "
                         f"(cache has {hkv_cache})")
    if not 0 <= layer < k_cache.shape[0]:
        raise ValueError(f"{name}: layer {layer} outside the cache's {k_cache.shape[0]} layers")
    if slots is not None and (cache_len.shape != slots.shape or cache_len.dim() != 1
                              or q.shape[0] % max(1, slots.shape[0]) != 0):
        raise ValueError(f"{name}: cache_len {tuple(cache_len.shape)} and slots {tuple(slots.shape)} must both be [b] "
                         f"with b dividing the {q.shape[0]} query rows")


def reference(name: str, q, k, v, k_cache, v_cache, cache_len, layer: int, scale: float, causal: bool, slots):
    """The reference of both ops (either layout): causal (cached) mode writes each row's K/V into its slot at
    ``cache_len[i] …`` and attends causally; diffusion mode attends to the slot's first ``cache_len[i]`` positions
    plus the row's own block, writing nothing."""
    check_shapes(name, q, k, v, k_cache, v_cache, cache_len, layer, slots)
    kc, vc, lens, sl = batched_view(k_cache, v_cache, cache_len, slots)
    lens, sl = [int(n) for n in lens.tolist()], [int(s) for s in sl.tolist()]
    b = len(lens)
    t = q.shape[0] // b
    cap = kc.shape[3]
    for n, s in zip(lens, sl):
        if not 0 <= s < kc.shape[1]:
            raise ValueError(f"{name}: slot {s} outside the cache's {kc.shape[1]} slots")
        if n < 0 or n + t > cap:
            raise ValueError(f"{name}: cache_len {n} + block {t} exceeds cache capacity {cap}")
    if causal:  # every row's K/V first: a later chunk of one prompt sees an earlier one's
        for i, (n, s) in enumerate(zip(lens, sl)):
            kc[layer, s, :, n:n + t] = k[i * t:(i + 1) * t].transpose(0, 1)
            vc[layer, s, :, n:n + t] = v[i * t:(i + 1) * t].transpose(0, 1)
    out = []
    for i, (n, s) in enumerate(zip(lens, sl)):
        rows = slice(i * t, (i + 1) * t)
        if causal and q.dtype != torch.float32:
            # bf16/fp16: query j over exactly the keys it sees, one at a time, so that a verify row computes what the
            # decode step at its position computes (a longer masked row or a bigger matmul can round differently in
            # float32, and that can flip a bf16 rounding): the engine's Orthrus output then equals its own AR output
            out.append(torch.cat([attend(q[rows][j:j + 1], kc[layer, s, :, :n + j + 1], vc[layer, s, :, :n + j + 1],
                                         scale, None) for j in range(t)]))
        elif causal:  # query j (position n+j) sees keys at positions <= n+j
            mask = torch.arange(n + t, device=q.device)[None, :] <= (n + torch.arange(t, device=q.device))[:, None]
            out.append(attend(q[rows], kc[layer, s, :, :n + t], vc[layer, s, :, :n + t], scale, mask))
        else:
            keys = torch.cat([kc[layer, s, :, :n], k[rows].transpose(0, 1)], dim=1)
            values = torch.cat([vc[layer, s, :, :n], v[rows].transpose(0, 1)], dim=1)
            out.append(attend(q[rows], keys, values, scale, mask=None))
    return torch.cat(out) if b > 1 else out[0]
