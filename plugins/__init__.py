"""orthrus_plugins: the custom operators of Orthrus engines, in the ``orthrus`` namespace.

Importing this package registers every op with ``torch.library``:

- ``orthrus::diffusion_attention`` (:mod:`orthrus_plugins.diffusion_attention`)
- ``orthrus::cached_attention``    (:mod:`orthrus_plugins.cached_attention`)
- ``orthrus::accept``              (:mod:`orthrus_plugins.accept`)
- ``orthrus::fp8_linear``          (:mod:`orthrus_plugins.fp8_linear`)

Each op has a plain reference implementation (the CPU kernel) and a fake implementation so that
``torch.export`` keeps it as a single node. Each module's docstring is the op's contract. Kernel settings (attention
splits, the FP8 kernel) are op attributes, set per engine in its programs' nodes: there is no process-wide setting.
"""

from orthrus_plugins import accept, cached_attention, diffusion_attention, fp8_linear  # noqa: F401  (registers)
from orthrus_plugins.sampling import filter_logits, sample_token  # noqa: F401

fp8_linear.register_cuda()  # torch._scaled_mm (no Triton needed)

try:  # GPU kernels where Triton is installed; the reference kernels serve every other device
    from orthrus_plugins import triton_attention as _triton_attention
    _triton_attention.register()
    GPU_KERNELS = "triton"
except ImportError:
    GPU_KERNELS = None

DEFAULT_ATTENTION_SPLITS = 16  # the attention ops' default ``splits``; engines record their own (tuned) value

OPS = ("orthrus::diffusion_attention", "orthrus::cached_attention", "orthrus::accept", "orthrus::fp8_linear")
