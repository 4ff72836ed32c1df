"""What every policy offers besides decoding, whether it runs here or on a server: its
chat template, and tokenization that keeps the user's text plain text.

:class:`ChatTokenizer` holds the rendering rules once; a local GGUF
(:class:`~args_local.runtime.policy.LlamaVocab`) and llama.cpp's server
(:class:`~args_local.runtime.remote.ServerVocab`) only supply the primitives.
"""

from __future__ import annotations

import re
from typing import Sequence

from ..core.errors import PromptError
from ..core.text import text_problem


class ChatTokenizer:
    """Chat rendering and tokenization over two primitives: :meth:`_render` (messages to the
    template's text, ready for the assistant's turn) and :meth:`_tokenize` (checked text to
    ids, no BOS added). ``bos_id`` is the token the model wants first, or None when it wants none."""

    bos_id: int | None = None

    def _render(self, messages: Sequence[dict[str, str]]) -> str:
        raise NotImplementedError

    def _tokenize(self, text: str, special: bool) -> list[int]:
        raise NotImplementedError

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """The conversation in the model's own chat template, ready for the assistant's turn."""
        return "".join(text for text, _ in self.chat_segments(messages))

    def chat_segments(self, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
        """The rendered conversation as ``(text, is_template)`` runs. The template's own text may
        hold control tokens (``<|im_start|>``); the messages' contents are the user's and are
        tokenized as plain text, so typing ``<|im_end|>`` cannot forge a turn. Each content is
        rendered as a placeholder first and put back after rendering."""
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        stand_ins = [{**m, "content": mark} for m, mark in zip(messages, marks)]
        rendered = self._render(stand_ins)
        by_mark = {mark: m["content"] for mark, m in zip(marks, messages)}
        segments: list[tuple[str, bool]] = []
        for i, part in enumerate(re.split("(\ue000\\d+\ue001)", rendered)):
            if part:
                segments.append((by_mark[part], False) if i % 2 else (part, True))
        return segments

    def encode_chat(self, messages: Sequence[dict[str, str]], skip_chars: int = 0) -> list[int]:
        """Token ids of the conversation in the chat template (see :meth:`chat_segments`), from
        character ``skip_chars`` of its rendering on (a chat's new turn after its history)."""
        whole, ids = skip_chars == 0, []
        for text, special in self.chat_segments(messages):
            if skip_chars >= len(text):
                skip_chars -= len(text)
                continue
            ids += self._tokenize(_checked(text[skip_chars:]), special)
            skip_chars = 0
        return self._with_bos(ids) if whole else ids

    def tokenize(self, text: str, special: bool, bos: bool = True) -> list[int]:
        """Token ids of ``text``, with the BOS token where the model asks for one (and ``bos``:
        a response's tokens, which continue a prompt, have none)."""
        ids = self._tokenize(_checked(text), special)
        return self._with_bos(ids) if bos else ids

    def _with_bos(self, ids: list[int]) -> list[int]:
        """The BOS token is added only where the model asks for it and the ids do not already
        start with it (chat templates often write it)."""
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids


def _checked(text: str) -> str:
    """``text``, or a sentence saying why it is not text a tokenizer can take."""
    problem = text_problem(text)
    if problem:
        raise PromptError(f"a message {problem}")
    return text
