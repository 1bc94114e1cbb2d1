"""Reading an Orthrus-Qwen3 checkpoint's ``config.json`` (never its remote code) into the engine's ``ModelConfig``."""

import json
from pathlib import Path

from orthrus_runtime.config import ModelConfig
from orthrus_runtime.errors import OrthrusError

# keys of config.json that are read; everything else (auto_map, r, lora_alpha, architectures, ...) is ignored
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "block_size", "mask_token_id")


def _eos_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise OrthrusError(f"{path} is missing: a checkpoint directory needs config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OrthrusError(f"{path} is not valid JSON ({e}): re-download or repair the file") from None
    if not isinstance(data, dict):
        raise OrthrusError(f"{path} must hold a JSON object")
    return data


def load_model_config(ckpt_dir: Path) -> ModelConfig:
    path = ckpt_dir / "config.json"
    cfg = read_json(path)
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        hint = (" (block_size/mask_token_id mark an Orthrus checkpoint; is this a plain Qwen3 model?)"
                if {"block_size", "mask_token_id"} & set(missing) else "")
        raise OrthrusError(f"{path} lacks {', '.join(missing)}{hint}")
    if cfg.get("attention_bias"):
        raise OrthrusError(f"{path}: attention_bias=true is not a Qwen3 layout this exporter supports")
    if cfg.get("use_sliding_window"):
        raise OrthrusError(f"{path}: use_sliding_window=true is not supported; set it to false")
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise OrthrusError(f"{path}: rope type {rope_type!r} is not supported (only default RoPE)")
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise OrthrusError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    gen = ckpt_dir / "generation_config.json"
    eos = _eos_list(cfg.get("eos_token_id"))
    if gen.exists():  # its eos list is the one generation uses; use_cache=false there is ignored on purpose
        eos = _eos_list(read_json(gen).get("eos_token_id")) or eos
    mc = ModelConfig(
        vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=kv_heads,
        head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        block_size=int(cfg["block_size"]), mask_token_id=int(cfg["mask_token_id"]),
        eos_token_ids=tuple(eos), bos_token_id=cfg.get("bos_token_id"), pad_token_id=cfg.get("pad_token_id"))
    if not 0 <= mc.mask_token_id < mc.vocab_size:
        raise OrthrusError(f"{path}: mask_token_id {mc.mask_token_id} is outside the vocabulary of {mc.vocab_size}")
    if mc.block_size < 2:
        raise OrthrusError(f"{path}: block_size must be >= 2, got {mc.block_size}")
    return mc


def generation_defaults(ckpt_dir: Path) -> dict:
    """The sampling defaults of ``generation_config.json`` (as ``transformers`` and vLLM apply them when a request
    does not set its own): ``do_sample``, ``temperature``, ``top_k``, ``top_p`` (None where the file is silent)."""
    gen = ckpt_dir / "generation_config.json"
    d = read_json(gen) if gen.exists() else {}
    out = {"source": "generation_config.json" if gen.exists() else None, "do_sample": bool(d.get("do_sample", False))}
    for key, cast in (("temperature", float), ("top_k", int), ("top_p", float)):
        try:
            out[key] = cast(d[key]) if d.get(key) is not None else None
        except (TypeError, ValueError):
            raise OrthrusError(f"{gen}: {key} must be a number, got {d[key]!r}") from None
    return out
