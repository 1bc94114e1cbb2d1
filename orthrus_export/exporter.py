"""Tracing: ``torch.export`` of the engine's passes at static shapes, with the plugins as single nodes.

Programs (all take ``(weights, tokens, start, k_cache, v_cache)`` and return float32 logits):

- ``draft``  — diffusion view, block of B tokens (reads the cache);
- ``verify`` — AR view, block of B tokens (writes the cache); also runs prompt prefill in chunks of B;
- ``decode`` — AR view, one token (the plain autoregressive baseline).

Weights are graph *inputs*, so a serialized program holds only the graph (JSON, no pickle, no tensors) and one
``weights.safetensors`` serves all of them.
"""

import torch

from orthrus_runtime.config import ModelConfig
from orthrus_export.model import Pass


PROGRAMS = {"draft": "diff", "verify": "ar", "decode": "ar"}


def program_tokens(name: str, cfg: ModelConfig) -> int:
    return 1 if name == "decode" else cfg.block_size


def example_inputs(cfg: ModelConfig, weights: dict, name: str, capacity: int):
    dtype = weights["embed"].dtype
    device = weights["embed"].device
    shape = (cfg.num_layers, cfg.num_kv_heads, capacity, cfg.head_dim)
    cache = torch.zeros(shape, dtype=dtype, device=device)
    tokens = torch.zeros(program_tokens(name, cfg), dtype=torch.int64, device=device)
    return (weights, tokens, torch.tensor(0, device=device), cache, cache.clone())


def export_program(cfg: ModelConfig, weights: dict, name: str, capacity: int) -> torch.export.ExportedProgram:
    module = Pass(cfg, PROGRAMS[name])
    return torch.export.export(module, example_inputs(cfg, weights, name, capacity), strict=False)


def custom_op_nodes(ep: torch.export.ExportedProgram) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in ep.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("orthrus."):
            key = str(node.target).split(".")[1]
            counts[key] = counts.get(key, 0) + 1
    return counts
