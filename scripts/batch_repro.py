#!/usr/bin/env python
"""Does a request decoded beside others give the same tokens as alone? (the server's batching)

Decodes each prompt alone through the server's batched runtime (``runtime/batched.py``), then
P prompts at a time, with greedy settings (w = 0, k = 1: the policy's own argmax, where a
difference in the last bits of a logit shows as soon as it flips a near tie), and prints, for
every prompt, the index of the first token that differs ("-" when none does).

Usage::

    python scripts/batch_repro.py --parallel 4 16 --prompts 16 -n 96
    python scripts/batch_repro.py -ngl -1          # the same question on a GPU build
"""

from __future__ import annotations

import argparse
from pathlib import Path

from args_local.core.request import Result
from args_local.core.settings import Settings
from args_local.runtime.batched import Batch
from args_local.runtime.load import ModelOptions, load_engine

PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts" / "everyday.txt"


def decode(batch: Batch, prompts: list[str], settings: Settings) -> list[list[int]]:
    """The tokens of ``prompts`` decoded together in ``batch``."""
    engine = batch.engine
    slots = [batch.add(engine.request(p, settings), Result()) for p in prompts]
    tokens: dict[int, list[int]] = {id(s): [] for s in slots}
    while batch.slots:
        for event in batch.step():
            if event.error is not None:
                raise event.error
            mine = tokens[id(event.slot)]
            if event.piece is not None and event.slot.result.tokens > len(mine):
                mine.append(event.piece.step.token)
    return [tokens[id(s)] for s in slots]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parallel", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("-n", "--max-tokens", type=int, default=96)
    ap.add_argument("-m", "--model", type=Path)
    ap.add_argument("-ngl", "--gpu-layers", type=int, default=0)
    args = ap.parse_args()
    prompts = [line.strip() for line in PROMPTS.read_text().splitlines() if line.strip()][: args.prompts]
    engine = load_engine(ModelOptions(model=args.model, gpu_layers=args.gpu_layers), with_reward=False)
    settings = Settings(weight=0.0, top_k=1, max_tokens=args.max_tokens, ignore_eos=True)
    batch = Batch(engine, max(args.parallel), 1024)
    alone = [decode(batch, [p], settings)[0] for p in prompts]
    for p in args.parallel:
        together = [t for i in range(0, len(prompts), p) for t in decode(batch, prompts[i : i + p], settings)]
        first = [next((str(i) for i, (a, b) in enumerate(zip(x, y)) if a != b), "-") for x, y in zip(alone, together)]
        same = first.count("-")
        print(f"{p} at a time: {same} of {len(prompts)} prompts token for token as alone "
              f"({args.max_tokens} tokens each); first difference per prompt: {' '.join(first)}")
    batch.close()


if __name__ == "__main__":
    main()
