"""orthrus-export: Orthrus-Qwen3 checkpoints -> traced, compiled engines with an exact draft/verify runtime.

The builder side (checkpoints, tracing, building, ONNX, parity, the CLI). The engine format and everything that runs
an engine live in ``orthrus_runtime``, which this package imports and which never imports this one.
"""

from orthrus_runtime import __version__  # noqa: F401  (one distribution, one version)
from orthrus_runtime.errors import OrthrusError  # noqa: F401
