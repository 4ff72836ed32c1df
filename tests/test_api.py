"""The public Python API on the real default models, against the CLI's own output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import args_local
from conftest import cli

PROMPT = "Tell me about your weekend."


def test_importing_the_package_loads_no_runtime():
    """``import args_local`` loads nothing heavy; reaching ``args_local.load`` loads the numpy
    core, and llama.cpp and onnxruntime wait until a model is loaded."""
    code = (
        "import sys, args_local; heavy = ('numpy', 'llama_cpp', 'onnxruntime'); "
        "print([m for m in heavy if m in sys.modules]); args_local.load; args_local.Settings; "
        "print([m for m in heavy if m in sys.modules])"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.splitlines() == ["[]", "['numpy']"]


@pytest.fixture(scope="module")
def model():
    return args_local.load()


@pytest.mark.slow
def test_defaults_and_text_are_the_clis(model):
    """No settings but the length: the same text as `args-local generate`, under the same
    settings (the reward model's weight among them)."""
    run = cli("generate", PROMPT, "-n", "16", "--json", "-s", "5")  # the defaults sample: the same seed
    assert run.returncode == 0, run.stderr.decode()
    expected = json.loads(run.stdout)
    stream = model.stream(PROMPT, max_tokens=16, seed=5)
    pieces = list(stream)
    assert stream.request.settings.as_dict() == expected["settings"]
    assert stream.request.settings.weight == model.engine.reward.manifest.suggested_weight
    assert "".join(pieces) == stream.result.text == expected["text"]
    assert len(pieces) > 1  # pieces as they are decided, not one string at the end
    result = model.generate(PROMPT, max_tokens=16, seed=5)
    assert result.text == expected["text"] and result.tokens == expected["tokens"] == 16
    assert result.elapsed_s > 0 and result.mean_reward == pytest.approx(expected["mean_reward"], abs=1e-3)


@pytest.mark.slow
def test_keyword_settings_match_the_flags(model):
    run = cli("generate", PROMPT, "-n", "12", "-w", "0", "-k", "5", "-sys", "Answer like a pirate.", "-s", "3")
    assert run.returncode == 0, run.stderr.decode()
    result = model.generate(PROMPT, max_tokens=12, weight=0, top_k=5, system="Answer like a pirate.", seed=3)
    assert result.text + "\n" == run.stdout.decode()
    shared = args_local.api.GENERATE.update(max_tokens=12, weight=0, top_k=5, seed=3)  # a Settings object, then keywords
    assert model.generate(PROMPT, shared, system="Answer like a pirate.").text == result.text


@pytest.mark.slow
def test_chat_renders_messages_in_the_template(model):
    system = "Answer like a pirate."
    single = model.chat([{"role": "system", "content": system}, {"role": "user", "content": PROMPT}], max_tokens=12, weight=0, seed=2)
    assert single.text == model.generate(PROMPT, max_tokens=12, weight=0, system=system, seed=2).text
    history = [
        {"role": "user", "content": "My name is Zanzibar."},
        {"role": "assistant", "content": "Nice to meet you, Zanzibar!"},
        {"role": "user", "content": "What is my name?"},
    ]
    stream = model.chat_stream(history, args_local.Settings(), max_tokens=16, weight=0)  # the paper's greedy: sampling may misspell the name
    assert stream.request.tokens == model.engine.policy.encode_chat(history)
    assert "Zanzibar" in "".join(stream)
    assert stream.request.settings.max_tokens == 16 and stream.request.settings.mode == "greedy" and stream.request.prompt == "What is my name?"
    assert model.chat_stream(history[:1]).request.settings.max_tokens == args_local.api.CHAT.max_tokens


@pytest.mark.slow
@pytest.mark.parametrize("call, error, words", [
    (lambda m: m.generate(PROMPT, top_kk=3), args_local.SettingsError, "unknown setting 'top_kk'"),
    (lambda m: m.generate(PROMPT, top_k=0), args_local.SettingsError, "top-k must be an integer of at least 1"),
    (lambda m: m.stream(PROMPT, mode="fast"), args_local.SettingsError, "mode must be one of greedy, sample"),
    (lambda m: m.chat([{"role": "user", "content": "hi"}], raw=True), args_local.SettingsError, "raw does not apply"),
    (lambda m: m.chat([]), args_local.PromptError, "non-empty list"),
    (lambda m: m.chat([{"role": "robot", "content": "hi"}]), args_local.PromptError, "message 0 must have a role"),
    (lambda m: m.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]), args_local.PromptError, "last message must be the user's"),
    (lambda m: m.generate("  "), args_local.PromptError, "the prompt is empty"),
])
def test_bad_requests_raise_the_settings_errors(model, call, error, words):
    with pytest.raises(error, match=words):
        call(model)


@pytest.mark.slow
def test_load_takes_names_and_checks_options(model_home):
    named = args_local.load(model="smollm2", reward_model=None, threads=1)
    assert named.engine.policy.path.name == "sha256-" + "5e" * 32
    with pytest.raises(args_local.SettingsError, match="ctx_size must be at least"):
        args_local.load(ctx_size=2)
    with pytest.raises(args_local.ModelError, match="no GGUF file or known model is named 'smolm'"):
        args_local.load(model="smolm")
