"""orthrus-export: Orthrus-Qwen3 checkpoints -> traced, compiled engines with an exact draft/verify runtime."""

__version__ = "0.1.0"

from orthrus_export.errors import OrthrusError  # noqa: E402,F401
