"""The server's OpenAI shapes without HTTP or models: request bodies into Settings, results
into responses and stream chunks (fast tier)."""

from __future__ import annotations

import pytest

from args_local.core.errors import SettingsError
from args_local.core.request import Result
from args_local.core.settings import Settings
from args_local.serve.protocol import ApiError, Reply, invalid, parse

DEFAULTS = Settings()
HI = [{"role": "user", "content": "hi"}]


def chat(**body) -> Settings:
    return parse({"messages": HI, **body}, DEFAULTS, chat=True).settings


def test_absent_fields_keep_the_defaults_of_generate():
    assert chat() == DEFAULTS.update(raw=False)
    assert parse({"prompt": "hi"}, DEFAULTS, chat=False).settings == DEFAULTS.update(raw=True)


def test_temperature_zero_is_args_greedy_and_above_zero_args_stochastic():
    assert chat(temperature=0).mode == "greedy"
    sampled = chat(temperature=0.9)
    assert (sampled.mode, sampled.temperature) == ("sample", 0.9)
    assert chat(temperature=None) == chat()


def test_openai_fields_and_extensions_map_onto_settings():
    s = chat(max_tokens=7, top_p=0.5, seed=3, stop="END", presence_penalty=0.5, frequency_penalty=-1,
             top_k=4, reward_weight=2.5, min_p=0.1, repeat_penalty=1.2, ignore_eos=True)
    assert (s.max_tokens, s.top_p, s.seed, s.stop, s.presence_penalty, s.frequency_penalty) == (7, 0.5, 3, ("END",), 0.5, -1.0)
    assert (s.top_k, s.weight, s.min_p, s.repeat_penalty, s.ignore_eos) == (4, 2.5, 0.1, 1.2, True)
    assert chat(max_tokens=7, max_completion_tokens=9).max_tokens == 9  # the newer name wins


@pytest.mark.parametrize("body, param, words", [
    ({"reward_weight": "x"}, "reward_weight", "reward_weight must be a finite number"),
    ({"top_k": 0}, "top_k", "top_k must be an integer of at least 1"),
    ({"temperature": -0.5}, "temperature", "temperature must be a number from 0"),
    ({"max_tokens": 7, "max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens must be"),
    ({"stop": [1]}, "stop", "stop must be a string or a list of strings"),
    ({"n": 3}, "n", "not supported"),
    ({"logprobs": True}, "logprobs", "not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "only the text response_format"),
    ({"stream": "yes"}, "stream", "stream must be true or false"),
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage", "must be true or false"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", "only text parts"),
    ({"model": 5}, "model", "model must be a string"),
])
def test_bad_fields_are_400_naming_the_request_field(body, param, words):
    with pytest.raises(ApiError) as e:
        parse({"messages": HI, **body}, DEFAULTS, chat=True)
    assert e.value.status == 400 and e.value.param == param and words in str(e.value)
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_an_engine_check_names_the_field_as_the_request_spelled_it():
    e = invalid(SettingsError("top_k 99999 is more than the vocabulary (49152)", "top_k"), {"top_k": "top_k"})
    assert (e.param, str(e)) == ("top_k", "top_k 99999 is more than the vocabulary (49152)")
    e = invalid(SettingsError("weight must be a finite number, not nan", "weight"), {"weight": "reward_weight"})
    assert (e.param, str(e)) == ("reward_weight", "reward_weight must be a finite number, not nan")


def test_messages_accept_text_parts_and_the_developer_role():
    call = parse({"messages": [{"role": "developer", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
                 DEFAULTS, chat=True)
    assert call.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ab"}]
    assert parse({"prompt": ["one"]}, DEFAULTS, chat=False).prompt == "one"
    with pytest.raises(ApiError):
        parse({"prompt": [1, 2, 3]}, DEFAULTS, chat=False)


def finished(stop_reason: str) -> Result:
    return Result(text="Hello.", tokens=3, prompt_tokens=5, reward_calls=2, rewards=[0.5, 0.7], stop_reason=stop_reason)


def test_whole_reply_shapes_usage_and_the_args_object():
    settings = DEFAULTS.with_weight(8.0)
    body = Reply("m", chat=True).whole(finished("eog"), settings)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello."}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert body["args"] == {"reward_calls": 2, "mean_reward": pytest.approx(0.6), "reward_weight": 8.0, "top_k": 10}
    text = Reply("m", chat=False).whole(finished("context"), settings)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "Hello."
    assert text["choices"][0]["finish_reason"] == "length"


def test_stream_chunks_carry_usage_only_at_the_end_when_asked():
    reply = Reply("m", chat=True, include_usage=True)
    first, piece = reply.first(), reply.piece("Hel")
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["usage"] is None
    assert piece["choices"][0]["delta"] == {"content": "Hel"} and piece["object"] == "chat.completion.chunk"
    end, usage = reply.last(finished("stop"), DEFAULTS.with_weight(1.0))
    assert end["choices"][0]["finish_reason"] == "stop" and end["choices"][0]["delta"] == {} and "args" in end
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 8
    assert len(Reply("m", chat=False).last(finished("length"), DEFAULTS.with_weight(1.0))) == 1
