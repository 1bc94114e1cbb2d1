"""The engine's tokenizer: ``tokenizers`` plus the checkpoint's chat template (jinja2, sandboxed).

Loading ``transformers`` is not needed to serve an engine (it costs seconds, and inside Triton's Python backend
its network stack does not even import); this reads the same ``tokenizer.json`` / ``tokenizer_config.json`` the
way ``transformers``' fast tokenizers do.
"""

import json
from pathlib import Path

from tokenizers import Tokenizer


class EngineTokenizer:
    def __init__(self, folder: Path):
        folder = Path(folder)
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_file = folder / "tokenizer_config.json"
        self.config = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        template = folder / "chat_template.jinja"
        self.chat_template = template.read_text() if template.exists() else self.config.get("chat_template")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def _token(self, key: str) -> str | None:
        v = self.config.get(key)
        return v.get("content") if isinstance(v, dict) else v

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._token("bos_token") or "", eos_token=self._token("eos_token") or "")
