"""``args-local score``: what a reward model makes of a response, computed as the search computes it.

The response is cut into the policy's tokens and fed, token by token, to the scorer the search
would use (:meth:`Engine.make_scorer`): the KV-cached one for causal models exported with their
cache (``--no-cache``: full re-scoring of every sequence), the text re-scorer for encoders and
string classifiers. The reward printed is the one the search would have seen when it chose the
response's last token. ``--prefixes`` prints the reward after every token: the curve the search
follows. Prefixes are cut at the policy's tokens because those are the search's steps; a reward
model with its own tokenizer sees each prefix's text re-tokenized, as in the search.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .core.errors import ArgsLocalError, PromptError
from .runtime.engine import Engine


@dataclass(frozen=True)
class Scored:
    """The reward of one prefix of the response (the whole response last), and the model's
    output before the manifest's activation, at the manifest's index."""

    text: str
    reward: float
    raw: float

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "reward": self.reward, "raw": self.raw}


def score(engine: Engine, prompt: str, response: str, use_cache: bool = True, prefixes: bool = False,
          system: str | None = None) -> list[Scored]:
    """The response's reward (``prefixes``: every prefix's, by policy tokens) to ``prompt`` under
    the system message ``system``, by engine.reward."""
    model, policy = engine.reward, engine.policy
    assert model is not None, "score needs a reward model"
    tokens = policy.tokenize(response, special=False, bos=False)  # user text: never control tokens
    if not tokens:
        raise PromptError("the response is empty; there is nothing to score")
    scorer = engine.make_scorer(model, prompt, use_cache, system)
    out, text = [], b""
    for i, token in enumerate(tokens):
        text += policy.token_bytes(token)
        if prefixes or i == len(tokens) - 1:
            reward = float(scorer.score([token])[0])
            out.append(Scored(text.decode("utf-8", errors="ignore"), reward, float(model.last_raw[0])))
        scorer.advance(token)
    return out


def report(scored: list[Scored], prefixes: bool) -> dict[str, Any]:
    """``--json``: the whole response's reward and raw output, and with ``prefixes`` every prefix's."""
    last = scored[-1]
    out: dict[str, Any] = {"reward": last.reward, "raw": last.raw}
    if prefixes:
        out["prefixes"] = [s.as_dict() for s in scored]
    return out


def read_pairs(path: Path) -> list[dict[str, str]]:
    """``--batch``: JSON lines, each with a "prompt" and a "response" string, and optionally a
    "system" one (blank lines skipped)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ArgsLocalError(f"cannot read the batch file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise PromptError(f"{path} is not UTF-8 text (byte {e.start})") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str)):
            raise PromptError(f'{path}:{number}: a row needs a "prompt" string and a "response" string')
        if not isinstance(row.get("system", ""), str):
            raise PromptError(f'{path}:{number}: "system" must be a string')
        pairs.append(row)
    if not pairs:
        raise PromptError(f"{path} holds no row to score")
    return pairs


def score_batch(engine: Engine, pairs: list[dict[str, str]], use_cache: bool, prefixes: bool,
                system: str | None = None) -> Iterator[dict[str, Any]]:
    """One JSON-ready row per pair, in order (a row's own "system" before ``system``); a pair
    that cannot be scored gets its error."""
    for index, pair in enumerate(pairs):
        row: dict[str, Any] = {"index": index, "prompt": pair["prompt"], "response": pair["response"]}
        try:
            scored = score(engine, pair["prompt"], pair["response"], use_cache, prefixes, pair.get("system", system))
            row.update(report(scored, prefixes))
        except PromptError as e:
            row["error"] = str(e)
        yield row
