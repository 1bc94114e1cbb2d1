"""``orthrus::diffusion_attention`` — block queries over the shared AR cache plus the block's own K/V.

Contract
--------
``diffusion_attention(q, k, v, k_cache, v_cache, cache_len, layer, scale, splits=16, slots=None,
query_block=0, block_n=64, launch="") -> out``

- ``q``: ``[B, Hq, D]``; ``k``, ``v``: ``[B, Hkv, D]`` — the block's diffusion-view projections, already
  normed and rotated (RoPE at positions ``cache_len … cache_len+B-1``). ``Hq`` is a multiple of ``Hkv`` (GQA).
- ``k_cache``, ``v_cache``: ``[L, Hkv, C, D]``, the AR view's static cache; **read only**.
- ``cache_len``: int64 scalar tensor, number of valid cache positions (``0 <= cache_len``,
  ``cache_len + B <= C``). A tensor, so one traced graph (and later one captured CUDA graph) serves every length.
- ``splits`` (int attribute, a kernel setting): key-range splits of the GPU kernel (4, 8, 16, 32 or 64; the
  engine's tuned value, written into the program's nodes at load). Results do not depend on it beyond rounding; the
  reference ignores it.
- ``query_block`` (int attribute, a kernel setting): query rows per program of the GPU kernel (0: all of a
  row's, or 16, 32, 64; an engine setting, never a function of the row count, so batching stays invariant);
  the reference ignores it.
- ``block_n`` (int attribute, a kernel setting): keys per loop iteration of the GPU kernel (64 or 32: the order
  of the online softmax, so an engine-wide setting like ``splits``); the reference ignores it.
- ``launch`` (str attribute, a kernel setting): the GPU kernels' other launch fields over their defaults
  (``attention_common.Launch.from_spec``: e.g. ``"num_stages=2,max_registers=128"``, ``"partials=float32"``; ``""``
  the defaults; an engine setting like ``splits``); the reference ignores it.
- ``slots`` (batched layout, :mod:`orthrus_plugins.attention_common`): int64 ``[b]``; then ``q``/``k``/``v`` hold b
  rows of T = B/b tokens, the caches are ``[L, S, Hkv, C, D]`` and ``cache_len`` is ``[b]``: row ``i`` attends to
  slot ``slots[i]``'s first ``cache_len[i]`` positions and to its own T block keys.
- ``layer`` (int attribute): which layer of the cache; ``scale`` (float attribute): softmax scale, usually D^-0.5.
- ``out``: ``[B, Hq, D]``, q's dtype. Every query attends to cache positions ``[0, cache_len)`` and to all B block
  keys — **no causal mask**. The block's K/V are never written to the cache.

Dtypes: float32, bfloat16, float16 (cache in the same dtype as q). Accumulation in float32 (the GPU kernel rounds each
key split's output to the input dtype before merging them in float32).

Implementations: the reference (below, any device); on CUDA the split-K Triton kernel shared with
``orthrus::cached_attention`` (:mod:`orthrus_plugins.attention_common.kernel`). ONNX (``onnx.py``): an
``orthrus``-domain ``DiffusionAttention`` node (inputs one layer's ``[Hkv, C, D]`` caches; output ``out``; attributes
``layer``, ``scale``) or, decomposed, standard ops; ONNX Runtime runs that node with the reference
(``onnxruntime.py``).
"""

import torch

from orthrus_plugins.attention_common import DEFAULT_BLOCK_N, DEFAULT_SPLITS, reference


@torch.library.custom_op("orthrus::diffusion_attention", mutates_args=())
def diffusion_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, cache_len: torch.Tensor, layer: int, scale: float,
                        splits: int = DEFAULT_SPLITS, slots: torch.Tensor | None = None,
                        query_block: int = 0, block_n: int = DEFAULT_BLOCK_N, launch: str = "") -> torch.Tensor:
    """Reference implementation (any device)."""
    return reference("orthrus::diffusion_attention", q, k, v, k_cache, v_cache, cache_len, layer, scale, False,
                     slots)


@diffusion_attention.register_fake
def _(q, k, v, k_cache, v_cache, cache_len, layer, scale, splits=DEFAULT_SPLITS, slots=None, query_block=0,
      block_n=DEFAULT_BLOCK_N, launch=""):
    return q.new_empty(q.shape)  # contiguous, like every real kernel


def register_cuda() -> None:
    """Make the shared Triton kernel the op's CUDA implementation (ImportError without Triton)."""
    from orthrus_plugins.attention_common.kernel import register
    register(diffusion_attention, causal=False)
