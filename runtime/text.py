"""Incremental detokenisation: text deltas from a growing list of token ids (UTF-8 safe)."""


class TextDeltas:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, new_ids: list[int], final: bool = False) -> str:
        self.ids += new_ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # an incomplete UTF-8 sequence: wait for the next tokens
            return ""
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else text
        self.emitted = text
        return delta
