"""Small Orthrus-Qwen3 checkpoints in exactly the published layout, with deterministic random weights.

Used for the embedded default model ``tiny`` (``scripts/make_tiny.py``) and by the tests, which need many shapes
(GQA ratios, tied/untied heads, odd vocabularies, sharded files). The layout matches the published checkpoints:
``config.json`` (``architectures: ["OrthrusLM"]``, ``model_type: qwen3``, ``block_size``, ``mask_token_id``, an
``auto_map`` to remote code and leftover ``r``/``lora_alpha`` keys), ``generation_config.json`` (``use_cache: false``),
safetensors weights (single file or sharded with an index) and tokenizer files.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from orthrus_runtime.config import ModelConfig
from orthrus_export.weights import checkpoint_shapes

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>")
BYTE_VOCAB = 256
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_to_unicode() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte (printable Latin-1 bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def write_byte_tokenizer(out: Path) -> dict[str, int]:
    """A byte-level tokenizer: ids 0-255 are bytes, then the special tokens. Returns special token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    tok.save(str(out / "tokenizer.json"))
    ids = {s: BYTE_VOCAB + i for i, s in enumerate(SPECIALS)}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": 32768, "clean_up_tokenization_spaces": False}, indent=2))
    return ids


def random_tensors(cfg: ModelConfig, seed: int, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in checkpoint_shapes(cfg).items():
        if len(shape) == 1:  # norm weights: around 1
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif "embed_tokens" in name:  # small, so the layers (not the tied head echoing the input) decide
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / shape[1] ** 0.5
        out[name] = t.to(dtype)
    return out


def write_checkpoint(out: Path, *, vocab_size=384, hidden_size=128, intermediate_size=256, num_layers=4,
                     num_heads=4, num_kv_heads=2, head_dim=32, tie_word_embeddings=True, block_size=32,
                     seed=0, shards=1, tokenizer=True, dtype=torch.bfloat16, max_position_embeddings=4096,
                     tensors: dict[str, torch.Tensor] | None = None, special_ids: dict | None = None) -> ModelConfig:
    """Write a complete checkpoint folder and return its config. ``special_ids`` ({"eos": [...], "pad": id,
    "mask": id}) is for a folder whose tokenizer files were written by the caller."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if special_ids is not None:
        eos, pad, mask = list(special_ids["eos"]), special_ids["pad"], special_ids["mask"]
    elif tokenizer:
        if vocab_size < BYTE_VOCAB + len(SPECIALS):
            raise ValueError("a tokenizer needs vocab_size >= 260")
        specials = write_byte_tokenizer(out)
        eos, pad, mask = [specials["<|im_end|>"], specials["<|endoftext|>"]], specials["<|endoftext|>"], \
            specials["<|mask|>"]
    else:  # token-id-only model: the last ids are EOS and mask
        eos, pad, mask = [vocab_size - 2], vocab_size - 2, vocab_size - 1
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                      rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=max_position_embeddings,
                      tie_word_embeddings=tie_word_embeddings, block_size=block_size, mask_token_id=mask,
                      eos_token_ids=tuple(eos), bos_token_id=pad, pad_token_id=None)
    config = {
        "architectures": ["OrthrusLM"], "model_type": "qwen3",
        "auto_map": {"AutoModelForCausalLM": "modeling_orthrus.OrthrusLM"},
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": pad, "eos_token_id": eos[0],
        "head_dim": head_dim, "hidden_act": "silu", "hidden_size": hidden_size, "initializer_range": 0.02,
        "intermediate_size": intermediate_size, "max_position_embeddings": max_position_embeddings,
        "max_window_layers": num_layers, "num_attention_heads": num_heads, "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads, "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": tie_word_embeddings, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False, "vocab_size": vocab_size,
        "block_size": block_size, "mask_token_id": mask, "r": 64, "lora_alpha": 128,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": pad, "eos_token_id": eos, "use_cache": False, "do_sample": False}, indent=2))
    tensors = tensors if tensors is not None else random_tensors(cfg, seed, dtype)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
            save_file(part, str(out / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return cfg
