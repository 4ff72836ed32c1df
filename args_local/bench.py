"""Speed of ARGS against plain greedy decoding of the same policy, in the same process.

Variants run in alternation (greedy, ARGS, greedy, ARGS...) so that the machine's
noise hits all of them alike; the table reports medians over the repeats.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .core.errors import ArgsLocalError
from .core.request import Request, Result
from .core.settings import Settings
from .runtime.engine import Engine

LENGTHS = (32, 128, 512)


@dataclass(frozen=True)
class Variant:
    """A way to decode; ``settings`` None is llama.cpp's own greedy loop (Llama.generate).
    ``threads`` None runs the policy at the thread count it was loaded with. ``remote_of``
    names the in-process variant this one repeats with the policy on a server (--policy-url)."""

    name: str
    settings: Settings | None
    threads: int | None = None
    remote_of: str | None = None

    @property
    def remote(self) -> bool:
        return self.remote_of is not None


@dataclass
class Timing:
    """One run: total throughput, the wall time of every step and, with a remote policy,
    the seconds spent in its HTTP round trips and computing on the server."""

    result: Result
    step_s: list[float] = field(default_factory=list)
    http_s: float = 0.0
    server_s: float = 0.0


def variants(args: Settings, full: bool, threads: int, remote: bool = False) -> list[Variant]:
    """llama.cpp's own greedy decoding first (the reference for the ratios), then greedy
    through args-local's loop (its overhead) at 1 thread and at the policy's ``threads``, so
    that a default thread count that does not fit the machine shows, then the ARGS variants
    of ``args``; with a ``remote`` policy, greedy and ARGS-greedy through it too."""
    k = args.top_k
    greedy = args.update(top_k=1, weight=0.0, mode="greedy")
    out = [
        Variant("llama.cpp greedy", None),
        *([Variant("greedy -t 1", greedy, threads=1)] if threads != 1 else []),
        Variant(f"greedy -t {threads}", greedy),
        Variant(f"args-greedy k={k}", args.update(mode="greedy")),
        Variant(f"args-sample k={k}", args.update(mode="sample", seed=0)),
    ]
    if full:
        out.append(Variant(f"args-greedy k={k} full re-scoring", args.update(use_cache=False)))
    if remote:
        out += [Variant("remote greedy", greedy, remote_of=f"greedy -t {threads}"),
                Variant(f"remote args-greedy k={k}", args.update(mode="greedy"), remote_of=f"args-greedy k={k}")]
    return out


def time_run(engine: Engine, tokens: list[int], prompt: str, variant: Variant, n: int) -> Timing:
    if variant.settings is None:
        return time_llama_cpp(engine, tokens, n)
    request = Request(prompt, tokens, variant.settings.update(max_tokens=n, ignore_eos=True))
    timing = Timing(Result())
    trips = getattr(engine.policy, "trips", None)  # a remote policy's HTTP round trips
    before = (trips.seconds, trips.server_seconds) if trips else (0.0, 0.0)
    switch = variant.threads is not None
    loaded = engine.policy.threads if switch else None
    if switch:
        engine.policy.set_threads(variant.threads)
    try:
        last = time.perf_counter()
        for _ in engine.stream(request, timing.result):
            now = time.perf_counter()
            timing.step_s.append(now - last)
            last = now
    finally:
        if switch:
            engine.policy.set_threads(loaded)
    if trips:
        timing.http_s, timing.server_s = trips.seconds - before[0], trips.server_seconds - before[1]
    return timing


def time_llama_cpp(engine: Engine, tokens: list[int], n: int) -> Timing:
    """n tokens of llama-cpp-python's own greedy sampler on the same context, EOS ignored."""
    timing = Timing(Result(prompt_tokens=len(tokens)))
    engine.policy.forget_prompt()  # llama.cpp's own loop rewrites the cache behind the policy's back
    start = last = time.perf_counter()
    for _ in engine.policy.llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0):
        now = time.perf_counter()
        timing.step_s.append(now - last)
        last = now
        if len(timing.step_s) == n:
            break
    timing.result.tokens = n
    timing.result.elapsed_s = time.perf_counter() - start
    return timing


def per_token_at(step_s: list[float], length: int, window: int = 16) -> float | None:
    """Mean step time over the ``window`` steps that end at response length ``length``."""
    if len(step_s) < length:
        return None
    return statistics.fmean(step_s[length - window : length])


@dataclass
class Row:
    name: str
    tokens_per_s: float
    ratio: float
    reward_calls_per_token: float
    reward_ms_per_token: float
    ms_per_token_at: dict[int, float | None]
    models: dict[str, tuple[float | None, float]] = field(default_factory=dict)  # name: (mean reward, calls/token)
    remote_of: str | None = None  # remote rows: the in-process row they repeat
    http_ms_per_token: float | None = None  # remote rows: HTTP round trips to the policy server
    server_ms_per_token: float | None = None  # remote rows: of those, the server's own compute


def bench(engine: Engine, prompt: str, variant_list: list[Variant], n: int, repeats: int, progress=None,
          remote: Engine | None = None) -> list[Row]:
    """Medians over ``repeats`` alternating rounds of every variant; the ``remote`` ones run
    on ``remote`` (the same reward model, the policy on a server)."""
    engines = {False: engine, True: remote}
    tokens = {flag: e.encode(prompt) for flag, e in engines.items() if e is not None}
    runs: dict[str, list[Timing]] = {v.name: [] for v in variant_list}
    for v in {v.remote: v for v in reversed(variant_list)}.values():  # warm-up (each engine's first variant)
        time_run(engines[v.remote], tokens[v.remote], prompt, v, 8)
    for r in range(repeats):
        for v in variant_list:
            if progress:
                progress(f"round {r + 1}/{repeats}: {v.name}")
            runs[v.name].append(time_run(engines[v.remote], tokens[v.remote], prompt, v, n))
    rows = []
    base = None
    for v in variant_list:
        timings = runs[v.name]
        tps = statistics.median(t.result.tokens / t.result.elapsed_s for t in timings)
        base = base or tps
        rows.append(Row(
            name=v.name,
            tokens_per_s=tps,
            ratio=tps / base,
            reward_calls_per_token=statistics.median(t.result.reward_calls / t.result.tokens for t in timings),
            reward_ms_per_token=statistics.median(1000 * t.result.reward_s / t.result.tokens for t in timings),
            ms_per_token_at={
                L: (statistics.median(x for x in (per_token_at(t.step_s, L) for t in timings)) * 1000 if n >= L else None)
                for L in LENGTHS
            },
            models={m.name: (_median_or_none([t.result.models[j].mean_reward for t in timings]),
                             statistics.median(t.result.models[j].cost.calls / t.result.tokens for t in timings))
                    for j, m in enumerate(timings[0].result.models)},
            remote_of=v.remote_of,
            http_ms_per_token=statistics.median(1000 * t.http_s / t.result.tokens for t in timings) if v.remote else None,
            server_ms_per_token=statistics.median(1000 * t.server_s / t.result.tokens for t in timings) if v.remote else None,
        ))
    return rows


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def per_model(rows: list[Row]) -> list[str]:
    """Each reward model's median mean reward and calls per token, per ARGS variant (several -r)."""
    lines = []
    for r in rows:
        if len(r.models) > 1:
            parts = [f"{name} mean reward {'n/a' if mean is None else f'{mean:.3f}'}, {calls:.2f} calls/token"
                     for name, (mean, calls) in r.models.items()]
            lines.append(f"{r.name}: " + "; ".join(parts))
    return lines


def cold_start(args: list[str]) -> tuple[float, float]:
    """Seconds from launching ``args-local generate`` to its first byte of text, and the
    child's peak memory in MB as it reports it (-v): what a user waits for and pays on the
    default models. (A parent's view of a child's peak includes the parent's own memory.)"""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "args_local", "generate", "-v", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(1)
    first = time.perf_counter() - start
    proc.stdout.read()
    err = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0:
        raise ArgsLocalError(f"args-local generate {' '.join(args)} failed with exit code {proc.returncode}")
    found = re.search(r"peak memory (\d+) MB", err)
    if not found:
        raise ArgsLocalError("args-local generate -v did not report its peak memory")
    return first, float(found.group(1))


def growth(rows: list[Row]) -> list[str]:
    """The ratios the speed goals are stated in: each variant's per-token time at the longest
    measured length over its time at the shortest, and cached ARGS over full re-scoring there."""
    lengths = [L for L in LENGTHS if rows[0].ms_per_token_at[L] is not None]
    if len(lengths) < 2:
        return []
    first, last = lengths[0], lengths[-1]
    lines = [f"per-token time @{last} / @{first}: " + ", ".join(f"{r.name} {r.ms_per_token_at[last] / r.ms_per_token_at[first]:.2f}x" for r in rows)]
    full = [r for r in rows if r.name.endswith("full re-scoring")]
    cached = next((r for r in rows if r.name.startswith("args-greedy")), None)
    if full and cached:
        lines.append(f"{cached.name} is {full[0].ms_per_token_at[last] / cached.ms_per_token_at[last]:.1f}x faster per token than full re-scoring @{last}")
    return lines


def remote_note(rows: list[Row]) -> list[str]:
    """Remote rows against the in-process rows they repeat, and where a remote token's time goes."""
    by_name = {r.name: r for r in rows}
    out = []
    for r in rows:
        if r.remote_of is None or r.http_ms_per_token is None:
            continue
        local = by_name.get(r.remote_of)
        if local:
            out.append(f"{r.name} keeps {r.tokens_per_s / local.tokens_per_s:.2f}x of in-process {local.name} throughput")
        ms = 1000 / r.tokens_per_s
        server = r.server_ms_per_token or 0.0
        out.append(
            f"{r.name}, per token: {ms:.1f} ms = {r.http_ms_per_token:.1f} ms HTTP round trip to the policy server "
            f"({server:.1f} ms computing there, {r.http_ms_per_token - server:.1f} ms transport, JSON and waiting) "
            f"+ {r.reward_ms_per_token:.1f} ms reward model + {ms - r.http_ms_per_token - r.reward_ms_per_token:.1f} ms the rest"
        )
    return out


def table(rows: list[Row]) -> str:
    """The results as a Markdown table."""
    head = "| variant | tokens/s | x llama.cpp greedy | reward calls/token | reward ms/token | " + " | ".join(f"ms/token @{L}" for L in LENGTHS) + " |"
    sep = "|" + "---|" * (5 + len(LENGTHS))
    lines = [head, sep]
    for r in rows:
        at = " | ".join(f"{r.ms_per_token_at[L]:.1f}" if r.ms_per_token_at[L] is not None else "-" for L in LENGTHS)
        lines.append(
            f"| {r.name} | {r.tokens_per_s:.1f} | {r.ratio:.2f} | {r.reward_calls_per_token:.2f} | {r.reward_ms_per_token:.2f} | {at} |"
        )
    return "\n".join(lines)
