"""Text handling between tokens and the user: UTF-8 pieces and stop strings."""

from __future__ import annotations

import codecs
from typing import Callable, Sequence


class Utf8Pieces:
    """Token bytes to text as they come: a token may hold part of a character, which is held
    back until the character is complete (and replaced if it never is)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopFilter:
    """Holds back text that might be the start of a stop string, and cuts at the first one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        self.held += text
        cut = min((i for i in (self.held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.held, self.stopped = self.held[:cut], "", True
            return out
        keep = max((n for s in self.stops for n in range(1, len(s)) if self.held.endswith(s[:n])), default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def candidate_texts(response: bytes, token_bytes: Callable[[int], bytes], tokens: Sequence[int]) -> list[str]:
    """The response extended by each candidate, as text. A candidate may end inside a UTF-8
    character: the complete characters are scored."""
    return [(response + token_bytes(t)).decode("utf-8", errors="ignore") for t in tokens]


def text_problem(text: str) -> str | None:
    """Why ``text`` is not text that can be written as UTF-8, or None. Python keeps the bytes of
    a non-UTF-8 command-line argument as lone surrogates U+DC80..U+DCFF, and JSON's ``\\ud800``
    makes one too; neither can be tokenized or written out."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        if 0xDC80 <= code <= 0xDCFF:
            return f"is not UTF-8 text (byte 0x{code - 0xDC00:02x} at character {e.start})"
        return f"holds a lone surrogate (U+{code:04X} at character {e.start}), which is not text"
