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

Reference implementation (any device): the product-sum exactly, in float64 (see ``_reference``). CUDA kernels
(GPUs with FP8): a Triton kernel (``kernel.py``) over tiles of 32 rows, any M, so each row runs the same instruction
sequence whatever M is (fp32 accumulation, a tiling chosen from N and K only: batch-invariant, also in batched
passes), in two tilings (``triton``: the swept one; ``triton-splitk``: the one before, split K and a reduce launch);
``torch._scaled_mm`` with row-wise scales. The build times them and records the choice in the engine's manifest. No
ONNX translation: the ONNX export refuses FP8 engines.
"""

import torch

E4M3_MAX = 448.0
MIN_SCALE = 1e-12 / E4M3_MAX


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax quantization to e4m3: ``(q [R, C] float8_e4m3fn, scale [R, 1] float32)``."""
    amax = t.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.clamp(amax / E4M3_MAX, min=MIN_SCALE)
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


def scaled_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The CUDA kernel: e4m3 x e4m3 tensor-core GEMM with row-wise scales (float32 accumulation)."""
    k, n = x.shape[1], weight.shape[0]
    if k % 16 or n % 16 or x.dtype == torch.float32:
        return _reference(x, weight, weight_scale)
    xq, xs = quantize_rows(x)
    return torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale.float().reshape(1, n),
                            out_dtype=x.dtype)


def _reference(x, weight, weight_scale):
    """Exact: e4m3 values are multiples of 2^-9 below 2^9, so every product is a multiple of 2^-18 below 2^18 and
    any sum of up to 2^14 of them is exact in float64 — whatever the summation order. Rows are therefore
    independent bit for bit (a verify block and a decode step agree exactly)."""
    if x.shape[1] > 1 << 14:
        raise ValueError("orthrus::fp8_linear: the exact reference supports K <= 16384")
    xq, xs = quantize_rows(x)
    acc = torch.matmul(xq.double(), weight.double().t())
    return (acc * xs.double() * weight_scale.double()[None, :]).to(x.dtype)


CUDA_KERNELS = {"torch._scaled_mm": scaled_mm, "reference": _reference}
try:
    from functools import partial

    from orthrus_plugins.fp8_linear import kernel as _triton_kernel
    CUDA_KERNELS["triton"] = _triton_kernel.fp8_linear
    CUDA_KERNELS["triton-splitk"] = partial(_triton_kernel.fp8_linear, tiling=_triton_kernel.splitk_config)
except ImportError:  # no Triton: torch._scaled_mm or the reference
    pass
DEFAULT_CUDA_KERNEL = "triton" if "triton" in CUDA_KERNELS else "torch._scaled_mm"


def cuda_kernel(name: str):
    """The CUDA implementation called ``name`` (``"auto"``: ``DEFAULT_CUDA_KERNEL``)."""
    name = DEFAULT_CUDA_KERNEL if name == "auto" else name
    if name not in CUDA_KERNELS:
        raise ValueError(f"unknown fp8_linear kernel {name!r}: choose {', '.join(CUDA_KERNELS)} or auto")
    return CUDA_KERNELS[name]


def register_cuda() -> None:
    @fp8_linear.register_kernel("cuda")
    def _(x, weight, weight_scale, kernel="auto"):
        return cuda_kernel(kernel)(x, weight, weight_scale)
