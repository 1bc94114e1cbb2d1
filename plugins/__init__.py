"""orthrus_plugins: the custom operators of Orthrus engines, in the ``orthrus`` namespace.

Importing this package registers every op with ``torch.library``:

- ``orthrus::diffusion_attention`` (:mod:`orthrus_plugins.diffusion_attention`)
- ``orthrus::cached_attention``    (:mod:`orthrus_plugins.cached_attention`)
- ``orthrus::accept``              (:mod:`orthrus_plugins.accept`)
- ``orthrus::fp8_linear``          (:mod:`orthrus_plugins.fp8_linear`)
- ``orthrus::fp8_matmul``          (the same module: fp8_linear's GEMM on quantized rows, in compiled programs)
- ``orthrus::invariant_linear``    (the same module: the same GEMM on BF16 weights, an FP8 engine's BF16 head)
- ``orthrus::qk_norm_rope``        (:mod:`orthrus_plugins.qk_norm_rope`: the q/k heads' RMSNorm and RoPE, one launch)

One folder per op: ``__init__.py`` holds the contract (its docstring), the plain reference implementation (the CPU
kernel) and a fake implementation so that ``torch.export`` keeps the op as a single node; beside it, where the op
has them, ``kernel.py`` (its Triton GPU kernel), ``onnx.py`` (its ONNX translation, used by
``orthrus_export.onnx_export``) and ``onnxruntime.py`` (its ONNX Runtime custom-op implementation, used by
``orthrus_runtime.onnx_backend``). The two attention ops share ``attention_common/`` (the reference arithmetic, one
Triton kernel, the ONNX attention spelling). Importing this package never imports onnx or onnxruntime.

Kernel settings (attention splits, the FP8 kernel) are op attributes, set per engine in its programs' nodes: there
is no process-wide setting.
"""

from orthrus_plugins import accept, cached_attention, diffusion_attention, fp8_linear, qk_norm_rope  # noqa: F401
from orthrus_plugins.sampling import filter_logits, sample_token  # noqa: F401

fp8_linear.register_cuda()  # torch._scaled_mm (no Triton needed)

try:  # GPU kernels where Triton is installed; the reference kernels serve every other device
    cached_attention.register_cuda()
    diffusion_attention.register_cuda()
    qk_norm_rope.register_cuda()
    GPU_KERNELS = "triton"
except ImportError:
    GPU_KERNELS = None

from orthrus_plugins.attention_common import DEFAULT_SPLITS as DEFAULT_ATTENTION_SPLITS  # noqa: E402, F401

OPS = ("orthrus::diffusion_attention", "orthrus::cached_attention", "orthrus::accept", "orthrus::fp8_linear",
       "orthrus::fp8_matmul", "orthrus::qk_norm_rope")
