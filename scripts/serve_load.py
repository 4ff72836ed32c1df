#!/usr/bin/env python
"""A bounded load test of ``args-local serve``: N concurrent clients against the same requests
one after another, on a server this script starts on 127.0.0.1 and stops itself.

Each round runs two phases of ``--duration`` seconds on the same server: ``--clients``
clients sending streamed chat requests back to back, and one client doing the same (one
request at a time). Every request asks for exactly ``--max-tokens`` tokens (``ignore_eos``),
so the phases do the same work per request. Rounds alternate which phase goes first. Each
round also times ``args-local generate`` on the same prompt, so the server's per-token time
at one request can be compared with the command line's in the same conditions.

It prints a Markdown table of medians over the rounds: p50/p95 latency, p50/p95 time to first
token, aggregate tokens/s and failures, then the throughput ratio and the per-token ratio.

Usage::

    python scripts/serve_load.py --clients 4 --duration 30 --rounds 3 --max-tokens 64
    python scripts/serve_load.py --extra '{"reward_weight": 0, "top_k": 1}'   # the policy alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from args_local.serve.launch import ServerProcess

PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts" / "everyday.txt"


@dataclass
class Phase:
    """What one phase measured."""

    clients: int
    latency_s: list[float] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    per_token_s: list[float] = field(default_factory=list)  # after the first token
    tokens: int = 0
    failures: int = 0
    wall_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str, n: int, extra: dict[str, Any], phase: Phase) -> None:
    start = time.perf_counter()
    first = None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=n, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True, **extra},
        )
        tokens = 0
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except openai.APIError as e:
        print(f"serve_load: request failed: {e}", file=sys.stderr)
        phase.failures += 1
        return
    end = time.perf_counter() - start
    if tokens != n or first is None:
        phase.failures += 1
        return
    phase.latency_s.append(end)
    phase.first_token_s.append(first)
    phase.per_token_s.append((end - first) / (n - 1))
    phase.tokens += tokens


async def run_phase(url: str, model: str, prompts: list[str], clients: int, duration: float, n: int, extra: dict[str, Any]) -> Phase:
    """``clients`` clients sending requests back to back until ``duration`` has passed."""
    phase = Phase(clients)
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    deadline = time.perf_counter() + duration

    async def worker(i: int) -> None:
        j = i
        while time.perf_counter() < deadline:
            await one_request(client, model, prompts[j % len(prompts)], n, extra, phase)
            j += clients

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    phase.wall_s = time.perf_counter() - start
    await client.close()
    return phase


def generate_per_token(prompt: str, n: int, ctx: str, extra: dict[str, Any]) -> float:
    """``args-local generate``'s time per token after the first, from its --json report, with the
    requests' reward_weight and top_k."""
    flags = [f for key, flag in (("reward_weight", "-w"), ("top_k", "-k")) if key in extra for f in (flag, str(extra[key]))]
    out = subprocess.run([sys.executable, "-m", "args_local", "generate", "--json", "--ignore-eos", "-n", str(n), "-c", ctx,
                          *flags, prompt], capture_output=True, check=True, timeout=600)
    report = json.loads(out.stdout)
    return (report["elapsed_s"] - report["first_token_s"]) / (report["tokens"] - 1)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per phase")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--extra", default="{}", help="JSON fields added to every request (reward_weight, top_k...)")
    ap.add_argument("--ctx-size", default="512", help="-c of the server: tokens per request")
    args = ap.parse_args()
    extra = json.loads(args.extra)
    prompts = [line.strip() for line in PROMPTS.read_text().splitlines() if line.strip()]
    server_args = ["-c", args.ctx_size, "--parallel", str(args.clients), "--queue", str(args.clients)]
    rounds: list[tuple[Phase, Phase]] = []
    cli: list[float] = []
    with ServerProcess(server_args) as server:
        sync = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
        model = sync.models.list().data[0].id
        asyncio.run(run_phase(server.url, model, prompts, 1, 0.1, 8, extra))  # warm up
        for r in range(args.rounds):
            order = [args.clients, 1] if r % 2 == 0 else [1, args.clients]
            phases = {c: asyncio.run(run_phase(server.url, model, prompts, c, args.duration, args.max_tokens, extra)) for c in order}
            cli.append(generate_per_token(prompts[r % len(prompts)], args.max_tokens, args.ctx_size, extra))  # the server idles
            print(f"serve_load: round {r + 1}: {phases[args.clients].tokens_per_s:.1f} tokens/s with {args.clients} clients, "
                  f"{phases[1].tokens_per_s:.1f} with 1; generate {1e3 * cli[-1]:.1f} ms per token", file=sys.stderr)
            rounds.append((phases[args.clients], phases[1]))

    def med(f) -> float:
        return statistics.median(f(x) for x in rows)

    print(f"{args.rounds} rounds of {args.duration:.0f} s per phase, {args.max_tokens} tokens per request, "
          f"extra fields {extra or 'none'}; medians over rounds\n")
    print("| clients | requests | failures | p50 latency s | p95 latency s | p50 TTFT s | p95 TTFT s | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for index in (1, 0):
        rows = [rd[index] for rd in rounds]
        print(f"| {rows[0].clients} | {med(lambda p: len(p.latency_s)):.0f} | {med(lambda p: p.failures):.0f} "
              f"| {med(lambda p: percentile(p.latency_s, 50)):.2f} | {med(lambda p: percentile(p.latency_s, 95)):.2f} "
              f"| {med(lambda p: percentile(p.first_token_s, 50)):.3f} | {med(lambda p: percentile(p.first_token_s, 95)):.3f} "
              f"| {med(lambda p: p.tokens_per_s):.1f} |")
    ratio = statistics.median(c.tokens_per_s / s.tokens_per_s for c, s in rounds)
    one = statistics.median(statistics.median(s.per_token_s) for _, s in rounds)
    gen = statistics.median(cli)
    print(f"\naggregate throughput, {args.clients} concurrent / one at a time: {ratio:.2f}x")
    print(f"per-token time at one request: server {1e3 * one:.1f} ms, generate {1e3 * gen:.1f} ms ({one / gen:.2f}x)")


if __name__ == "__main__":
    main()
