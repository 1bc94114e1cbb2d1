"""The declarative weight map: checkpoint tensor names -> packed engine tensors.

Every checkpoint tensor is named with its expected shape (from the config); every engine tensor says which
checkpoint tensors it concatenates (along dim 0). Missing, extra or mis-shaped tensors are errors that name the tensor.
"""

from dataclasses import dataclass

from orthrus_runtime.config import ModelConfig

ATTN_PROJ = ("q_proj", "k_proj", "v_proj")
MLP_PROJ = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class Packed:
    name: str                   # engine tensor name
    sources: tuple[str, ...]    # checkpoint tensor names, concatenated along dim 0


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an Orthrus-Qwen3 checkpoint must hold, with its shape."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for suffix in ("", "_diff"):  # the AR attention set and the diffusion set have the same shapes
            a = p + "self_attn."
            shapes[f"{a}q_proj{suffix}.weight"] = (cfg.q_size, h)
            shapes[f"{a}k_proj{suffix}.weight"] = (cfg.kv_size, h)
            shapes[f"{a}v_proj{suffix}.weight"] = (cfg.kv_size, h)
            shapes[f"{a}o_proj{suffix}.weight"] = (h, cfg.q_size)
            shapes[f"{a}q_norm{suffix}.weight"] = (d,)
            shapes[f"{a}k_norm{suffix}.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    return shapes


def tolerated_extras(cfg: ModelConfig) -> set[str]:
    """Tensors a checkpoint may carry that the engine does not use (a tied model's saved lm_head copy)."""
    return {"lm_head.weight"} if cfg.tie_word_embeddings else set()


def packing_plan(cfg: ModelConfig) -> list[Packed]:
    plan = [Packed("embed", ("model.embed_tokens.weight",)), Packed("norm", ("model.norm.weight",))]
    if not cfg.tie_word_embeddings:
        plan.append(Packed("lm_head", ("lm_head.weight",)))
    for n in range(cfg.num_layers):
        p, a = f"model.layers.{n}.", f"model.layers.{n}.self_attn."
        e = f"layers.{n}."
        plan += [Packed(e + "attn_norm", (p + "input_layernorm.weight",)),
                 Packed(e + "mlp_norm", (p + "post_attention_layernorm.weight",)),
                 Packed(e + "gate_up", tuple(f"{p}mlp.{m}.weight" for m in MLP_PROJ)),
                 Packed(e + "down", (p + "mlp.down_proj.weight",))]
        for view, suffix in (("ar", ""), ("diff", "_diff")):
            plan += [Packed(f"{e}{view}.qkv", tuple(f"{a}{m}{suffix}.weight" for m in ATTN_PROJ)),
                     Packed(f"{e}{view}.o", (f"{a}o_proj{suffix}.weight",)),
                     Packed(f"{e}{view}.q_norm", (f"{a}q_norm{suffix}.weight",)),
                     Packed(f"{e}{view}.k_norm", (f"{a}k_norm{suffix}.weight",))]
    used = [s for pk in plan for s in pk.sources]
    assert sorted(used) == sorted(checkpoint_shapes(cfg)), "packing plan must consume every checkpoint tensor once"
    return plan


def engine_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    src = checkpoint_shapes(cfg)
    out = {}
    for pk in packing_plan(cfg):
        first = src[pk.sources[0]]
        out[pk.name] = (sum(src[s][0] for s in pk.sources),) + first[1:]
    return out
