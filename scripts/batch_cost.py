#!/usr/bin/env python
"""What a step of the server's batching costs: llama.cpp's decode, the reward model, the rest.

Decodes the same prompts in the server's batched runtime (``runtime/batched.py``), first one at
a time and then ``--parallel`` at a time, with ``generate``'s default ARGS settings and EOS
ignored, and prints per decoded step the milliseconds spent in ``llama_decode``, in the reward
model (each request's own reward-model time) and elsewhere (the searches), with the ratio of a
step of ``--parallel`` rows to a step of one. Medians over ``--repeats`` runs.

Usage::

    python scripts/batch_cost.py --parallel 4 -t 1 -n 48
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from args_local.core.defaults import GENERATE
from args_local.core.request import Result
from args_local.runtime.batched import Batch
from args_local.runtime.load import ModelOptions, load_engine

PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts" / "everyday.txt"


def run(batch: Batch, prompts: list[str], n: int) -> tuple[float, float, float, int]:
    """(seconds in decode, in the reward model, in all, steps) for ``prompts`` decoded together,
    counted after their prompts are evaluated."""
    engine, settings = batch.engine, GENERATE.update(max_tokens=n, ignore_eos=True, seed=1)
    decode, timed = batch.policy.decode, [0.0]

    def timed_decode(rows):  # this batch's own decode, timed
        t = time.perf_counter()
        decode(rows)
        timed[0] += time.perf_counter() - t

    batch.policy.decode = timed_decode
    results = [Result() for _ in prompts]
    for prompt, result in zip(prompts, results):
        batch.add(engine.request(prompt, settings), result)
    batch.step()  # the prompts
    timed[0], before = 0.0, sum(r.reward_cost.seconds for r in results)
    start, steps = time.perf_counter(), 0
    while batch.slots:
        batch.step()
        steps += 1
    total = time.perf_counter() - start
    del batch.policy.decode
    return timed[0], sum(r.reward_cost.seconds for r in results) - before, total, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("-t", "--threads", type=int, help="llama.cpp and onnxruntime threads [default: theirs]")
    ap.add_argument("-n", type=int, default=48, help="tokens per request")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    engine = load_engine(ModelOptions(threads=args.threads))
    prompts = [line.strip() for line in PROMPTS.read_text().splitlines() if line.strip()][: args.parallel]
    rows = {}
    for width in (1, args.parallel):
        samples = []
        for _ in range(args.repeats):
            batch = Batch(engine, width, 1024)
            try:
                samples.append(run(batch, prompts[:width], args.n))
            finally:
                batch.close()
        decode, reward, total, steps = (statistics.median(s[i] for s in samples) for i in range(4))
        rows[width] = (1e3 * decode / steps, 1e3 * reward / steps, 1e3 * (total - decode - reward) / steps, width * steps / total)
    print(f"{engine.policy.path.name} on {engine.policy.threads} llama.cpp thread(s), {args.n} tokens per request, median of {args.repeats}\n")
    print("| requests per step | decode ms/step | reward ms/step | rest ms/step | tokens/s |")
    print("| --- | --- | --- | --- | --- |")
    for width, (d, r, o, tps) in rows.items():
        print(f"| {width} | {d:.1f} | {r:.1f} | {o:.1f} | {tps:.1f} |")
    one, many = rows[1], rows[args.parallel]
    print(f"\na step of {args.parallel} rows / a step of one: decode {many[0] / one[0]:.2f}x, reward {many[1] / one[1]:.2f}x, "
          f"tokens/s {many[3] / one[3]:.2f}x")


if __name__ == "__main__":
    main()
