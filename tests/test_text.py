"""Tokens to text: stop strings, split UTF-8 characters, long tokens (real tokenizer)."""

from __future__ import annotations

import codecs

import pytest

from args_local.core.text import StopFilter


def feed_all(stops, pieces):
    f = StopFilter(stops)
    out = "".join(f.feed(p) for p in pieces if not f.stopped)
    return out + ("" if f.stopped else f.flush()), f.stopped


def test_stop_string_split_across_pieces_is_cut():
    assert feed_all(["\nUser:"], ["Hello", "\nUs", "er: hi"]) == ("Hello", True)


def test_text_that_only_looks_like_a_stop_start_is_released():
    assert feed_all(["STOP"], ["a S", "T", "x"]) == ("a STx", False)


def test_no_stops_passes_everything():
    assert feed_all([], ["a", "b"]) == ("ab", False)


@pytest.mark.slow
def test_streamed_token_bytes_rebuild_multibyte_text(policy):
    text = "Grüße 👋🏽 你好, naïve café — ok"
    ids = policy.tokenize(text, special=False)
    decoder = codecs.getincrementaldecoder("utf-8")()
    pieces = [decoder.decode(policy.token_bytes(t)) for t in ids]
    assert "".join(pieces) + decoder.decode(b"", final=True) == text
    assert "" in pieces  # some token ended inside a character and was held back


@pytest.mark.slow
def test_tokens_longer_than_32_bytes_are_not_lost(policy):
    longest = max(range(policy.n_vocab), key=lambda t: len(policy.token_bytes(t)))
    piece = policy.token_bytes(longest)
    assert len(piece) > 32
