"""Continuous batching: several requests decoded together in one llama.cpp context.

``Llama`` gives a context with a single sequence, so :class:`BatchedPolicy` makes its own
on the same model with ``n_seq_max = parallel`` and a KV cache split per sequence
(``kv_unified = false``: each sequence owns ``n_ctx`` cells, so one request can never run
another out of room). Each request gets a :class:`SequencePolicy`, a full ``Policy`` of the
search, and :class:`Batch` drives every active request's own, unchanged
:func:`~args_local.core.search.args_search` generator (through :meth:`Engine.stream`) in
lock-step:

1. each request's generator runs to its next decision (its reward-model calls included);
2. the tokens just decided go to llama.cpp in ONE ``llama_decode``, one row per sequence;
3. when a generator resumes, its policy's ``advance(token)`` finds the token already
   decoded and its logits waiting, and returns at once.

Requests join and leave at these step boundaries; a joining request's prompt is evaluated
alone, as ``generate`` evaluates it. The reward model is asked once per request per step:
each request keeps its own reward KV cache, and the cache contracts
(:mod:`args_local.core.contract`) read one past per call, so candidates of requests with
different pasts cannot share a call.

Reproducibility: llama.cpp's logits can depend on the shape of the batch that computed them.
A request alone decodes exactly as ``generate`` does (same chunks for its prompt, one row per
step). Beside others, on the CPU backend, it measured token for token the same too: its
KV cells are its own and a step's rows go through the same kernels one row at a time. Other
backends pick kernels by batch size; there a near tie may flip (the README says more).
"""

from __future__ import annotations

from typing import Sequence

import llama_cpp
import numpy as np

from ..core.errors import ArgsLocalError, ModelError, PromptError, SettingsError
from ..core.settings import Settings
from .engine import Engine
from .policy import N_BATCH, LlamaPolicy, check_memory, switch_threads
from .slots import Event, Slot, Slots


def check_room(policy: LlamaPolicy, parallel: int, n_ctx: int) -> None:
    """Refuse, before allocating, KV caches for ``parallel`` sequences of ``n_ctx`` tokens that
    would not fit in memory."""
    try:
        check_memory(policy.path, n_ctx * parallel)
    except SettingsError as e:
        raise SettingsError(f"{e} (the server holds -c {n_ctx} for each of {parallel} parallel requests; "
                            "or lower --parallel)", e.setting) from None


class BatchedPolicy:
    """One llama.cpp context on ``policy``'s model holding up to ``parallel`` sequences of
    ``n_ctx`` tokens each, with the same threads and batch sizes as ``policy``'s own."""

    def __init__(self, policy: LlamaPolicy, parallel: int, n_ctx: int) -> None:
        self.policy = policy
        self.parallel = parallel
        check_room(policy, parallel, n_ctx)
        params = type(policy.llm.context_params).from_buffer_copy(policy.llm.context_params)
        params.n_seq_max = parallel
        params.n_ctx = n_ctx * parallel
        params.kv_unified = False
        # Prompts in chunks of the size LlamaPolicy uses (same chunks, same logits), and room
        # for one token of every sequence in a step.
        params.n_batch = params.n_ubatch = max(min(N_BATCH, n_ctx), parallel)
        self.ctx = llama_cpp.llama_init_from_model(policy.llm.model, params)
        if not self.ctx:
            raise ModelError(
                f"llama.cpp could not make a context of {parallel} x {n_ctx} tokens for {policy.path.name} "
                "(out of memory? lower --parallel or -c)"
            )
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = min(n_ctx, llama_cpp.llama_n_ctx_seq(self.ctx))  # what was asked for, not llama.cpp's rounding
        self.n_batch = llama_cpp.llama_n_batch(self.ctx)
        self.n_vocab = policy.n_vocab
        self._batch = llama_cpp.llama_batch_init(max(self.n_batch, parallel), 0, 1)
        self._free = list(range(parallel - 1, -1, -1))  # seq ids; pop() hands out 0 first
        self.threads = policy.threads

    def set_threads(self, threads: int) -> None:
        """Decode with ``threads`` threads from the next decode on (the server's lanes share
        the cores)."""
        self.threads = switch_threads(self.ctx, self.threads, threads)

    def sequence(self) -> "SequencePolicy":
        """A policy on a free sequence of this context (see :attr:`free`)."""
        if not self._free:
            raise RuntimeError("no free sequence: all parallel sequences are in use")
        return SequencePolicy(self, self._free.pop())

    @property
    def free(self) -> int:
        return len(self._free)

    def release(self, seq: "SequencePolicy") -> None:
        """Forget ``seq``'s KV cells and give its id back."""
        llama_cpp.llama_memory_seq_rm(self.memory, seq.seq_id, -1, -1)
        self._free.append(seq.seq_id)

    def decode(self, rows: Sequence[tuple["SequencePolicy", Sequence[int]]]) -> None:
        """Append tokens to sequences in one ``llama_decode`` (a prompt longer than the batch in
        several, as ``Llama.eval`` splits it); each sequence's logits after its last token are
        kept on it."""
        total = sum(len(tokens) for _, tokens in rows)
        if total > self.n_batch:
            assert len(rows) == 1, "only a lone prompt is split over several decodes"
            seq, tokens = rows[0]
            for i in range(0, len(tokens), self.n_batch):
                self.decode([(seq, tokens[i : i + self.n_batch])])
            return
        b, n = self._batch, 0
        outputs: list[tuple[SequencePolicy, int]] = []
        for seq, tokens in rows:
            for j, token in enumerate(tokens):
                b.token[n], b.pos[n], b.n_seq_id[n] = token, len(seq.tokens) + j, 1
                b.seq_id[n][0] = seq.seq_id
                b.logits[n] = j == len(tokens) - 1
                n += 1
            outputs.append((seq, n - 1))
        b.n_tokens = n
        status = llama_cpp.llama_decode(self.ctx, b)
        if status != 0:
            raise ModelError(f"llama.cpp failed to decode a batch of {n} tokens (status {status})")
        for seq, i in outputs:
            ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
            seq._logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()  # overwritten by the next decode
        for seq, tokens in rows:
            seq.tokens.extend(tokens)

    def close(self) -> None:
        """Free the context (before the model it was made on)."""
        if self.ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None


class SequencePolicy:
    """One sequence of a :class:`BatchedPolicy`: the search's ``Policy`` protocol, plus what
    :meth:`Engine.stream` asks of a policy (``start``, ``room``, ``token_bytes``).

    ``advance`` decodes the token alone, unless :class:`Batch` has decoded it already together
    with the other sequences' tokens (then it only checks that it is the same token)."""

    def __init__(self, owner: BatchedPolicy, seq_id: int) -> None:
        self.owner = owner
        self.seq_id = seq_id
        self.tokens: list[int] = []  # what this sequence's KV cells hold
        self.prompt_len = 0
        self._logits: np.ndarray | None = None
        self._ahead: list[int] = []  # decoded on the search's behalf, before it asked

    def start(self, tokens: Sequence[int], reuse_prefix: bool = False, settings: Settings | None = None) -> None:
        """Evaluate the prompt alone (as ``generate`` does) on an empty sequence (``settings``
        change nothing: every logit is at hand)."""
        if len(tokens) >= self.owner.n_ctx:
            raise PromptError(f"the prompt is {len(tokens)} tokens but the context window is {self.owner.n_ctx}")
        llama_cpp.llama_memory_seq_rm(self.owner.memory, self.seq_id, -1, -1)
        self.tokens, self._ahead, self.prompt_len = [], [], len(tokens)
        self.owner.decode([(self, list(tokens))])

    @property
    def generated(self) -> int:
        """Tokens after the prompt in this sequence's cache."""
        return len(self.tokens) - self.prompt_len

    def room(self) -> int:
        return self.owner.n_ctx - len(self.tokens)

    def token_bytes(self, token: int) -> bytes:
        return self.owner.policy.token_bytes(token)

    def logits(self) -> np.ndarray:
        assert self._logits is not None, "start() must be called first"
        return self._logits

    def advance(self, token: int) -> None:
        if self._ahead:
            expected = self._ahead.pop(0)
            assert expected == token, f"decoded {expected} ahead of the search, which chose {token}"
            return
        self.owner.decode([(self, [token])])

    def decode_ahead(self, token: int) -> None:
        """Mark ``token`` as decoded on the search's behalf (by :meth:`Batch.step`)."""
        self._ahead.append(token)

    def is_eog(self, token: int) -> bool:
        return self.owner.policy.is_eog(token)


class Batch(Slots):
    """Up to ``parallel`` requests decoded in lock-step: one policy decode per step for all."""

    def __init__(self, engine: Engine, parallel: int, n_ctx: int) -> None:
        self.policy = BatchedPolicy(engine.policy, parallel, n_ctx)
        super().__init__(engine, self.policy.n_ctx)

    @property
    def free(self) -> int:
        return self.policy.free

    def _take(self) -> SequencePolicy:
        return self.policy.sequence()

    def set_threads(self, threads: int) -> None:
        self.policy.set_threads(threads)

    def _release(self, slot: Slot) -> None:
        self.policy.release(slot.policy)

    def step(self) -> list[Event]:
        """Advance every active request by one decision, then decode all the decided tokens
        in one batch."""
        events = super().step()
        # A decision the sequence does not hold yet (not the text flushed after the last one).
        rows = [(e.slot.policy, [e.piece.step.token]) for e in events
                if e.piece is not None and e.slot.result.tokens > e.slot.policy.generated]
        if rows:
            try:
                self.policy.decode(rows)
            except ArgsLocalError as e:
                for seq, _ in rows:
                    slot = next(s for s in self.slots if s.policy is seq)
                    events.append(Event(slot, error=e))
                    self.remove(slot)
                return events
            for seq, (token,) in rows:
                seq.decode_ahead(token)
        return events

    def close(self) -> None:
        super().close()
        self.policy.close()
