"""ARGS decoding end to end on the real default models (SmolLM2 GGUF + the shipped ONNX reward)."""

from __future__ import annotations

import json

import llama_cpp
import numpy as np
import pytest

from args_local.core.request import Request, Result
from args_local.core.settings import Settings
from args_local.runtime.engine import Engine
from conftest import cli

pytestmark = pytest.mark.slow  # real models or the real CLI

PROMPTS = ["Tell me about your weekend.", "How was the movie you saw yesterday?", "Describe your neighbour."]


def decode(engine: Engine, prompt: str, n: int = 24, **config) -> tuple[list[int], Result]:
    request = Request(prompt=prompt, tokens=engine.encode(prompt), settings=Settings(**config, max_tokens=n))
    result = Result()
    tokens = [p.step.token for p in engine.stream(request, result)]
    return tokens, result


def llama_greedy(policy_path, tokens: list[int], n: int) -> list[int]:
    """llama.cpp's own greedy decoding (its greedy sampler), in a separate Llama."""
    llm = llama_cpp.Llama(str(policy_path), n_ctx=2048, verbose=False)
    out = []
    for t in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t) or len(out) == n:
            break
        out.append(t)
    llm.close()
    return out


def test_weight_zero_and_k_one_reproduce_llama_cpp_greedy(policy, reward, policy_path):
    engine = Engine(policy, reward)
    prompt_tokens = engine.encode(PROMPTS[0])
    expected = llama_greedy(policy_path, prompt_tokens, 32)
    assert decode(engine, PROMPTS[0], 32, weight=0.0)[0] == expected
    assert decode(engine, PROMPTS[0], 32, top_k=1, weight=5.0)[0] == expected


def test_chat_template_wraps_the_prompt_and_raw_does_not(policy):
    engine = Engine(policy, None)
    rendered = policy.render_chat(engine.messages("Hi there", "Be brief."))
    assert "<|im_start|>system\nBe brief.<|im_end|>" in rendered
    assert rendered.rstrip().endswith("<|im_start|>assistant")
    templated = engine.encode("Hi there", "Be brief.")
    assert templated == policy.tokenize(rendered, special=True)
    assert engine.encode("Hi there", raw=True) == policy.tokenize("Hi there", special=False)


def test_args_raises_the_reward_of_responses(policy, reward):
    """Default ARGS against -w 0 on everyday prompts, judged by the guiding reward model."""
    engine = Engine(policy, reward)
    guided, plain = [], []
    for prompt in PROMPTS:
        for weight, bucket in ((reward.manifest.weight, guided), (0.0, plain)):
            tokens, result = decode(engine, prompt, 32, weight=weight)
            bucket.append(reward.score_texts([prompt], [result.text])[0])
    assert np.mean(guided) > np.mean(plain) + 0.1


def test_kv_cached_scoring_picks_the_same_tokens_as_full_rescoring(policy, reward):
    engine = Engine(policy, reward)
    config = Settings(top_k=10, weight=5.0, max_tokens=40)
    runs = []
    for use_cache in (True, False):
        request = Request(prompt=PROMPTS[1], tokens=engine.encode(PROMPTS[1]), settings=config.update(use_cache=use_cache))
        steps = [p.step for p in engine.stream(request, Result())]
        runs.append(steps)
    cached, full = runs
    assert [s.token for s in cached] == [s.token for s in full]
    both = [(a.reward, b.reward) for a, b in zip(cached, full) if a.reward is not None]
    assert both and np.allclose([a for a, _ in both], [b for _, b in both], atol=1e-2)  # 8-bit kernels: batch shape moves a reward by up to ~6e-3


@pytest.mark.parametrize("bridge", [False, True])
def test_cached_scorer_matches_full_scores_step_by_step(policy, reward, bridge):
    """Shared vocabulary (ids straight from the policy) and bridged through text (the
    reward tokenizer re-reads the response): the cache must not change a reward. The response
    is longer than the cache's first allocation (64 tokens), so the cache also grows."""
    from args_local.runtime.caches import CachedScorer, CausalFullScorer, Sequences

    text = " I really enjoyed the sunny walk, thanks for asking! 👋 Ok." * 5
    response = policy.tokenize(text, special=False)
    assert len(response) > 64
    cached = CachedScorer(reward, Sequences(reward, policy.token_bytes, bridge))
    full = CausalFullScorer(reward, Sequences(reward, policy.token_bytes, bridge))
    candidates = [10, 500, 3000, 12000, 40000]
    for i, token in enumerate(response):
        if i % 3 != 2:  # every third step unscored: the catch-up path
            assert np.allclose(cached.score(candidates + [token]), full.score(candidates + [token]), atol=1e-2)  # 8-bit kernels: batch shape moves a reward by up to ~6e-3
        cached.advance(token)
        full.advance(token)
    assert reward.stats.calls > 0


def test_reward_model_scores_sentiment_sensibly(reward):
    pos, neg = reward.score_texts(["", ""], ["I love this, it was a wonderful day!", "I hate this, it was an awful day."])
    assert pos > 0.7 and neg < 0.3


def test_string_input_reward_model(hatesonar_reward, policy):
    from args_local.runtime.reward import RewardModel

    model = RewardModel(hatesonar_reward)
    clean, rude = model.score_texts(["", ""], ["Thank you, that is very kind.", "shut up you stupid bitch"])
    assert clean > rude
    engine = Engine(policy, model)
    tokens, result = decode(engine, PROMPTS[0], 12, weight=2.0)
    assert result.tokens == 12 and result.reward_calls > 0 and result.text


def test_generate_streams_text_on_the_defaults():
    run = cli("generate", "Tell me about your weekend.", "-n", "24")
    assert run.returncode == 0, run.stderr.decode()
    assert len(run.stdout.decode().strip()) > 10
    assert run.stderr.decode() == ""  # no llama.cpp or onnxruntime chatter


def test_generate_json_from_stdin():
    run = cli("generate", "--json", "-n", "16", "-k", "5", "--seed", "3", stdin="What is your favourite food?".encode())
    assert run.returncode == 0, run.stderr.decode()
    out = json.loads(run.stdout)
    assert out["prompt"] == "What is your favourite food?"
    assert out["tokens"] == 16 or out["stop_reason"] == "eog"
    assert out["text"] and out["elapsed_s"] > 0 and out["reward_calls"] > 0
    assert out["settings"]["top_k"] == 5 and out["settings"]["seed"] == 3


def test_sampling_with_a_seed_repeats_exactly():
    args = ("generate", "Say something nice.", "-n", "20", "--mode", "sample", "--seed", "11", "--json")
    a, b = cli(*args), cli(*args)
    assert a.returncode == 0, a.stderr.decode()
    assert json.loads(a.stdout)["text"] == json.loads(b.stdout)["text"]


def test_stop_string_ends_the_reply():
    run = cli("generate", "Count from 1 to 20, separated by commas.", "-n", "80", "--stop", "5", "--json", "-w", "0", "--paper")  # greedy: the count is certain to reach 5
    out = json.loads(run.stdout)
    assert "5" not in out["text"] and out["stop_reason"] == "stop"


def test_missing_model_file_is_a_clear_error(tmp_path):
    run = cli("generate", "hi", "-m", str(tmp_path / "nope.gguf"))
    assert run.returncode == 1
    assert "policy model not found" in run.stderr.decode()
    assert "Traceback" not in run.stderr.decode()


def generate_json(*flags: str, prompt: str = "Write three sentences about the sea.") -> tuple[dict, str]:
    run = cli("generate", prompt, "--json", *flags)
    assert run.returncode == 0, run.stderr.decode()
    return json.loads(run.stdout), run.stderr.decode()


def test_the_loop_knobs_reach_the_search_from_the_flags():
    knobs = {"--repeat-penalty": 1.5, "--repeat-last-n": 16, "--presence-penalty": 1.0, "--frequency-penalty": 0.5,
             "--top-p": 0.8, "--min-p": 0.1}
    flags = [str(x) for kv in knobs.items() for x in kv]
    tuned, _ = generate_json("--paper", "-w", "0", "-n", "40", *flags)
    plain, _ = generate_json("--paper", "-w", "0", "-n", "40")
    settings = tuned["settings"]
    assert (settings["repeat_penalty"], settings["repeat_last_n"], settings["presence_penalty"],
            settings["frequency_penalty"], settings["top_p"], settings["min_p"]) == tuple(knobs.values())
    assert tuned["text"] != plain["text"]  # greedy with penalties is another text


def test_paper_preset_is_the_paper_s_args_greedy():
    out, _ = generate_json("--paper", "-n", "8")
    s = out["settings"]
    assert (s["mode"], s["repeat_penalty"], s["presence_penalty"], s["frequency_penalty"], s["top_p"], s["min_p"]) == (
        "greedy", 1.0, 0.0, 0.0, 1.0, 0.0)
    again, _ = generate_json("--paper", "-n", "8")
    assert again["text"] == out["text"]  # greedy: reproducible
    moved, _ = generate_json("--paper", "-n", "8", "--repeat-penalty", "1.2")
    assert moved["settings"]["repeat_penalty"] == 1.2  # flags given still apply


def test_short_flags_as_llama_cpp_spells_them():
    out, _ = generate_json("-s", "42", "-sys", "Answer in one word.", "-n", "4")
    assert out["settings"]["seed"] == 42  # -s is the seed, as in llama.cpp
    assert out["settings"]["system"] == "Answer in one word."
    sampled = [generate_json(flag, "7", "--temp", "0.9", "-n", "12")[0]["text"] for flag in ("-s", "--seed")]
    assert sampled[0] == sampled[1]


def test_a_temperature_that_changes_the_mode_says_so():
    from args_local.cli import GENERATE

    temp, mode = ("0", "greedy") if GENERATE.mode == "sample" else ("0.9", "sample")
    out, err = generate_json("--temp", temp, "-n", "4")
    assert out["settings"]["mode"] == mode
    assert f"--temp {temp} selects --mode {mode}" in err
