"""orthrus_runtime: owns the engine format, loads an engine and runs the draft/verify loop.

    from orthrus_runtime import Engine
    engine = Engine.load("engines/orthrus-qwen3-tiny.cpu.fp32")
    result = engine.generate("def main(", max_new_tokens=64)
    print(result.text, result.stats.acceptance_length)

A deployment needs this package, ``orthrus_plugins``, torch, safetensors and tokenizers: it never imports
``orthrus_export`` (the builder).
"""

__version__ = "0.2.0"

_LAZY = {"Engine": "orthrus_runtime.engine", "GenerationResult": "orthrus_runtime.engine",
         "GenerationStats": "orthrus_runtime.stats"}


def __getattr__(name):  # import torch only when an engine is used (``info`` reads a manifest in well under 1 s)
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'orthrus_runtime' has no attribute {name!r}")
