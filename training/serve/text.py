"""One request's text, piece by piece as its tokens come: model/generate.py's TextStream turned around
(tokens are pushed in by the engine, not pulled from a generator), with the same rules. Text that could be
the start of a stop string is held back until it is clear that it isn't, and so are the bytes of a
character split across tokens."""

from __future__ import annotations

from typing import Sequence


class TextPieces:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.token_ids: list[int] = []
        self.text, self.shown = "", 0  # the decoded text so far; how many of its characters were handed out
        self.stopped = False  # a stop string was reached: nothing more comes

    def _held_back(self, text: str) -> int:
        """Characters at the end of text that could begin a stop string."""
        return max(
            (k for s in self.stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0
        )

    def push(self, token: int) -> str:
        """The new text that this token makes safe to show ("" if none yet); sets `stopped` at a stop string."""
        self.token_ids.append(token)
        self.text = self.tokenizer.decode(self.token_ids)
        hits = [i for i in (self.text.find(s, max(0, self.shown - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            piece = self.text[self.shown : min(hits)] if min(hits) > self.shown else ""
            self.shown = len(self.text)
            return piece
        if self.text.endswith("\ufffd"):  # half a UTF-8 character: wait for the rest
            return ""
        safe = len(self.text) - self._held_back(self.text)
        if safe <= self.shown:
            return ""
        piece, self.shown = self.text[self.shown : safe], safe
        return piece

    def flush(self) -> str:
        """What was held back, once no token will come (not after a stop string)."""
        if self.stopped or len(self.text) <= self.shown:
            return ""
        piece, self.shown = self.text[self.shown :], len(self.text)
        return piece
