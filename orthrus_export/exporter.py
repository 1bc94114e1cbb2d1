"""Tracing: ``torch.export`` of the engine's passes, with the plugins as single nodes.

Programs (all take ``(weights, tokens, start, slots, k_cache, v_cache)`` and return float32 logits ``[b, T, V]``):

- ``draft``  — diffusion view, rows of B tokens (reads the cache);
- ``verify`` — AR view, rows of B tokens (writes the cache); also runs prompt prefill in chunks of B;
- ``decode`` — AR view, rows of one token (the plain autoregressive baseline).

``tokens`` is ``[b, T]`` with the row count ``b`` a dynamic dimension (1 … max batch size): one graph per program
serves every batch bucket, and the runtime compiles and captures it at each bucket's static shape. The caches are
``[L, S, Hkv, C, D]`` (S = max batch size + 1 slots, the last a scratch slot for padding rows; S is dynamic too, so
tools can run a pass on a one-sequence cache).

Weights are graph *inputs*, so a serialized program holds only the graph (JSON, no pickle, no tensors) and one
``weights.safetensors`` serves all of them.

``export_single`` traces the same forward for one sequence (``tokens [T]``, scalar ``start``, ``[L, Hkv, C, D]``
caches, no slots): the graphs the ONNX export translates.
"""

import torch

from orthrus_runtime.config import ModelConfig
from orthrus_export.model import Pass, SinglePass


PROGRAMS = {"draft": "diff", "verify": "ar", "decode": "ar"}


def program_tokens(name: str, cfg: ModelConfig) -> int:
    return 1 if name == "decode" else cfg.block_size


def example_inputs(cfg: ModelConfig, weights: dict, name: str, capacity: int, slots: int, rows: int = 2):
    dtype = weights["embed"].dtype
    device = weights["embed"].device
    shape = (cfg.num_layers, slots, cfg.num_kv_heads, capacity, cfg.head_dim)
    cache = torch.zeros(shape, dtype=dtype, device=device)
    tokens = torch.zeros(rows, program_tokens(name, cfg), dtype=torch.int64, device=device)
    index = torch.zeros(rows, dtype=torch.int64, device=device)
    return (weights, tokens, index, index.clone(), cache, cache.clone())


def export_program(cfg: ModelConfig, weights: dict, name: str, capacity: int, slots: int,
                   max_rows: int) -> torch.export.ExportedProgram:
    """The batched program ``name`` for caches of ``slots`` slots, rows 1 … ``max_rows`` (dynamic)."""
    module = Pass(cfg, PROGRAMS[name])
    rows = torch.export.Dim("rows", min=1, max=max(2, max_rows))
    cache_slots = torch.export.Dim("slots", min=1, max=max(3, slots))  # tools pass one-sequence caches too
    cache = {1: cache_slots}
    shapes = ({k: None for k in weights}, {0: rows}, {0: rows}, {0: rows}, cache, cache)
    return torch.export.export(module, example_inputs(cfg, weights, name, capacity, slots), dynamic_shapes=shapes,
                               strict=False)


def export_single(cfg: ModelConfig, weights: dict, name: str, capacity: int) -> torch.export.ExportedProgram:
    """The one-sequence program ``name`` (static shapes): what ``orthrus_export.onnx_export`` translates."""
    dtype, device = weights["embed"].dtype, weights["embed"].device
    shape = (cfg.num_layers, cfg.num_kv_heads, capacity, cfg.head_dim)
    cache = torch.zeros(shape, dtype=dtype, device=device)
    tokens = torch.zeros(program_tokens(name, cfg), dtype=torch.int64, device=device)
    inputs = (weights, tokens, torch.tensor(0, device=device), cache, cache.clone())
    return torch.export.export(SinglePass(cfg, PROGRAMS[name]), inputs, strict=False)


def custom_op_nodes(ep: torch.export.ExportedProgram) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in ep.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("orthrus."):
            key = str(node.target).split(".")[1]
            counts[key] = counts.get(key, 0) + 1
    return counts
