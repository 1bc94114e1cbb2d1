"""GPU kernels (Triton) for ``orthrus::diffusion_attention`` and ``orthrus::cached_attention``.

Split-K ("flash-decoding") attention for b rows of B queries each (one row per sequence slot, or several for the
chunks of one prompt; b = 1 is a single sequence). Each row's cache length and slot are read from device memory
inside the kernel, so one launch configuration — and one captured CUDA graph — serves every length and every
assignment of rows to slots.

- grid ``(Hkv, PARTS · MB, b)``: each program takes one row, one KV head and a tile of ``M_BLOCK`` of its
  ``M = B·G`` query rows (``G = Hq / Hkv`` query heads for each of the row's B block positions; ``MB = M_PAD /
  M_BLOCK`` query blocks, ``M_PAD`` the rows padded to whole tiles; 1 by default: then each K/V tile is read once per
  group), and one slice of the row's key range (``PARTS = SPLITS`` in cached mode, whose block keys are already in
  the cache; ``SPLITS + 1`` in diffusion mode, the last program taking the block's own keys). Smaller query blocks
  give a row more programs over the same key slice (fewer splits for the same parallelism, so fewer partials to
  write and merge), at the price of reading each K/V tile once per query block (from L2 when they run together).
- a second kernel merges the splits' partial (max, sum, output normalised by that sum) with the usual log-sum-exp
  rescaling (the outputs stored in the inputs' dtype, ``Launch.partials``; max and sum in fp32);
- in cached mode a first, copy-only kernel writes every row's K/V into the cache (one launch; it was two
  ``index_put_`` calls and their index arithmetic, ~12 µs of a 37 µs batch-1 8B verify call on the H200).

A row's result depends only on its own queries, keys and length (the split boundaries are a function of its own
length; the query block is an engine setting, never a function of the row count), never on the other rows: batching
is invariant by construction. In cached mode each query's key range is split by that query's own key count, so a
verify block's query at position p splits and tiles its keys as a one-token decode step at p does; and the program's
query tile does not depend on the tokens per row either (``query_block`` 0: the rows of a 32-token block,
``CAUSAL_BLOCK_TOKENS · G``, a decode step's few rows padded to it; partials are stored for the query rows only), with
the token count a run-time argument, so a decode step and a verify block run one binary, the same matrix
instructions on the same tile shapes (``scripts/kernel_report.py`` checks it: at 8B shapes a
one-token step had 16-row tiles and warp MMAs where a verify block had 128-row tiles and warpgroup MMAs).

Contracts are those of the ops (see their packages, which register :func:`attention` as their CUDA
implementations). Accumulation in float32, each split's output stored in the inputs' dtype; inputs fp32/bf16/fp16.
"""

from dataclasses import replace
from functools import lru_cache

import torch
import triton
import triton.language as tl

from orthrus_plugins.attention_common import DEFAULT_BLOCK_N, DEFAULT_LAUNCH, DEFAULT_SPLITS, Launch, batched_view

SPLIT_CHOICES = (4, 8, 16, 32, 64)  # the ops' ``splits`` attribute (an engine option, tuned at build)
QUERY_BLOCK_CHOICES = (0, 16, 32, 64)  # the ops' ``query_block`` attribute: query rows per program (0: all of them)
CAUSAL_BLOCK_TOKENS = 32  # cached mode, query_block 0: a program's query tile holds this many tokens' rows, whatever
# the tokens per row (Orthrus's block: a verify block fills it, a decode step pads it)




@triton.jit(do_not_specialize=["B"])
def _cache_write_kernel(K, V, KC, VC, LEN, SLOT, layer_off, sk_t, sk_h, sv_t, sv_h, s_len, s_slot, sc_slot, sc_h, sc_s,
                        B, D: tl.constexpr):
    """Cached mode's K/V write in one launch: token t = r·B + j of head h goes to cache position LEN[r] + j of slot
    SLOT[r] (a copy, cast to the cache's dtype). K and V may be strided views (V is a slice of the QKV product)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    r = t // B
    one = tl.arange(0, 1)
    n = tl.max(tl.load(LEN + r * s_len + one).to(tl.int32), 0)
    slot = tl.max(tl.load(SLOT + r * s_slot + one), 0).to(tl.int64)
    d = tl.arange(0, D)
    dst = layer_off + slot * sc_slot + h * sc_h + (n + t % B).to(tl.int64) * sc_s + d
    tl.store(KC + dst, tl.load(K + t * sk_t + h * sk_h + d).to(KC.dtype.element_ty))
    tl.store(VC + dst, tl.load(V + t * sv_t + h * sv_h + d).to(VC.dtype.element_ty))


@triton.jit
def _store_part(ACC, MS, LS, part, M_PAD, rows, row_ok, d, m_i, l_i, acc, D: tl.constexpr):
    """One part's partial result (max, sum, output normalised by the sum) for the query rows only (a decode step's
    tile is mostly padding)."""
    tl.store(MS + part * M_PAD + rows, m_i, mask=row_ok)
    tl.store(LS + part * M_PAD + rows, l_i, mask=row_ok)
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # normalised: at most the largest |v| (fp16 cannot overflow)
    tl.store(ACC + (part * M_PAD + rows[:, None]) * D + d[None, :], acc.to(ACC.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit(do_not_specialize=["B", "M_PAD"])  # run-time: one binary for every token count (decode and verify)
def _split_kernel(Q, KC, VC, KB, VB, LEN, SLOT, ACC, MS, LS, layer_off, scale,
                  sq_b, sq_h, sc_slot, sc_h, sc_s, sb_b, sb_h, svb_b, svb_h, s_len, s_slot, B, M_PAD,
                  G: tl.constexpr, D: tl.constexpr, M_BLOCK: tl.constexpr,
                  BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, PARTS: tl.constexpr, FOLD: tl.constexpr,
                  CAUSAL: tl.constexpr, WRITE: tl.constexpr, PREC: tl.constexpr):
    h = tl.program_id(0)
    group = tl.program_id(1) // (M_PAD // M_BLOCK)  # FOLD consecutive splits (or the diffusion block's own keys)
    qb = tl.program_id(1) % (M_PAD // M_BLOCK)  # the query block
    r = tl.program_id(2)                # the batch row
    Q += r * B * sq_b
    KB += r * B * sb_b
    VB += r * B * svb_b
    rows = qb * M_BLOCK + tl.arange(0, M_BLOCK)
    row_ok = rows < B * G
    i = rows // G                       # block position of the row
    qh = h * G + rows % G               # query head of the row
    d = tl.arange(0, D)
    q = tl.load(Q + i[:, None] * sq_b + qh[:, None] * sq_h + d[None, :], mask=row_ok[:, None], other=0.0)
    one = tl.arange(0, 1)               # the row's cache length and slot, as scalars from device memory
    n = tl.max(tl.load(LEN + r * s_len + one).to(tl.int32), 0)
    slot_off = tl.max(tl.load(SLOT + r * s_slot + one), 0).to(tl.int64) * sc_slot
    first = (r * tl.num_programs(0) + h) * PARTS  # the row and head's first part
    cols = tl.arange(0, BLOCK_N)
    if group < SPLITS // FOLD:
        # each query row splits its own visible keys (causal: n + i + 1) into SPLITS chunks of whole BLOCK_N tiles
        # at absolute key positions, so a verify block's row i is split, tiled and summed exactly as the one-token
        # decode step of that token (its n + 1 keys) is; rows of one program differ in chunk size only where their
        # key counts straddle a multiple of SPLITS·BLOCK_N, and the program walks the union of their ranges
        total = n + i + 1 if CAUSAL else n + i * 0
        chunk = tl.cdiv(total, SPLITS * BLOCK_N) * BLOCK_N
        base = KC + layer_off + slot_off + h * sc_h
        vbase = VC + layer_off + slot_off + h * sc_h
        for j in range(FOLD):  # each split from scratch, stored as its own part: FOLD changes no arithmetic
            split = group * FOLD + j
            start = split * chunk
            end = tl.minimum(start + chunk, total)
            lo = tl.min(tl.where(row_ok, start, 2147483647), 0)
            hi = tl.max(tl.where(row_ok, end, 0), 0)
            m_i = tl.full([M_BLOCK], float("-inf"), tl.float32)
            l_i = tl.zeros([M_BLOCK], tl.float32)
            acc = tl.zeros([M_BLOCK, D], tl.float32)
            for s0 in range(lo, hi, BLOCK_N):
                kidx = s0 + cols
                kok = kidx < hi
                if WRITE:  # a lone row's new keys (n on) from K and V as given: the values the cache gets
                    old = (kidx < n)[:, None]
                    knew = (kidx - n)[:, None] * sb_b + h * sb_h + d[None, :]
                    k = tl.load(tl.where(old, base + kidx[:, None] * sc_s + d[None, :], KB + knew),
                                mask=kok[:, None], other=0.0)
                    v = tl.load(tl.where(old, vbase + kidx[:, None] * sc_s + d[None, :],
                                         VB + (kidx - n)[:, None] * svb_b + h * svb_h + d[None, :]),
                                mask=kok[:, None], other=0.0)
                else:
                    k = tl.load(base + kidx[:, None] * sc_s + d[None, :], mask=kok[:, None], other=0.0)
                    v = tl.load(vbase + kidx[:, None] * sc_s + d[None, :], mask=kok[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * scale
                ok = (kidx[None, :] >= start[:, None]) & (kidx[None, :] < end[:, None])  # the causal mask within
                s = tl.where(ok, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.where(m_new == float("-inf"), 1.0, tl.exp(m_i - m_new))
                p = tl.where(ok, tl.exp(s - m_new[:, None]), 0.0)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
                m_i = m_new
            _store_part(ACC, MS, LS, first + split, M_PAD, rows, row_ok, d, m_i, l_i, acc, D)
    elif not CAUSAL:  # the diffusion block's own keys, all visible: the last part
        kok = cols < B
        k = tl.load(KB + cols[:, None] * sb_b + h * sb_h + d[None, :], mask=kok[:, None], other=0.0)
        v = tl.load(VB + cols[:, None] * svb_b + h * svb_h + d[None, :], mask=kok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * scale
        s = tl.where(kok[None, :], s, float("-inf"))
        m_i = tl.max(s, 1)
        p = tl.where(kok[None, :], tl.exp(s - m_i[:, None]), 0.0)
        l_i = tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
        _store_part(ACC, MS, LS, first + SPLITS, M_PAD, rows, row_ok, d, m_i, l_i, acc, D)
    if WRITE:  # a lone row's K/V written into the cache by one program a head (no program of this launch reads them
        # there: every program takes them from K and V), in place of a launch of its own before. Batches read them
        # from the cache as written before: the pointer choice above cost a batch-8 8B verify call 125.9 -> 130.4 us
        # on the H100 (216 -> 243 registers), the same values either way (a row alone is bitwise its batched row)
        if (group == SPLITS // FOLD - 1) & (qb == 0):
            wrow = tl.arange(0, 32)  # the rows written at a time
            for j0 in range(0, B, 32):
                j = j0 + wrow
                jok = (j < B)[:, None]
                dst = layer_off + slot_off + h * sc_h + (n + j).to(tl.int64)[:, None] * sc_s + d[None, :]
                tl.store(KC + dst, tl.load(KB + j[:, None] * sb_b + h * sb_h + d[None, :], mask=jok), mask=jok)
                tl.store(VC + dst, tl.load(VB + j[:, None] * svb_b + h * svb_h + d[None, :], mask=jok), mask=jok)


@triton.jit(do_not_specialize=["B", "M_PAD"])
def _merge_kernel(ACC, MS, LS, O, so_b, so_h, B, M_PAD,
                  G: tl.constexpr, D: tl.constexpr, PARTS: tl.constexpr, ROWS: tl.constexpr):
    """Each of ``ROWS`` query rows' ``PARTS`` partial results merged, part by part: the largest max ``m``, each
    part's output weighed by ``exp(max - m) · sum``, divided by the weights' total. (Loading the parts as one
    [parts, rows, D] tile summed along the parts was slower for verify and draft on the H100: 8B batch-8 verify
    ~125 -> 159 us, draft ~125 -> 194 us; benchmarks/h100-2026-12-07-night-attention-verify-draft.log.) The part
    loops are unrolled, the sums the loop's in its order: as a loop, each part's loads waited for the previous part's;
    unrolled, a batch-1 8B merge took 8.1 -> 2.6 us on the H100 (batch 8 18.1 -> 15.9 us), bitwise the same output
    (benchmarks/h100-2026-12-07-eighth-*)."""
    h = tl.program_id(0)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B * G
    r = tl.program_id(2)
    O += r * B * so_b
    first = (r * tl.num_programs(0) + h) * PARTS
    d = tl.arange(0, D)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    for sp in tl.static_range(PARTS):  # unrolled: every part's loads issued at once, not one round trip a part
        m = tl.maximum(m, tl.load(MS + (first + sp) * M_PAD + rows, mask=row_ok, other=float("-inf")))
    l_tot = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    for sp in tl.static_range(PARTS):  # (the same sums in the same order as a loop)
        slot = first + sp
        ms = tl.load(MS + slot * M_PAD + rows, mask=row_ok, other=float("-inf"))  # the part's max, sum and output
        ls = tl.load(LS + slot * M_PAD + rows, mask=row_ok, other=0.0)
        w = tl.where(ms == float("-inf"), 0.0, tl.exp(ms - m)) * ls  # an empty part (max -inf) weighs 0
        l_tot += w
        acc += w[:, None] * tl.load(ACC + (slot * M_PAD + rows[:, None]) * D + d[None, :], mask=row_ok[:, None],
                                    other=0.0).to(tl.float32)
    out = acc / l_tot[:, None]
    i = rows // G
    qh = h * G + rows % G
    tl.store(O + i[:, None] * so_b + qh[:, None] * so_h + d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])


def attention(q, k, v, k_cache, v_cache, cache_len, layer: int, scale: float, causal: bool,
              splits: int = DEFAULT_SPLITS, slots=None, out=None, query_block: int = 0,
              launch: Launch = DEFAULT_LAUNCH):
    """Launch both kernels, either layout (:mod:`orthrus_plugins.attention_common`). Cached mode (``causal``) first
    writes every row's K/V at its slot and ``cache_len`` (device indices, no host read). ``splits``: key-range splits
    (one of SPLIT_CHOICES). ``query_block``: query rows per program (one of QUERY_BLOCK_CHOICES; 0, or more than a
    row has: all of a row's query rows in one program; in cached mode 0 is the rows of a ``CAUSAL_BLOCK_TOKENS``-token
    block, whatever the tokens per row, so that decode steps and verify blocks run the same tiles). ``out``: a tensor
    to write the result into (tests poison it). ``launch``: block sizes, warps and stages (:class:`Launch`;
    benchmarks try others)."""
    if splits not in SPLIT_CHOICES:
        raise ValueError(f"attention splits must be one of {SPLIT_CHOICES}, got {splits}")
    if query_block not in QUERY_BLOCK_CHOICES:
        raise ValueError(f"attention query_block must be one of {QUERY_BLOCK_CHOICES}, got {query_block}")
    k_cache, v_cache, lens, slots = batched_view(k_cache, v_cache, cache_len, slots)
    # lengths and slots are read in place (the runtime passes int64 columns of its row buffers: strided from two
    # rows on) and q, k, v as the strided views they come as (v is a slice of the QKV product): copying any of them
    # was a kernel launch per call (0.3 ms of an 8B batch-1 cycle on the H100, 0.5 ms at batch 8)
    rows = lens.shape[0]
    n, hq, d = q.shape
    b = n // rows                       # tokens per row
    if not causal and launch.block_n < b:
        raise ValueError(f"attention launch block_n {launch.block_n} is below the {b} diffusion-block keys it must "
                         "hold in one tile")
    hkv = k.shape[1]
    g = hq // hkv
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if causal and k_cache.dtype != k.dtype:
        raise ValueError(f"attention: the caches' dtype {k_cache.dtype} is not k's {k.dtype}")
    # cache[layer, slot_i, :, len_i + j] = k[i·b + j]: a lone row's by the split kernel (no launch of its own: 36 a
    # cycle of an 8B engine at batch 1), several rows' by a launch before any row attends (rows may share a slot:
    # consecutive prefill chunks of one prompt, each reading the chunks before it from the cache)
    write = causal and rows == 1
    if causal and not write:
        _cache_write_kernel[(n, hkv)](k, v, k_cache, v_cache, lens, slots, layer * k_cache.stride(0),
                                      k.stride(0), k.stride(1), v.stride(0), v.stride(1), lens.stride(0),
                                      slots.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
                                      b, D=d, num_warps=1)
    # the query tile: a function of the engine (G, query_block), in cached mode never of the tokens per row b
    m_block = max(16, triton.next_power_of_2((CAUSAL_BLOCK_TOKENS if causal else b) * g))
    m_block = m_block if query_block == 0 else min(query_block, m_block)
    m_pad = triton.cdiv(b * g, m_block) * m_block  # a row's query rows, padded to whole tiles
    # partial results per row and KV head: one per key-range split, and in diffusion mode one for the block's own
    # keys (cached mode once launched an idle program for it too: 136 programs for 8B's 16 splits at batch 1 on an
    # H100's 132 SMs; without it verify took 26.2 -> 25.5 us at batch 1 and 128.8 -> 125.1 at batch 8, bitwise the
    # same output: benchmarks/h100-2026-12-07-late-attention-verify-draft.log)
    parts = splits + (0 if causal else 1)
    acc = torch.empty(rows * hkv * parts, m_pad, d, device=q.device, dtype=launch.partials or q.dtype)
    ms = torch.empty(acc.shape[:2], device=q.device, dtype=torch.float32)
    ls = torch.empty(acc.shape[:2], device=q.device, dtype=torch.float32)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype) if out is None else out  # contiguous, as the fake
    fold = launch.fold(splits, hkv * splits * (m_pad // m_block) * rows, _sms(q.device))
    _split_kernel[(hkv, (splits // fold + parts - splits) * (m_pad // m_block), rows)](
        # the layer's offset computed here: past 2**31 elements (35 layers of an 8B cache with 17 slots of 4k
        # positions) Triton passes it as a 64-bit integer, where an in-kernel layer * stride would overflow int32
        q, k_cache, v_cache, k, v, lens, slots, acc, ms, ls, layer * k_cache.stride(0), scale,
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), lens.stride(0), slots.stride(0), b, m_pad,
        G=g, D=d, M_BLOCK=m_block, BLOCK_N=launch.block_n, SPLITS=splits, PARTS=parts, FOLD=fold, CAUSAL=causal,
        WRITE=write, PREC="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 engines stay exact
        # a [M_BLOCK, D] fp32 accumulator: spread it over 8 warps
        num_warps=launch.num_warps or (8 if m_block * d >= 128 * 64 else 4),
        **({} if launch.num_stages is None else {"num_stages": launch.num_stages}),
        **({} if launch.max_registers is None else {"maxnreg": launch.max_registers}))
    merge_rows = launch.merge_rows  # programs over the query rows only, not the padding
    _merge_kernel[(hkv, triton.cdiv(b * g, merge_rows), rows)](acc, ms, ls, out, out.stride(0), out.stride(1), b,
                                                               m_pad, G=g, D=d, PARTS=parts, ROWS=merge_rows,
                                                               num_warps=4)
    return out


def register(op, causal: bool) -> None:
    """Make ``attention`` (cached mode when ``causal``) the CUDA implementation of the attention op ``op``."""
    @op.register_kernel("cuda")
    def _(q, k, v, k_cache, v_cache, cache_len, layer, scale, splits=DEFAULT_SPLITS, slots=None, query_block=0,
          block_n=DEFAULT_BLOCK_N, launch=""):
        return attention(q, k, v, k_cache, v_cache, cache_len, layer, scale, causal=causal, splits=splits,
                         slots=slots, query_block=query_block, launch=op_launch(block_n, launch))


@lru_cache(maxsize=None)
def _sms(device: torch.device) -> int:
    """The device's SMs (1 off CUDA: Triton's interpreter, where every fold is then taken)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@lru_cache(maxsize=None)
def op_launch(block_n: int, spec: str) -> Launch:
    """The kernels' launch for the ops' ``block_n`` and ``launch`` attributes (the spec's other fields over the
    defaults; ``block_n`` is its own attribute)."""
    launch = DEFAULT_LAUNCH if not spec else Launch.from_spec(spec)
    return launch if block_n == launch.block_n else replace(launch, block_n=block_n)
