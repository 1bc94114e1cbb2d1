"""``orthrus::cached_attention`` — causal block attention over the static cache, writing the block's K/V.

Contract
--------
``cached_attention(q, k, v, k_cache, v_cache, cache_len, layer, scale, splits=16, slots=None,
query_block=0, block_n=64, launch="") -> out``

- ``q``: ``[B, Hq, D]``; ``k``, ``v``: ``[B, Hkv, D]`` — the AR view's projections of a block at positions
  ``cache_len … cache_len+B-1`` (normed, rotated). ``Hq`` is a multiple of ``Hkv``. B = 1 is a decode step.
- ``k_cache``, ``v_cache``: ``[L, Hkv, C, D]``, **mutated**: ``k``/``v`` are written to
  ``cache[layer, :, cache_len:cache_len+B]`` before attending. Nothing else in the cache changes.
- ``cache_len``: int64 scalar tensor, positions already valid (``cache_len + B <= C``).
- ``slots`` (batched layout, :mod:`orthrus_plugins.attention_common`): int64 ``[b]``; then ``q``/``k``/``v`` hold b
  rows of T = B/b tokens, the caches are ``[L, S, Hkv, C, D]``, ``cache_len`` is ``[b]`` and row ``i`` is written to
  and attends within slot ``slots[i]`` at ``cache_len[i] …``. Every row's K/V is written before any row attends.
- ``layer`` (int attribute), ``scale`` (float attribute).
- ``splits`` (int attribute, a kernel setting): key-range splits of the GPU kernel (4, 8, 16, 32 or 64; the engine's
  tuned value, written into the program's nodes at load); the reference ignores it.
- ``query_block`` (int attribute, a kernel setting): query rows per program of the GPU kernel (0: the rows of a
  32-token block, a decode step's padded to them, or 16, 32, 64; an engine setting, never a function of the row
  count or the tokens per row, so batching stays invariant and a verify row computes what a decode step computes);
  the reference ignores it.
- ``block_n`` (int attribute, a kernel setting): keys per loop iteration of the GPU kernel (64 or 32: the order
  of the online softmax, so an engine-wide setting like ``splits``); the reference ignores it.
- ``launch`` (str attribute, a kernel setting): the GPU kernels' other launch fields over their defaults
  (``attention_common.Launch.from_spec``: e.g. ``"num_stages=2,max_registers=128"``, ``"partials=float32"``; ``""``
  the defaults; an engine setting like ``splits``); the reference ignores it.
- ``out``: ``[B, Hq, D]``, q's dtype. Query ``i`` attends to cache positions ``[0, cache_len + i]`` (causal).

Rejected speculative K/V are not erased: the caller simply passes a smaller ``cache_len`` next time and the
stale positions are overwritten. Dtypes: float32, bfloat16, float16 (the caches in k's); accumulation in float32
(the GPU kernel rounds each key split's output to the input dtype before merging them in float32).

Implementations: the reference (below, any device); on CUDA the split-K Triton kernel shared with
``orthrus::diffusion_attention`` (:mod:`orthrus_plugins.attention_common.kernel`: a lone row takes its new keys
from ``k``/``v`` and the split kernel writes them into the cache; several rows' K/V are written by a launch before
they attend). ONNX (``onnx.py``): an
``orthrus``-domain ``CachedAttention`` node (inputs one layer's ``[Hkv, C, D]`` caches; outputs ``out``,
``k_cache_out``, ``v_cache_out``; attributes ``layer``, ``scale``) or, decomposed, standard ops; ONNX Runtime runs
that node with the reference (``onnxruntime.py``).
"""

import torch

from orthrus_plugins.attention_common import DEFAULT_BLOCK_N, DEFAULT_SPLITS, reference


@torch.library.custom_op("orthrus::cached_attention", mutates_args=("k_cache", "v_cache"))
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, cache_len: torch.Tensor, layer: int, scale: float,
                     splits: int = DEFAULT_SPLITS, slots: torch.Tensor | None = None,
                     query_block: int = 0, block_n: int = DEFAULT_BLOCK_N, launch: str = "") -> torch.Tensor:
    """Reference implementation (any device)."""
    return reference("orthrus::cached_attention", q, k, v, k_cache, v_cache, cache_len, layer, scale, True, slots)


@cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, cache_len, layer, scale, splits=DEFAULT_SPLITS, slots=None, query_block=0,
      block_n=DEFAULT_BLOCK_N, launch=""):
    return q.new_empty(q.shape)  # contiguous, like every real kernel


def register_cuda() -> None:
    """Make the shared Triton kernel the op's CUDA implementation (ImportError without Triton)."""
    from orthrus_plugins.attention_common.kernel import register
    register(cached_attention, causal=True)
