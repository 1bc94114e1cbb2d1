"""orthrus_runtime: loads an Orthrus engine and runs the draft/verify loop.

    from orthrus_runtime import Engine
    engine = Engine.load("engines/orthrus-qwen3-tiny.cpu.fp32")
    result = engine.generate("def main(", max_new_tokens=64)
    print(result.text, result.stats.acceptance_length)
"""

from orthrus_runtime.engine import Engine, GenerationResult  # noqa: F401
from orthrus_runtime.stats import GenerationStats  # noqa: F401
