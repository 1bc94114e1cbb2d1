"""Incremental detokenisation: text deltas from a growing list of token ids (UTF-8 safe), and stop strings."""


class StopStrings:
    """Stop strings over the generated tokens. A generation stops at the token that completes the first stop string;
    the text ends before it (the stop string is not returned, as OpenAI-style servers do), the tokens include it."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops]
        self.hold = max(len(s) for s in self.stops) - 1  # characters a stream keeps back: a stop may be starting

    def _found(self, text: str, start: int) -> bool:
        return any(s in text[start:] for s in self.stops)

    def cut(self, ids: list[int], chunk: list[int]) -> int | None:
        """How many tokens of ``chunk`` (following ``ids``) to keep when it completes a stop string, else None."""
        start = max(0, len(self.tokenizer.decode(ids, skip_special_tokens=True)) - self.hold)
        if not self._found(self.tokenizer.decode(ids + chunk, skip_special_tokens=True), start):
            return None
        for k in range(1, len(chunk) + 1):
            if self._found(self.tokenizer.decode(ids + chunk[:k], skip_special_tokens=True), start):
                return k
        return len(chunk)

    def text(self, text: str) -> str:
        """``text`` up to the first stop string (all of it when there is none)."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return text[:min(hits)] if hits else text


class TextDeltas:
    def __init__(self, tokenizer, stops: StopStrings | None = None):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, new_ids: list[int], final: bool = False) -> str:
        self.ids += new_ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stops is not None:
            cut = self.stops.text(text)
            if cut == text and not final:  # no stop yet: keep back what could be the start of one
                cut = text[:max(0, len(text) - self.stops.hold)]
            text = cut
        if text.endswith("\ufffd") and not final:  # an incomplete UTF-8 sequence: wait for the next tokens
            return ""
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else text
        self.emitted = text
        return delta
