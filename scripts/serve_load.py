#!/usr/bin/env python
"""A bounded load test of ``args-local serve``: the same requests sent by N concurrent clients
and one after another, on a server this script starts on 127.0.0.1 and stops itself.

Each round takes the next ``--clients`` prompts and sends them twice to the same server:
all at once (one client each), and one after another (one client). Every request is a
streamed chat request for exactly ``--max-tokens`` tokens (``ignore_eos``), so both ways do
the same work; rounds alternate which goes first, and each round also times
``args-local generate`` on one of the prompts while the server idles. The script stops
after ``--rounds`` rounds, or starts no new round once ``--duration`` seconds have passed.

It prints a Markdown table (latency and time to first token percentiles over all requests;
aggregate tokens/s and the server's CPU time per token as medians over rounds; failures),
the throughput ratio (median over rounds of concurrent over one-at-a-time), the CPU-time
ratio, and the per-token time of one request against ``generate``'s.

Usage::

    python scripts/serve_load.py --clients 4 --rounds 7 --max-tokens 48   # Linux (reads /proc)
    python scripts/serve_load.py --extra '{"reward_weight": 0, "top_k": 1}'   # the policy alone
    python scripts/serve_load.py --lanes 1   # one batch for all requests
    python scripts/serve_load.py --clients 2 --policy-url http://127.0.0.1:8080   # on llama-server --parallel 2

With ``--policy-url`` the server and ``generate`` run the policy on that server (start it with
``--parallel`` at least ``--clients``); the CPU time counted is then args-local's only, and
``--policy-pid`` adds the policy server's (a process on this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
class Timings:
    """What one way of sending requests measured, over all rounds."""

    latency_s: list[float] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    per_token_s: list[float] = field(default_factory=list)  # after the first token
    tokens_per_s: list[float] = field(default_factory=list)  # one value per round
    cpu_per_token_s: list[float] = field(default_factory=list)  # the server's CPU time, one value per round
    policy_cpu_per_token_s: list[float] = field(default_factory=list)  # --policy-pid's, one value per round
    failures: int = 0


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str, n: int, extra: dict[str, Any], into: Timings) -> int:
    """Send one streamed request; record its timings and return its tokens (0 when it failed)."""
    start = time.perf_counter()
    first, tokens = None, 0
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=n, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True, **extra},
        )
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except openai.APIError as e:
        print(f"serve_load: request failed: {e}", file=sys.stderr)
    end = time.perf_counter() - start
    if tokens != n or first is None:
        into.failures += 1
        return 0
    into.latency_s.append(end)
    into.first_token_s.append(first)
    into.per_token_s.append((end - first) / (n - 1))
    return tokens


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used, all its threads (Linux /proc). On a machine shared with other
    work, wall-clock throughput follows the share of the cores the server gets; its CPU time per
    token shows the work that batching saves."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def send(server: ServerProcess, model: str, prompts: list[str], together: bool, n: int, extra: dict[str, Any],
               into: Timings, policy_pid: int | None = None) -> None:
    """``prompts`` all at once or one after another; aggregate tokens/s and CPU per token go to ``into``."""
    client = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=600)
    start, cpu = time.perf_counter(), cpu_seconds(server.proc.pid)
    policy_cpu = cpu_seconds(policy_pid) if policy_pid else 0.0
    if together:
        tokens = sum(await asyncio.gather(*(one_request(client, model, p, n, extra, into) for p in prompts)))
    else:
        tokens = sum([await one_request(client, model, p, n, extra, into) for p in prompts])
    into.tokens_per_s.append(tokens / (time.perf_counter() - start))
    into.cpu_per_token_s.append((cpu_seconds(server.proc.pid) - cpu) / max(1, tokens))
    if policy_pid:
        into.policy_cpu_per_token_s.append((cpu_seconds(policy_pid) - policy_cpu) / max(1, tokens))
    await client.close()


def generate_per_token(prompt: str, n: int, models: list[str], extra: dict[str, Any]) -> float:
    """``args-local generate``'s time per token after the first, from its --json report, with the
    requests' reward_weight and top_k."""
    flags = [f for key, flag in (("reward_weight", "-w"), ("top_k", "-k")) if key in extra for f in (flag, str(extra[key]))]
    out = subprocess.run([sys.executable, "-m", "args_local", "generate", "--json", "--ignore-eos", "-n", str(n), *models,
                          *flags, prompt], capture_output=True, check=True, timeout=600)
    report = json.loads(out.stdout)
    return (report["elapsed_s"] - report["first_token_s"]) / (report["tokens"] - 1)


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=900.0, help="start no new round after this many seconds")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--extra", default="{}", help="JSON fields added to every request (reward_weight, top_k...)")
    ap.add_argument("--ctx-size", default="512", help="-c of the server: tokens per request")
    ap.add_argument("--threads", help="-t of the server and of generate [default: theirs]")
    ap.add_argument("--lanes", help="--lanes of the server [default: its own]")
    ap.add_argument("--policy-url", help="--policy-url of the server and of generate: the policy on that server")
    ap.add_argument("--policy-pid", type=int, help="with --policy-url: the policy server's process id, to count its CPU time too")
    args = ap.parse_args()
    models = ["-c", args.ctx_size, *(["-t", args.threads] if args.threads else []),
              *(["--policy-url", args.policy_url] if args.policy_url else [])]
    extra = json.loads(args.extra)
    prompts = [line.strip() for line in PROMPTS.read_text().splitlines() if line.strip()]
    together, alone, cli = Timings(), Timings(), []
    began = time.monotonic()
    lanes = ["--lanes", args.lanes] if args.lanes else []
    with ServerProcess([*models, *lanes, "--parallel", str(args.clients), "--queue", str(args.clients)]) as server:
        model = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0).models.list().data[0].id
        asyncio.run(send(server, model, prompts[:1], False, 8, extra, Timings()))  # warm up
        rounds = 0
        while rounds < args.rounds and time.monotonic() - began < args.duration:
            batch = [prompts[(rounds * args.clients + i) % len(prompts)] for i in range(args.clients)]
            for both in ((True, False) if rounds % 2 == 0 else (False, True)):
                asyncio.run(send(server, model, batch, both, args.max_tokens, extra, together if both else alone, args.policy_pid))
            cli.append(generate_per_token(batch[0], args.max_tokens, models, extra))
            rounds += 1
            print(f"serve_load: round {rounds}: {together.tokens_per_s[-1]:.1f} tokens/s together, "
                  f"{alone.tokens_per_s[-1]:.1f} one after another; generate {1e3 * cli[-1]:.1f} ms per token", file=sys.stderr)

    print(f"{rounds} rounds of {args.clients} requests x {args.max_tokens} tokens, sent together and one after another; "
          f"extra fields: {extra or 'none'}\n")
    print("| requests sent | requests | failures | p50 latency s | p95 latency s | p50 TTFT s | p95 TTFT s "
          "| tokens/s | server CPU ms/token |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, t in (("one after another", alone), (f"{args.clients} together", together)):
        print(f"| {name} | {len(t.latency_s)} | {t.failures} | {percentile(t.latency_s, 50):.2f} | {percentile(t.latency_s, 95):.2f} "
              f"| {percentile(t.first_token_s, 50):.3f} | {percentile(t.first_token_s, 95):.3f} "
              f"| {statistics.median(t.tokens_per_s):.1f} | {1e3 * statistics.median(t.cpu_per_token_s):.1f} |")
    ratio = statistics.median(a / b for a, b in zip(together.tokens_per_s, alone.tokens_per_s))
    work = statistics.median(b / a for a, b in zip(together.cpu_per_token_s, alone.cpu_per_token_s))
    one, gen = statistics.median(alone.per_token_s), statistics.median(cli)
    print(f"\naggregate throughput, {args.clients} together / one after another: {ratio:.2f}x (median of {rounds} rounds)")
    print(f"server CPU time per token, one after another / {args.clients} together: {work:.2f}x")
    if args.policy_pid:
        each = [1e3 * statistics.median(t.policy_cpu_per_token_s) for t in (alone, together)]
        print(f"policy server CPU time per token: {each[0]:.1f} ms one after another, {each[1]:.1f} ms {args.clients} together "
              f"({each[0] / each[1]:.2f}x less)")
    print(f"per-token time of one request: server {1e3 * one:.1f} ms, generate {1e3 * gen:.1f} ms ({one / gen:.2f}x)")


if __name__ == "__main__":
    main()
