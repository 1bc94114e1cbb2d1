"""The Hugging Face reference: the oracle for per-pass logits and for tokens.

AR view: ``transformers``' ``Qwen3ForCausalLM`` on the checkpoint's base weights. Diffusion view: ``transformers``'
``Qwen3Attention`` modules holding the ``*_diff`` weights, run inside the same decoder layers (shared norms, MLPs,
embeddings and head), attending without a mask to the AR cache ``[0, s)`` plus the block. On top, a plain Orthrus
loop (greedy) written the slow, obvious way.
"""

import torch
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

from orthrus_export.checkpoint import Checkpoint
from orthrus_export.weights import checkpoint_shapes

_DIFF = ("q_proj_diff", "k_proj_diff", "v_proj_diff", "o_proj_diff", "q_norm_diff", "k_norm_diff")


class _PrefixView:
    """Quacks like a transformers Cache for one attention call: returns cache[:, :, :s] ++ block, stores nothing."""

    def __init__(self, cache: DynamicCache, length: int):
        self.cache, self.length = cache, length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.length == 0:
            return key_states, value_states
        layer = self.cache.layers[layer_idx]
        keys = layer.keys[:, :, :self.length]
        values = layer.values[:, :, :self.length]
        return torch.cat([keys, key_states], dim=2), torch.cat([values, value_states], dim=2)


def trim_cache(cache: DynamicCache, length: int) -> None:
    """Keep cache positions < length (the rejected tail of a verify pass is dropped)."""
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]


class Reference:
    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype = torch.float32):
        cfg = ckpt.config
        self.cfg, self.dtype = cfg, dtype
        hf_cfg = Qwen3Config(**cfg.hf_config_dict())
        hf_cfg._attn_implementation = "eager"
        self.hf_config = hf_cfg
        with torch.device("meta"):
            model = Qwen3ForCausalLM(hf_cfg)
        tensors = {name: ckpt.tensor(name).to(dtype) for name in checkpoint_shapes(cfg)}
        base = {k: v for k, v in tensors.items() if not any(d in k for d in _DIFF)}
        if cfg.tie_word_embeddings:
            base["lm_head.weight"] = base["model.embed_tokens.weight"]
        model.load_state_dict(base, strict=True, assign=True)
        model.model.rotary_emb = type(model.model.rotary_emb)(hf_cfg)  # its buffers were on meta
        model.tie_weights() if cfg.tie_word_embeddings else None
        self.ar = model.eval()
        self.diff_attn = torch.nn.ModuleList()
        for i in range(cfg.num_layers):
            attn = Qwen3Attention(hf_cfg, i).to(dtype)
            attn.is_causal = False
            prefix = f"model.layers.{i}.self_attn."
            attn.load_state_dict({f"{n[:-5]}.weight": tensors[f"{prefix}{n}.weight"] for n in _DIFF}, strict=True)
            self.diff_attn.append(attn.eval())

    # ---- passes ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def ar_pass(self, tokens: list[int], cache: DynamicCache) -> torch.Tensor:
        """AR logits [T, V] for ``tokens`` appended at the cache's current length (the cache grows)."""
        s = cache.get_seq_length()
        ids = torch.tensor([tokens])
        pos = torch.arange(s, s + len(tokens))[None]
        out = self.ar(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
        return out.logits[0].float()

    @torch.no_grad()
    def draft_pass(self, block: list[int], cache: DynamicCache) -> torch.Tensor:
        """Diffusion-view logits [B, V] for ``block`` at positions s … s+B-1 over the AR cache [0, s)."""
        m = self.ar.model
        s = cache.get_seq_length()
        h = m.embed_tokens(torch.tensor([block]))
        pos = torch.arange(s, s + len(block))[None]
        pe = m.rotary_emb(h, pos)
        for i, layer in enumerate(m.layers):
            r = h
            x, _ = self.diff_attn[i](layer.input_layernorm(h), pe, attention_mask=None,
                                     past_key_values=_PrefixView(cache, s))
            h = r + x
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.ar.lm_head(m.norm(h))[0].float()

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.hf_config)

    # ---- decoding -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_ar(self, prompt: list[int], max_new_tokens: int, eos_ids=None) -> list[int]:
        """``Qwen3ForCausalLM.generate(do_sample=False)``: the base model's greedy tokens (EOS included)."""
        eos = list(self.cfg.eos_token_ids if eos_ids is None else eos_ids)
        out = self.ar.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0, use_cache=True,
                               eos_token_id=eos or None, pad_token_id=eos[0] if eos else 0,
                               temperature=None, top_k=None, top_p=None)
        return out[0, len(prompt):].tolist()

    @torch.no_grad()
    def generate_orthrus(self, prompt: list[int], max_new_tokens: int, eos_ids=None):
        """The plain reference Orthrus loop (greedy). Returns (tokens, accepted lengths per cycle)."""
        eos = set(self.cfg.eos_token_ids if eos_ids is None else eos_ids)
        b, mask = self.cfg.block_size, self.cfg.mask_token_id
        cache = self.new_cache()
        x = int(self.ar_pass(prompt, cache)[-1].argmax())
        out, lengths = [x], []
        while len(out) < max_new_tokens and x not in eos:
            s = cache.get_seq_length()
            drafts = self.draft_pass([x] + [mask] * (b - 1), cache).argmax(-1)[:-1].tolist()
            verified = self.ar_pass([x] + drafts, cache).argmax(-1).tolist()
            n = 0
            while n < b - 1 and drafts[n] == verified[n]:
                n += 1
            emitted = drafts[:n] + [verified[n]]
            for j, tok in enumerate(emitted):  # cut at EOS inside the block
                if tok in eos:
                    emitted = emitted[:j + 1]
                    break
            lengths.append(len(emitted))
            trim_cache(cache, s + n + 1)
            out += emitted
            x = out[-1]
        return out[:max_new_tokens], lengths
