"""The model configuration an engine records (``manifest.model.config``) and the runtime reads.

Parsing a checkpoint's ``config.json`` into it is the builder's job (``orthrus_export.config``); the runtime only
reads the engine's copy, so it needs neither ``transformers`` nor the checkpoint.
"""

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    block_size: int
    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**d)

    def hf_config_dict(self) -> dict:
        """The matching ``transformers`` Qwen3Config arguments (base model only)."""
        return dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                    intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                    num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                    head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
                    rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                    max_position_embeddings=self.max_position_embeddings,
                    tie_word_embeddings=self.tie_word_embeddings, attention_bias=False, use_sliding_window=False,
                    hidden_act="silu", bos_token_id=self.bos_token_id, eos_token_id=list(self.eos_token_ids),
                    pad_token_id=self.pad_token_id)
