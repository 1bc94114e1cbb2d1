"""``orthrus::qk_norm_rope`` — the query and key heads of a QKV product, each RMS-normalized, then rotated (RoPE).

Contract
--------
``qk_norm_rope(qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, eps) -> (q, k)``

- ``qkv``: ``[N, (Hq + 2·Hkv)·D]`` — N tokens' QKV projection (rows may be strided); its first ``Hq·D`` columns are
  the query heads, the next ``Hkv·D`` the key heads (the values, after them, are not read). float32/bfloat16/float16.
- ``q_weight``, ``k_weight``: ``[D]``, the per-head RMSNorm weights, qkv's dtype.
- ``cos``, ``sin``: ``[N, 1, D]``, each token's rotary table row at its position, qkv's dtype.
- ``num_heads`` (Hq), ``num_kv_heads`` (Hkv) (int attributes), ``eps`` (float attribute).
- returns ``q`` ``[N, Hq, D]`` and ``k`` ``[N, Hkv, D]``, contiguous, qkv's dtype: each head row ``x`` becomes
  ``y = w · (x / sqrt(mean(x²) + eps))`` — :func:`rms_norm`, Qwen3's: the mean in float32, the normalized row
  rounded to the dtype before the weight — then ``y·cos + rotate_half(y)·sin`` (:func:`rotate`,
  ``rotate_half(y) = [-y[D/2:], y[:D/2]]``), each product and the sum rounded to the dtype as eager torch rounds them.

Rows are independent: a token's result depends on its own row of ``qkv``, ``cos`` and ``sin`` only, never on N or the
other tokens — on a GPU by construction (one program per token and head, one instruction sequence), so a verify
block's query computes what the decode step of that token computes whatever a compiler would have made of the norm
(Inductor autotunes rows this short per compiled program).

Layout: the op is tagged ``flexible_layout`` — its inputs may come in any strides (the CUDA launch reads row strides
and copies only an input whose last stride is not 1). At a custom op's default (exact strides) Inductor copied the
``cos``/``sin`` a pass gathers once for every layer's call: 36 gather launches a batch-1 8B cycle where one a pass
does (``tests/test_plugins.py::test_compiled_layers_gather_the_rope_tables_once``).

Implementations: the reference (:func:`reference`, any device: the torch ops the engines' forward ran inline before
this op existed, so CPU engines compute the same bits); on CUDA a Triton kernel (``kernel.py``), one launch for both
sets of heads. ONNX (``onnx.py``): standard ops (the same arithmetic), in both export modes.
"""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's RMSNorm over the last dimension: float32 statistics, the normalized row rounded to x's dtype, then the
    weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the last dimension: ``x·cos + rotate_half(x)·sin``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def reference(qkv, q_weight, k_weight, cos, sin, num_heads: int, num_kv_heads: int, eps: float):
    d = q_weight.shape[0]
    q = qkv[:, :num_heads * d].reshape(-1, num_heads, d)
    k = qkv[:, num_heads * d:(num_heads + num_kv_heads) * d].reshape(-1, num_kv_heads, d)
    return (rotate(rms_norm(q, q_weight, eps), cos, sin).contiguous(),
            rotate(rms_norm(k, k_weight, eps), cos, sin).contiguous())


def random_inputs(n: int, num_heads: int, num_kv_heads: int, d: int, dtype: torch.dtype,
                  generator: torch.Generator, pad: int = 0):
    """A random case of the op for tests and checks: ``(qkv, q_weight, k_weight, cos, sin)`` on the generator's
    device — ``n`` rows of ``qkv`` (values of a few units) as a view with ``pad`` columns of a wider buffer on each
    side when ``pad`` (strided rows, as a fused projection's output can be), weights in [0.5, 1.5), angles in
    [0, 6)."""
    dev = generator.device
    width = (num_heads + 2 * num_kv_heads) * d
    qkv = (torch.randn(n, width + 2 * pad, device=dev, generator=generator) * 3).to(dtype)[:, pad:pad + width]
    q_weight = (torch.rand(d, device=dev, generator=generator) + 0.5).to(dtype)
    k_weight = (torch.rand(d, device=dev, generator=generator) + 0.5).to(dtype)
    ang = torch.rand(n, 1, d, device=dev, generator=generator) * 6
    return qkv, q_weight, k_weight, ang.cos().to(dtype), ang.sin().to(dtype)


def check(qkv, q_weight, k_weight, cos, sin, num_heads: int, num_kv_heads: int) -> None:
    d = q_weight.shape[0]
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * d or d % 2:
        raise ValueError(f"orthrus::qk_norm_rope: qkv [N, (Hq + 2·Hkv)·D] with even D expected, got "
                         f"{tuple(qkv.shape)} for Hq {num_heads}, Hkv {num_kv_heads}, D {d}")
    if k_weight.shape != (d,) or cos.shape != (qkv.shape[0], 1, d) or sin.shape != cos.shape:
        raise ValueError(f"orthrus::qk_norm_rope: weights [{d}] and cos/sin [{qkv.shape[0]}, 1, {d}] expected, got "
                         f"{tuple(k_weight.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}")


@torch.library.custom_op("orthrus::qk_norm_rope", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def qk_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, num_heads: int, num_kv_heads: int, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation (any device)."""
    check(qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads)
    return reference(qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, eps)


@qk_norm_rope.register_fake
def _(qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, eps):
    d = q_weight.shape[0]
    return qkv.new_empty(qkv.shape[0], num_heads, d), qkv.new_empty(qkv.shape[0], num_kv_heads, d)


def register_cuda() -> None:
    """Make the Triton kernel the op's CUDA implementation (ImportError without Triton)."""
    from orthrus_plugins.qk_norm_rope.kernel import qk_norm_rope as triton_qk_norm_rope

    @qk_norm_rope.register_kernel("cuda")
    def _(qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, eps):
        check(qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads)
        return triton_qk_norm_rope(qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, eps)
