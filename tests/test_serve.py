"""`args-local serve` end to end: the real server in a subprocess on 127.0.0.1, the real models,
driven with the official `openai` client."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from args_local.serve.app import MAX_BODY
from args_local.serve.launch import ServerProcess
from conftest import cli

pytestmark = pytest.mark.slow

KEY = "test-key"
CTX = 256
PROMPT = "Tell me about your weekend."
GREEDY = {"temperature": 0, "extra_body": {"reward_weight": 0, "top_k": 1}}


@pytest.fixture(scope="module")
def server():
    """One server for most tests: 4 in parallel in 2 lanes, 256 tokens of context each, an API key."""
    with ServerProcess(["-c", str(CTX), "--parallel", "4", "--lanes", "2", "--queue", "16"], env={"ARGS_LOCAL_API_KEY": KEY}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client) -> str:
    (entry,) = client.models.list().data
    return entry.id


def health(server: ServerProcess) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=10) as r:
        return json.loads(r.read())


def wait_for(server: ServerProcess, timeout: float = 60, **counts: int) -> dict:
    """Poll /health until it shows ``counts`` (active=0, waiting=1...); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        state = health(server)
        if all(state[k] == v for k, v in counts.items()):
            return state
        assert time.monotonic() < deadline, f"/health stayed at {state}, expected {counts}"
        time.sleep(0.05)


def chat(client: openai.OpenAI, model: str, prompt: str = PROMPT, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kw)


def test_health_and_models_list_the_policy(server, model):
    assert health(server)["status"] == "ok"
    assert model == "SmolLM2-135M-Instruct.Q4_1"


def test_chat_reply_has_openai_shape_usage_and_args(client, model):
    r = chat(client, model, max_tokens=16)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 16 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    args = r.model_extra["args"]
    assert args["reward_calls"] > 0 and 0 <= args["mean_reward"] <= 1
    assert args["reward_weight"] == 8.0 and args["top_k"] == 10  # the shipped reward model's w, generate's k


def test_greedy_request_gives_exactly_the_text_of_generate(client, model):
    expected = cli("generate", "-w", "0", "--mode", "greedy", "-n", "40", PROMPT)
    assert expected.returncode == 0, expected.stderr.decode()
    r = chat(client, model, max_tokens=40, **GREEDY)
    assert r.choices[0].message.content == expected.stdout.decode()[:-1]  # generate ends with a newline
    assert r.model_extra["args"]["reward_calls"] == 0


def test_completions_greedy_matches_generate_raw(client, model):
    expected = cli("generate", "--raw", "-w", "0", "--mode", "greedy", "-n", "24", "Once upon a time")
    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=24, **GREEDY)
    assert r.object == "text_completion"
    assert r.choices[0].text == expected.stdout.decode()[:-1]


def test_greedy_text_is_the_same_alone_and_beside_other_requests(client, model):
    """Batching does not change a greedy reply on this CPU build (see the README's Server section)."""
    alone = chat(client, model, max_tokens=48, **GREEDY).choices[0].message.content
    others = ["Describe your neighbour.", "How was the movie you saw yesterday?", "Write a poem about rain."]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        mine = pool.submit(chat, client, model, max_tokens=48, **GREEDY)
        rest = [pool.submit(chat, client, model, p, max_tokens=48, extra_body={"ignore_eos": True}) for p in others]
        assert all(f.result().usage.completion_tokens == 48 for f in rest)
        assert mine.result().choices[0].message.content == alone


def test_requests_spread_over_the_lanes(client, model, server):
    """Four requests at once go two to each lane (each lane decodes on its own thread)."""
    assert health(server)["lanes"] == [0, 0]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(chat, client, model, max_tokens=64, extra_body={"ignore_eos": True}) for _ in range(4)]
        state = wait_for(server, active=4)
        assert state["lanes"] == [2, 2], state
        assert all(f.result().usage.completion_tokens == 64 for f in futures)
    assert health(server)["lanes"] == [0, 0]


def test_streamed_chat_joins_to_the_whole_reply_and_ends_with_usage(client, model):
    whole = chat(client, model, max_tokens=30, **GREEDY)
    chunks = list(chat(client, model, max_tokens=30, stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].model_extra["args"]["reward_calls"] == 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_completion_without_usage(client, model):
    chunks = list(client.completions.create(model=model, prompt="The weather today", max_tokens=12, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len("".join(c.choices[0].text for c in chunks)) > 0


def test_extension_fields_reach_the_search(client, model):
    guided = chat(client, model, max_tokens=20, extra_body={"top_k": 4, "reward_weight": 2.5, "min_p": 0.05,
                                                            "repeat_penalty": 1.1, "ignore_eos": True})
    assert guided.usage.completion_tokens == 20
    args = guided.model_extra["args"]
    assert args["reward_weight"] == 2.5 and args["top_k"] == 4 and args["reward_calls"] > 0
    plain = chat(client, model, max_tokens=20, extra_body={"reward_weight": 0})
    assert plain.model_extra["args"]["reward_calls"] == 0


def test_seeded_sampling_repeats_and_stop_strings_cut(client, model):
    a, b = (chat(client, model, max_tokens=24, temperature=1.2, seed=7).choices[0].message.content for _ in range(2))
    assert a == b
    greedy = chat(client, model, max_tokens=40, **GREEDY).choices[0].message.content
    word = greedy.split()[3]
    cut = chat(client, model, max_tokens=40, stop=[word], **GREEDY).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == greedy[: greedy.index(word)]


def test_max_tokens_is_capped_by_the_context(client, model):
    r = chat(client, model, max_completion_tokens=5000, **{**GREEDY, "extra_body": {**GREEDY["extra_body"], "ignore_eos": True}})
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CTX
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("field, value", [
    ("temperature", -1), ("reward_weight", "lots"), ("top_k", 0), ("max_completion_tokens", 0),
    ("top_p", 1.5), ("n", 2), ("stream", "yes"),
])
def test_invalid_values_are_400_naming_the_field(client, model, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, model, extra_body={field: value})
    assert e.value.status_code == 400
    assert e.value.body["param"] == field and e.value.body["type"] == "invalid_request_error"
    assert field in e.value.body["message"]


@pytest.mark.parametrize("messages", ["not a list", [], [{"role": "tool", "content": "x"}], [{"role": "assistant", "content": "hi"}]])
def test_malformed_conversations_are_400(client, model, messages):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=messages)
    assert e.value.body["param"] == "messages"


def test_prompt_longer_than_the_context_is_400(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, model, "word " * 600)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"


def test_wrong_key_is_401(server, model):
    bad = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        chat(bad, model)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"


def test_unknown_model_and_path_are_404(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "gpt-4o")
    assert e.value.body["code"] == "model_not_found"
    request = urllib.request.Request(f"{server.url}/embeddings", data=b"{}", headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 404 and json.loads(e.value.read())["error"]["code"] == "not_found"


def test_oversized_body_is_413(client, model):
    with pytest.raises(openai.APIStatusError) as e:
        chat(client, model, "x" * (MAX_BODY + 1))
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"


def test_bad_requests_do_not_disturb_a_running_one(client, model, server):
    expected = chat(client, model, max_tokens=40, **GREEDY).choices[0].message.content
    stream = chat(client, model, max_tokens=40, stream=True, **GREEDY)
    text = [next(stream).choices[0].delta.content or ""]
    for field, value in (("top_k", -3), ("messages", "not a list")):
        with pytest.raises(openai.BadRequestError):
            chat(client, model, extra_body={field: value})
    with pytest.raises(openai.NotFoundError):
        chat(client, "no-such-model")
    text += [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(text) == expected


@pytest.fixture(scope="module")
def lone_server():
    """One sequence, one place in the queue, room for long replies."""
    with ServerProcess(["-c", "2048", "--parallel", "1", "--queue", "1"]) as s:
        yield s


@pytest.fixture(scope="module")
def lone(lone_server, model) -> openai.OpenAI:
    return openai.OpenAI(base_url=lone_server.url, api_key="none", max_retries=0, timeout=120)


def test_client_that_leaves_mid_stream_cancels_its_generation(lone, lone_server, model):
    stream = chat(lone, model, max_tokens=2000, stream=True, **{**GREEDY, "extra_body": {**GREEDY["extra_body"], "ignore_eos": True}})
    for _, chunk in zip(range(5), stream):
        pass
    assert health(lone_server)["active"] == 1
    left = time.monotonic()
    stream.close()
    wait_for(lone_server, timeout=30, active=0)
    # Nearly 2000 tokens were left (well over 10 s of decoding here); the sequence was freed at once.
    assert time.monotonic() - left < 5


def test_client_that_leaves_before_a_whole_reply_cancels_it(lone_server, model):
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2000, "ignore_eos": True,
            "temperature": 0, "reward_weight": 0, "top_k": 1}
    request = urllib.request.Request(f"{lone_server.url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(TimeoutError):  # urllib gives up and closes the connection
        urllib.request.urlopen(request, timeout=2)
    left = time.monotonic()
    wait_for(lone_server, timeout=30, active=0)
    assert time.monotonic() - left < 5


def test_full_queue_is_429_with_retry_after(lone, lone_server, model):
    long = {"max_tokens": 1000, "stream": True, "extra_body": {"ignore_eos": True}}
    running = chat(lone, model, **long)
    wait_for(lone_server, active=1, waiting=0)
    queued = chat(lone, model, **long)
    wait_for(lone_server, active=1, waiting=1)
    with pytest.raises(openai.RateLimitError) as e:
        chat(lone, model, max_tokens=4)
    assert e.value.status_code == 429 and int(e.value.response.headers["Retry-After"]) >= 1
    assert e.value.body["code"] == "rate_limit_exceeded"
    queued.close()
    running.close()
    wait_for(lone_server, timeout=30, active=0, waiting=0)
    assert chat(lone, model, max_tokens=4).usage.completion_tokens >= 1


def test_a_port_in_use_is_one_sentence_and_exit_1(server):
    run = cli("serve", "--port", str(server.port), "-c", "64", timeout=120)
    assert run.returncode == 1
    assert f"cannot listen on 127.0.0.1:{server.port}" in run.stderr.decode() and b"Traceback" not in run.stderr


def test_a_server_that_cannot_start_says_why(tmp_path):
    with pytest.raises(RuntimeError, match="policy model not found"):
        ServerProcess(["-m", str(tmp_path / "missing.gguf")], timeout=60)


def test_a_kv_cache_beyond_memory_is_refused_before_allocating():
    run = cli("serve", "--port", "0", "-c", "131072", "--parallel", "256", timeout=120)
    assert run.returncode == 2, run.stderr.decode()
    err = run.stderr.decode()
    assert "for each of 256 parallel requests" in err and b"Traceback" not in run.stderr
