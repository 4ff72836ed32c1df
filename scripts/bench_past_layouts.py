#!/usr/bin/env python
"""Time one ARGS reward step of an exported reward model, per-row cache against shared cache.

``args-local export --with-past`` writes a decoder reward model either with optimum's cache
layout (every candidate row carries its own copy of the past) or with the shared layout (one
past that all k candidates read). This script builds a randomly initialised Llama reward model
of the size you ask for (the numbers do not depend on the weights), exports it both ways through
args-local's own exporter, and times ``CachedScorer.score`` with k candidates at every step of a
growing response, as ARGS-greedy calls it. It prints the median step time over the 16 steps
that end at each response length, and the ratio of the longest to the shortest.

Usage (needs the ``export`` extra)::

    python scripts/bench_past_layouts.py --layers 8 --steps 512
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers as tf

from args_local.tooling.export import export_reward_model
from args_local.runtime.models import default_reward
from args_local.runtime.caches import CachedScorer
from args_local.runtime.reward import RewardModel

LENGTHS = (32, 128, 512)
WINDOW = 16


def build_source(folder: Path, layers: int) -> Path:
    """A SmolLM2-shaped Llama with a score head and SmolLM2's tokenizer, saved for export."""
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_file=str(default_reward() / "tokenizer.json"), bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=49152, hidden_size=576, num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, max_position_embeddings=2048, pad_token_id=2, bos_token_id=1, eos_token_id=2, num_labels=1,
    )
    tf.LlamaForSequenceClassification(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def time_steps(folder: Path, steps: int, k: int, threads: int) -> dict[int, float]:
    """Median milliseconds of a scoring step in the window that ends at each length."""
    scorer = CachedScorer(RewardModel(folder, threads=threads))
    rng = np.random.default_rng(0)
    times: dict[int, list[float]] = {L: [] for L in LENGTHS if L <= steps}
    for t in range(steps):
        candidates = [int(x) for x in rng.integers(3, 49152, size=k)]
        start = time.perf_counter()
        scorer.score(candidates)
        elapsed = (time.perf_counter() - start) * 1000
        scorer.advance(candidates[0])
        for L in times:
            if L - WINDOW <= t < L:
                times[L].append(elapsed)
    return {L: statistics.median(v) for L, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the random Llama reward model")
    parser.add_argument("--steps", type=int, default=512, help="response length to grow to")
    parser.add_argument("-k", "--top-k", type=int, default=10, help="candidates per step")
    parser.add_argument("-t", "--threads", type=int, default=2, help="onnxruntime threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        source = build_source(Path(tmp) / "source", args.layers)
        rows = {}
        for layout in ("per-row", "shared"):
            out = Path(tmp) / layout
            export_reward_model(str(source), out, with_past=True, past_layout=layout, log=lambda _: None)
            rows[layout] = time_steps(out, args.steps, args.top_k, args.threads)
    lengths = list(rows["shared"])
    print(f"Llama reward model, {args.layers} layers, hidden 576, fp32; k = {args.top_k}; ms per scoring step (median of {WINDOW})\n")
    print("| layout | " + " | ".join(f"@{L}" for L in lengths) + f" | @{lengths[-1]} / @{lengths[0]} |")
    print("|---" * (len(lengths) + 2) + "|")
    for layout, at in rows.items():
        print(f"| {layout} | " + " | ".join(f"{at[L]:.2f}" for L in lengths) + f" | {at[lengths[-1]] / at[lengths[0]]:.2f}x |")
    last = lengths[-1]
    print(f"\nshared is {rows['per-row'][last] / rows['shared'][last]:.1f}x faster per step @{last}")


if __name__ == "__main__":
    main()
