"""``orthrus::fp8_linear`` — a linear layer with float8 (e4m3) weights and per-token float8 activations.

Contract
--------
``fp8_linear(x, weight, weight_scale, kernel="auto") -> out``

- ``x``: ``[M, K]`` bf16/fp16/fp32 activations. Each row is quantized on the fly to ``float8_e4m3fn`` with its own
  scale ``s_x[m] = max(|x[m]|) / 448`` (absmax per token; an all-zero row gets scale 1e-12/448).
- ``weight``: ``[N, K]`` ``float8_e4m3fn``; ``weight_scale``: float32 ``[N]`` — per-output-channel scales, so the
  dequantized weight is ``weight[n].float() * weight_scale[n]`` (see :func:`quantize_weight`).
- ``kernel`` (str attribute, a kernel setting): the CUDA kernel, one of ``CUDA_KERNELS`` or ``"auto"`` (Triton
  where installed, else ``torch._scaled_mm``); the engine's choice is written into the program's nodes at load. The
  reference (every other device) ignores it.
- ``out``: ``[M, N]`` in x's dtype, ``(q(x) @ weight.T) * s_x[:, None] * weight_scale[None, :]``. Rows are
  independent: row m's result does not depend on the other rows or on M (a verify block and a decode step compute
  the same values for the same token), which keeps an FP8 engine's Orthrus output equal to its own AR output.

``orthrus::fp8_matmul(xq, x_scale, weight, weight_scale, out_dtype, impl="auto") -> out`` is its second half:
the GEMM of already quantized rows (``xq`` ``[M, K]`` ``float8_e4m3fn``, ``x_scale`` float32 ``[M, 1]``, as
:func:`quantize_rows` gives them), ``out`` ``[M, N]`` in ``out_dtype``; ``impl`` is ``kernel`` under another name
(Inductor's fallback for a custom op passes the op to ``FallbackKernel.create`` as ``kernel``, and an argument of
that name left at its default collides with it: the rewritten ``fp8_linear`` nodes of an "auto" engine failed to
compile). ``fp8_linear(x, w, s, kernel)`` is the same function as :func:`split_linear` — ``quantize_rows`` in plain
torch ops, then ``fp8_matmul`` — and an engine's compiled programs run it in that form
(``orthrus_runtime.program.runnable`` rewrites the nodes before Inductor), so that Inductor fuses each quantization
into the kernel that produces ``x`` (the RMSNorms, SiLU·up): three of every four quantization launches of an 8B pass
go.

``orthrus::invariant_linear(x, weight) -> x @ weight.T`` (``x`` ``[M, K]``, ``weight`` ``[N, K]``, both bf16/fp16/
fp32; ``out`` ``[M, N]`` in x's dtype) is the head of an FP8 engine that keeps it in BF16: on a GPU with Triton the
same GEMM on two-byte operands at a tiling chosen from N and K only (``kernel.bf16_config``), so its rows, like the
FP8 layers', do not depend on M (cuBLAS picks its algorithm by M: a 32-row verify and a one-row decode round a
head's logits differently, and a near-tie then flips a token). Reference (every other device): ``F.linear``.

Reference implementation (any device): the product-sum exactly, in float64 (see ``_matmul_reference``). CUDA kernels
(GPUs with FP8): a Triton kernel (``kernel.py``) over tiles of 32 rows (128 from 128 rows), any M, each row's K loop
and matrix instructions the same whatever M is (fp32 accumulation, a K loop chosen from N and K only:
batch-invariant, also in batched passes), in three tilings (``triton``: the swept one; ``triton-tma``: the same with
its tiles loaded by TMA, rows equal to ``triton``'s bit for bit; ``triton-splitk``: the one before, split K and a
reduce launch); ``torch._scaled_mm`` with row-wise scales. The build times them and records the choice in the
engine's manifest. No ONNX translation: the ONNX export refuses FP8 engines.
"""

import torch

E4M3_MAX = 448.0
MIN_SCALE = 1e-12 / E4M3_MAX


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax quantization to e4m3: ``(q [R, C] float8_e4m3fn, scale [R, 1] float32)``."""
    amax = t.abs().amax(dim=-1, keepdim=True).float()
    # a product with the float32 reciprocal, not a division: torch on CUDA turns ``tensor / number`` into that product
    # (and the CPU divides), so this spelling gives one scale on both devices and in the Triton quantization
    scale = torch.clamp(amax * (1.0 / E4M3_MAX), min=MIN_SCALE)
    q = torch.clamp(t.float() / scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Build-time weight quantization: per-output-channel absmax. Returns ``(weight e4m3 [N, K], scale f32 [N])``."""
    q, scale = quantize_rows(w)
    return q.contiguous(), scale.reshape(-1).contiguous()


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


@torch.library.custom_op("orthrus::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """Reference implementation (any device)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"orthrus::fp8_linear: x [M, K] and weight [N, K] expected, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if weight.dtype != torch.float8_e4m3fn or weight_scale.shape != (weight.shape[0],):
        raise ValueError("orthrus::fp8_linear: weight must be float8_e4m3fn [N, K] with a float32 scale [N]")
    return _reference(x, weight, weight_scale)


@fp8_linear.register_fake
def _(x, weight, weight_scale, kernel="auto"):
    return x.new_empty(x.shape[0], weight.shape[0])


def split_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 kernel: str = "auto") -> torch.Tensor:
    """``fp8_linear`` in two parts: the quantization in torch ops (which a compiler fuses into x's producer), then
    ``orthrus::fp8_matmul``. The same function as the op, on every device."""
    xq, xs = quantize_rows(x)
    return torch.ops.orthrus.fp8_matmul(xq, xs, weight, weight_scale, x.dtype, impl=kernel)


@torch.library.custom_op("orthrus::fp8_matmul", mutates_args=())
def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               out_dtype: torch.dtype, impl: str = "auto") -> torch.Tensor:
    """Reference implementation (any device)."""
    if xq.dim() != 2 or xq.dtype != torch.float8_e4m3fn or x_scale.shape != (xq.shape[0], 1):
        raise ValueError(f"orthrus::fp8_matmul: xq [M, K] float8_e4m3fn with a float32 scale [M, 1] expected, got "
                         f"{tuple(xq.shape)} {xq.dtype} and {tuple(x_scale.shape)}")
    if weight.dim() != 2 or weight.shape[1] != xq.shape[1] or weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"orthrus::fp8_matmul: weight float8_e4m3fn [N, {xq.shape[1]}] expected, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    return _matmul_reference(xq, x_scale, weight, weight_scale, out_dtype)


@fp8_matmul.register_fake
def _(xq, x_scale, weight, weight_scale, out_dtype, impl="auto"):
    return xq.new_empty(xq.shape[0], weight.shape[0], dtype=out_dtype)


def _scaled_mm(xq, xs, weight, weight_scale, out_dtype):
    """The cuBLAS kernel: e4m3 x e4m3 tensor-core GEMM with row-wise scales (float32 accumulation)."""
    k, n = xq.shape[1], weight.shape[0]
    if k % 16 or n % 16 or out_dtype == torch.float32:
        return _matmul_reference(xq, xs, weight, weight_scale, out_dtype)
    return torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale.float().reshape(1, n), out_dtype=out_dtype)


def _matmul_reference(xq, xs, weight, weight_scale, out_dtype):
    """Exact: e4m3 values are multiples of 2^-9 below 2^9, so every product is a multiple of 2^-18 below 2^18 and
    any sum of up to 2^14 of them is exact in float64 — whatever the summation order. Rows are therefore
    independent bit for bit (a verify block and a decode step agree exactly)."""
    if xq.shape[1] > 1 << 14:
        raise ValueError("orthrus::fp8_matmul: the exact reference supports K <= 16384")
    acc = torch.matmul(xq.double(), weight.double().t())
    return (acc * xs.double() * weight_scale.double()[None, :]).to(out_dtype)


def _reference(x, weight, weight_scale):
    """``fp8_linear``'s reference: :func:`quantize_rows`, then the exact product-sum."""
    return _matmul_reference(*quantize_rows(x), weight, weight_scale, x.dtype)


@torch.library.custom_op("orthrus::invariant_linear", mutates_args=())
def invariant_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Reference implementation (any device)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or x.dtype != weight.dtype:
        raise ValueError(f"orthrus::invariant_linear: x [M, K] and weight [N, K] of one dtype expected, got "
                         f"{tuple(x.shape)} {x.dtype} and {tuple(weight.shape)} {weight.dtype}")
    return torch.nn.functional.linear(x, weight)


@invariant_linear.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0])


# the CUDA implementations of fp8_matmul, on quantized rows: (xq, xs [M, 1], weight, weight_scale, out_dtype)
MATMUL_KERNELS = {"torch._scaled_mm": _scaled_mm, "reference": _matmul_reference}
quantize_device = quantize_rows  # fp8_linear's quantization on a GPU: one Triton launch where Triton is installed
try:
    from functools import partial

    from orthrus_plugins.fp8_linear import kernel as _triton_kernel
    MATMUL_KERNELS["triton"] = _triton_kernel.fp8_matmul
    MATMUL_KERNELS["triton-splitk"] = partial(_triton_kernel.fp8_matmul, tiling=_triton_kernel.splitk_config)
    MATMUL_KERNELS["triton-tma"] = partial(_triton_kernel.fp8_matmul, tiling=_triton_kernel.tma_config)
    quantize_device = _triton_kernel.quantize
except ImportError:  # no Triton: torch._scaled_mm or the reference
    pass
DEFAULT_CUDA_KERNEL = "triton" if "triton" in MATMUL_KERNELS else "torch._scaled_mm"


def matmul_kernel(name: str):
    """The CUDA implementation of ``fp8_matmul`` called ``name`` (``"auto"``: ``DEFAULT_CUDA_KERNEL``)."""
    name = DEFAULT_CUDA_KERNEL if name == "auto" else name
    if name not in MATMUL_KERNELS:
        raise ValueError(f"unknown fp8_linear kernel {name!r}: choose {', '.join(MATMUL_KERNELS)} or auto")
    return MATMUL_KERNELS[name]


def cuda_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, kernel: str = "auto"):
    """``fp8_linear``'s CUDA implementation: the rows quantized on the device, then the matmul kernel ``kernel``."""
    return matmul_kernel(kernel)(*quantize_device(x.contiguous()), weight, weight_scale, x.dtype)


def register_cuda() -> None:
    @fp8_linear.register_kernel("cuda")
    def _(x, weight, weight_scale, kernel="auto"):
        return cuda_linear(x, weight, weight_scale, kernel)

    @fp8_matmul.register_kernel("cuda")
    def _(xq, x_scale, weight, weight_scale, out_dtype, impl="auto"):
        return matmul_kernel(impl)(xq, x_scale, weight, weight_scale, out_dtype)

    if "triton" in MATMUL_KERNELS:  # else the reference (cuBLAS: rows not invariant)
        @invariant_linear.register_kernel("cuda")
        def _(x, weight):
            return _triton_kernel.linear(x, weight)
