"""`args-local bench`: the table and the ratios the speed goals are stated in."""

from __future__ import annotations

import re

import pytest

from args_local.bench import Row, growth
from args_local.runtime.cpus import physical_cores
from conftest import cli


def row(name: str, at32: float, at128: float) -> Row:
    return Row(name, tokens_per_s=1.0, ratio=1.0, reward_calls_per_token=0.0, reward_ms_per_token=0.0,
               ms_per_token_at={32: at32, 128: at128, 512: None})


def test_growth_ratios_use_the_longest_measured_length():
    rows = [row("llama.cpp greedy", 5.0, 6.0), row("args-greedy k=10", 8.0, 10.0), row("args-greedy k=10 full re-scoring", 20.0, 80.0)]
    assert growth(rows) == [
        "per-token time @128 / @32: llama.cpp greedy 1.20x, args-greedy k=10 1.25x, args-greedy k=10 full re-scoring 4.00x",
        "args-greedy k=10 is 8.0x faster per token than full re-scoring @128",
    ]
    assert growth([row("llama.cpp greedy", 5.0, None)]) == []


@pytest.mark.slow
def test_bench_command_prints_every_variant_and_the_ratios(policy_path):
    # -m: the cold start must run the benchmarked policy (a GPU machine may lack the default one)
    run = cli("bench", "-m", str(policy_path), "-n", "130", "--repeats", "1", "--full", timeout=600)
    assert run.returncode == 0, run.stderr.decode()
    out = run.stdout.decode()
    threads = physical_cores()
    names = ["llama.cpp greedy", f"greedy -t {threads}", "args-greedy k=10", "args-sample k=10", "args-greedy k=10 full re-scoring"]
    for name in names + (["greedy -t 1"] if threads > 1 else []):  # a default thread count that misfits shows
        assert f"| {name} |" in out
    assert f"on {threads} thread" in out
    assert re.search(r"per-token time @128 / @32: llama\.cpp greedy \d+\.\d\dx", out)
    assert re.search(r"args-greedy k=10 is \d+\.\dx faster per token than full re-scoring @128", out)
    assert re.search(rf"`args-local generate -m {re.escape(str(policy_path))}`: first token \d+\.\d\d s after launch, peak memory \d+ MB", out)
