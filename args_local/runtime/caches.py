"""Scorers: the search's ``Scorer`` protocol over a :class:`RewardModel`.

* :class:`TextScorer` re-reads ``prompt + response + candidate`` as text for every
  candidate: works for any model (encoders, string classifiers, decoders).
* :class:`CachedScorer` is for causal models exported with a KV cache: what the model
  reads before the response (its template's rendering of the system message and the
  prompt, or ``[bos]``) is evaluated once per request, the response as it grows, and the
  k candidates are scored in one call against the cache (single tokens when the model
  shares the policy's tokenizer; otherwise the re-tokenized tail after the longest prefix
  the cache still matches), each followed by what the template writes after the response
  (:class:`Sequences`); only the chosen token stays in the cache. It drives one of
  two caches, one per layout of :mod:`args_local.core.contract`: :class:`RowCache`
  (``"per-row"``) and :class:`SharedCache` (``"shared"``), whose per-step cost grows with
  one read of the cache, not k copies of it.
* :class:`CausalFullScorer` feeds the same causal model the whole token sequence
  for every candidate: the plain path the cached one must agree with.

:func:`make_scorer` picks the fastest exact one for a model and a policy.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

from ..core.contract import last_positions, output_rows, packed_bias, right_pad
from ..core.text import candidate_texts
from .reward import RewardModel, chunks

log = logging.getLogger("args_local")

def make_scorer(
    model: RewardModel,
    prompt: str,
    token_bytes: Callable[[int], bytes],
    policy_vocab: Callable[[], list[str]] | None = None,
    use_cache: bool = True,
    system: str | None = None,
) -> "TextScorer | CachedScorer | CausalFullScorer":
    """The fastest exact scorer for this model and policy, for responses to ``prompt`` under
    ``system``: a KV-cached one for causal models exported with their cache (token ids
    straight from the policy when both share a vocabulary, else bridged through text), a
    text re-scorer for everything else."""
    if model.manifest.kv_cache:
        texts = policy_vocab() if policy_vocab is not None else []
        shared = bool(texts) and model.shares_vocab(texts)
        if not texts:  # a policy server's, which cannot list it
            log.info("the policy's vocabulary is unknown (pass -m with the served GGUF): reward model %s "
                     "reads the response through text", model.path)
        elif not shared:
            log.info("reward model %s does not share the policy's tokenizer: bridging through text", model.path)
        sequences = Sequences(model, token_bytes, bridge=not shared, prompt=prompt, system=system)
        return CachedScorer(model, sequences) if use_cache else CausalFullScorer(model, sequences)
    return TextScorer(model, prompt, token_bytes, system)


class TextScorer:
    """Re-reads the whole text of each candidate; identical texts are scored once."""

    def __init__(self, model: RewardModel, prompt: str, token_bytes: Callable[[int], bytes], system: str | None = None) -> None:
        self.model = model
        self.prompt = prompt
        self.system = system
        self.token_bytes = token_bytes
        self.bounds = model.bounds
        self.response = bytearray()

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        texts = candidate_texts(bytes(self.response), self.token_bytes, tokens)
        unique = list(dict.fromkeys(texts))
        rewards = self.model.score_texts([self.prompt] * len(unique), unique, self.system)
        by_text = dict(zip(unique, rewards))
        return np.array([by_text[t] for t in texts])

    def advance(self, token: int) -> None:
        self.response += self.token_bytes(token)


class Sequences:
    """The reward model's token ids for the response extended by one candidate:
    ``before + response + candidate + after``, where ``before`` and ``after`` are the ids
    around the response (:meth:`RewardModel.conversation_ids`).

    When the reward model shares the policy's vocabulary the policy's ids are used as
    they are. Otherwise (``bridge``) the response text is tokenized with the reward
    model's own tokenizer; only the tail after the part the cache already holds is
    fed to the model, so the result equals full re-scoring of the same text. A candidate
    that adds no text (a control token: the end of the turn) ends the response, so its
    sequence is the finished response's rendering, ``before + response + after``.
    """

    def __init__(self, model: RewardModel, token_bytes: Callable[[int], bytes] | None = None, bridge: bool = False,
                 prompt: str = "", system: str | None = None) -> None:
        self.model = model
        self.token_bytes = token_bytes
        self.bridge = bridge
        self.before, self.after = model.conversation_ids(prompt, system)
        self.ids: list[int] = list(self.before)
        self.text = bytearray()

    def split(self, tokens: Sequence[int]) -> tuple[list[int], list[list[int]]]:
        """(shared prefix, tails): candidate i's sequence is ``prefix + tails[i]``, every tail
        ends with ``after`` and holds at least one token. Of a tail, only what comes before
        ``after`` belongs to the response (see :meth:`kept`). With a shared vocabulary this
        costs nothing per step."""
        after = self.after
        if not self.bridge:
            if not after:
                return self.ids, [[t] for t in tokens]
            return self.ids, [after if self._ends(t) else [t, *after] for t in tokens]
        assert self.token_bytes is not None and self.model.tokenizer is not None
        texts = candidate_texts(bytes(self.text), self.token_bytes, tokens)
        bodies = [self.before + e.ids for e in self.model.tokenizer.encode_batch(texts, add_special_tokens=False)]
        shared = min(len(q) for q in bodies) - (0 if after else 1)
        for q in bodies[1:]:
            shared = min(shared, common_prefix(bodies[0], q))
        return bodies[0][:shared], [q[shared:] + after for q in bodies]

    def _ends(self, token: int) -> bool:
        """Whether ``token`` ends the response: the template's own end of turn, or no text."""
        return token == self.after[0] or (self.token_bytes is not None and not self.token_bytes(token))

    def kept(self, tail: list[int]) -> list[int]:
        """The part of a scored tail that the response keeps once its candidate is chosen."""
        return tail[: len(tail) - len(self.after)]

    def advance(self, token: int) -> None:
        if self.bridge:
            assert self.token_bytes is not None
            self.text += self.token_bytes(token)
        else:
            self.ids.append(token)


class CausalFullScorer:
    """Feeds every candidate's whole sequence, no cache: the plain path."""

    def __init__(self, model: RewardModel, sequences: Sequences | None = None) -> None:
        self.model = model
        self.bounds = model.bounds
        self.sequences = sequences or Sequences(model)

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        prefix, tails = self.sequences.split(tokens)
        return self.model.score_ids([prefix + t for t in tails])

    def advance(self, token: int) -> None:
        self.sequences.advance(token)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    if len(a) <= len(b) and a == b[: len(a)]:  # the usual case, compared in C
        return len(a)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class RowCache:
    """optimum's contract: each row of a batch carries its own past, and the model returns
    it again one step longer (``present.*``). Scoring k candidates repeats the past k times;
    the chosen row of ``present`` is the next cache."""

    def __init__(self, model: RewardModel) -> None:
        self.model = model
        self.length = 0
        self.past = model.empty_past(1)
        self._new: list[tuple[np.ndarray, ...]] = []  # per candidate: its tail's keys and values, per past input

    def truncate(self, n: int) -> None:
        self.past = {name: p[:, :, :n] for name, p in self.past.items()}
        self.length = n

    def _forward(self, ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray], n_candidates: int) -> tuple[Any, list[np.ndarray]]:
        m = self.model
        feeds = m.token_feeds(ids, mask, np.zeros_like(ids), past=self.length)
        feeds.update(past)
        raw, *presents = m.run(feeds, n_candidates, m.present_names)
        return raw, presents

    def extend(self, tokens: list[int]) -> None:
        ids = np.array([tokens], dtype=np.int64)
        _, presents = self._forward(ids, np.ones_like(ids), self.past, 0)
        self.past = dict(zip(self.model.past_names, presents))
        self.length += len(tokens)

    def candidates(self, tails: list[list[int]]) -> tuple[Any, np.ndarray]:
        raws, self._new = [], []
        for part in chunks(tails):
            ids, mask = right_pad(part, self.model.manifest.pad_token_id)
            past = {n: np.repeat(v, len(part), axis=0) for n, v in self.past.items()}
            raw, presents = self._forward(ids, mask, past, len(part))
            raws.append(output_rows(raw, last_positions(mask)))
            # Only the new tokens' keys and values are kept (copied out of the k-row presents).
            self._new.extend(zip(*(np.split(p[:, :, self.length :], len(part)) for p in presents)))
        return np.concatenate(raws), None

    def accept(self, i: int, tail: list[int]) -> None:
        """Candidate i's first ``len(tail)`` new positions join the cache (the rest of its
        scored tail, the template's end of turn, is dropped)."""
        new = self._new[i]
        self.past = {
            n: np.concatenate([self.past[n], part[:, :, : len(tail)]], axis=2) for n, part in zip(self.model.past_names, new)
        }
        self.length += len(tail)


class SharedCache:
    """The ``"shared"`` contract: one past, sequence-major [1, length, heads, dim], read by
    every candidate; the model returns only the new tokens' keys and values, which are
    appended in place (the buffers grow by doubling, and a prefix of them is handed to
    onnxruntime without a copy). The k candidates' tails are packed in one row."""

    def __init__(self, model: RewardModel) -> None:
        self.model = model
        self.length = 0
        self.buffers = {n: np.empty((1, 64, *p.shape[2:]), dtype=np.float32) for n, p in model.empty_past(1).items()}
        self._new: list[list[np.ndarray]] = []  # per chunk of candidates: the new keys and values
        self._where: list[tuple[int, int]] = []  # per candidate: (chunk, where its tail starts)

    def truncate(self, n: int) -> None:
        self.length = n

    def _forward(self, ids: list[int], positions: np.ndarray, bias: np.ndarray, n_candidates: int) -> tuple[Any, list[np.ndarray]]:
        m = self.model
        feeds = {"input_ids": np.array([ids], dtype=np.int64), "position_ids": positions[None], "attention_bias": bias}
        feeds.update({n: b[:, : self.length] for n, b in self.buffers.items()})
        raw, *new = m.run(feeds, n_candidates, m.present_names)
        return raw, new

    def _append(self, new: list[np.ndarray], start: int, stop: int) -> None:
        end = self.length + stop - start
        for (name, buffer), part in zip(list(self.buffers.items()), new):
            if end > buffer.shape[1]:
                grown = np.empty((1, max(end, 2 * buffer.shape[1]), *buffer.shape[2:]), dtype=np.float32)
                grown[:, : self.length] = buffer[:, : self.length]
                self.buffers[name] = buffer = grown
            buffer[:, self.length : end] = part[:, start:stop]
        self.length = end

    def extend(self, tokens: list[int]) -> None:
        positions = np.arange(self.length, self.length + len(tokens), dtype=np.int64)
        _, new = self._forward(tokens, positions, packed_bias([len(tokens)]), 0)
        self._append(new, 0, len(tokens))

    def candidates(self, tails: list[list[int]]) -> tuple[Any, None]:
        raws: list[np.ndarray] = []
        self._new, self._where = [], []
        for part in chunks(tails):
            lengths = [len(t) for t in part]
            ends = np.cumsum(lengths)
            positions = self.length + np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
            raw, new = self._forward([t for tail in part for t in tail], positions, packed_bias(lengths), len(part))
            raws.append(np.asarray(raw)[0, ends - 1])  # [candidates, outputs]: each tail's last position
            self._where.extend((len(self._new), int(start)) for start in ends - lengths)
            self._new.append(new)
        return np.concatenate(raws), None

    def accept(self, i: int, tail: list[int]) -> None:
        """As :meth:`RowCache.accept`: a prefix of the scored tail is appended."""
        chunk, start = self._where[i]
        self._append(self._new[chunk], start, start + len(tail))


class CachedScorer:
    """Scores k candidates against the reward model's KV cache of the response so far.

    Each step: the part all candidates share and the cache lacks (the text before the
    response on the first step, tokens accepted on steps that were skipped, or a
    re-tokenized tail) is fed once as a batch of one; then the k distinct tails (a single
    token each when the vocabularies are shared, followed by what the template writes
    after the response) go in one call against the cache. The chosen candidate's keys and
    values, without that template end, become the cache, so accepting a scored token costs
    no model call.
    """

    def __init__(self, model: RewardModel, sequences: Sequences | None = None) -> None:
        self.model = model
        self.bounds = model.bounds
        self.sequences = sequences or Sequences(model)
        self.cache: RowCache | SharedCache = SharedCache(model) if model.manifest.kv_cache == "shared" else RowCache(model)
        self.cached: list[int] = []
        self._last: dict[int, tuple[int, list[int]]] = {}  # token -> (row, what the response keeps of its tail)

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        prefix, tails = self.sequences.split(tokens)
        keep = common_prefix(self.cached, prefix)
        if keep < len(self.cached):
            self.cached = self.cached[:keep]
            self.cache.truncate(keep)
        if len(prefix) > len(self.cached):
            self.cache.extend(prefix[len(self.cached) :])
            self.cached.extend(prefix[len(self.cached) :])
        raw, last = self.cache.candidates(tails)
        self._last = {token: (i, self.sequences.kept(tail)) for i, (token, tail) in enumerate(zip(tokens, tails))}
        return self.model.rewards(raw, last)

    def advance(self, token: int) -> None:
        self.sequences.advance(token)
        if token in self._last:
            row, tail = self._last[token]
            self.cache.accept(row, tail)
            self.cached.extend(tail)
        self._last = {}
