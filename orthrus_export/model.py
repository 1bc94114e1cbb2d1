"""The engine's forward passes over packed weights: the AR view (verify/prefill/decode) and the diffusion view (draft).

Pure functions of ``(weights, tokens, start, slots, k_cache, v_cache)`` so that ``torch.export`` traces them with
the weights as inputs (one copy in ``weights.safetensors`` serves every traced program) and the attention plugins
as single nodes. Batched: ``tokens`` ``[b, T]`` (T = block size, or 1 for decode; b rows, each a block of the
sequence in cache slot ``slots[i]`` at positions ``start[i] …``), ``start`` and ``slots`` int64 ``[b]``, caches
``[L, S, Hkv, C, D]``. Single sequence (``slots`` None; the ONNX export's graphs): ``tokens`` ``[T]``, ``start`` a
scalar, caches ``[L, Hkv, C, D]``. Every projection runs on all ``b·T`` rows at once; only attention sees the rows.
"""

import torch
import torch.nn.functional as F

import orthrus_plugins  # noqa: F401  (registers torch.ops.orthrus.*)
from orthrus_plugins.qk_norm_rope import rms_norm
from orthrus_runtime.config import ModelConfig

VIEWS = ("ar", "diff")


def linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """``x @ w[name].T``; an FP8 engine's quantized weights (``name`` + ``.scale`` present) go through
    ``orthrus::fp8_linear``."""
    if name + ".scale" in w:
        return torch.ops.orthrus.fp8_linear(x, w[name], w[name + ".scale"])
    return F.linear(x, w[name])


def forward(cfg: ModelConfig, view: str, w: dict[str, torch.Tensor], tokens: torch.Tensor, start: torch.Tensor,
            slots: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Logits [..., T, V] (float32, the shape of ``tokens`` plus V) of one pass of ``view`` over each row of
    ``tokens`` at positions ``start … start+T-1`` of its slot.

    ``view == "ar"``: causal, writes the block's K/V into the caches at ``start`` (verify, prefill chunk, decode).
    ``view == "diff"``: the diffusion set; attends to cache ``[0, start)`` plus the block, writes nothing (draft).
    """
    lead = tokens.shape
    block = torch.arange(lead[-1], device=tokens.device)
    if slots is None:
        pos, extra = start + block, {}
    else:  # all rows' tokens as one [b·T] sequence for every projection (reshapes by -1: no symbolic numel)
        tokens, pos, extra = tokens.reshape(-1), (start[:, None] + block).reshape(-1), {"slots": slots}
    dtype = w["embed"].dtype
    cos = w["rope.cos"].index_select(0, pos).to(dtype)[:, None, :]
    sin = w["rope.sin"].index_select(0, pos).to(dtype)[:, None, :]
    scale = cfg.head_dim ** -0.5
    x = F.embedding(tokens, w["embed"])
    for n in range(cfg.num_layers):
        p = f"layers.{n}."
        h = rms_norm(x, w[p + "attn_norm"], cfg.rms_norm_eps)
        qkv = linear(h, w, f"{p}{view}.qkv")
        q, k = torch.ops.orthrus.qk_norm_rope(qkv, w[f"{p}{view}.q_norm"], w[f"{p}{view}.k_norm"], cos, sin,
                                              cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps)
        v = qkv[:, cfg.q_size + cfg.kv_size:].reshape(-1, cfg.num_kv_heads, cfg.head_dim)
        if view == "ar":
            o = torch.ops.orthrus.cached_attention(q, k, v, k_cache, v_cache, start, n, scale, **extra)
        else:
            o = torch.ops.orthrus.diffusion_attention(q, k, v, k_cache, v_cache, start, n, scale, **extra)
        x = x + linear(o.reshape(-1, cfg.q_size), w, f"{p}{view}.o")
        h = rms_norm(x, w[p + "mlp_norm"], cfg.rms_norm_eps)
        gate, up = linear(h, w, p + "gate_up").chunk(2, dim=-1)
        x = x + linear(F.silu(gate) * up, w, p + "down")
    x = rms_norm(x, w["norm"], cfg.rms_norm_eps)
    head = w["embed"] if cfg.tie_word_embeddings else w.get("lm_head")
    if "lm_head.scale" in w:  # FP8 head (a quantized copy of the tied embedding, or of lm_head)
        logits = linear(x, w, "lm_head")
    elif any(k.endswith(".scale") for k in w):  # an FP8 engine's BF16 head: rows batch-invariant as its layers'
        logits = torch.ops.orthrus.invariant_linear(x, head)
    else:
        logits = F.linear(x, head)
    logits = logits.float()
    return logits if slots is None else logits.reshape(lead[0], lead[1], -1)


class Pass(torch.nn.Module):
    """One traced entry point: ``forward(weights, tokens, start, slots, k_cache, v_cache) -> logits`` (batched)."""

    def __init__(self, cfg: ModelConfig, view: str):
        super().__init__()
        assert view in VIEWS
        self.cfg, self.view = cfg, view

    def forward(self, weights, tokens, start, slots, k_cache, v_cache):
        return forward(self.cfg, self.view, weights, tokens, start, slots, k_cache, v_cache)


class SinglePass(Pass):
    """``forward(weights, tokens, start, k_cache, v_cache) -> logits``: one sequence (the ONNX export's graphs)."""

    def forward(self, weights, tokens, start, k_cache, v_cache):
        return forward(self.cfg, self.view, weights, tokens, start, None, k_cache, v_cache)
