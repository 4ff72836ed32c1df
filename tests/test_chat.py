"""`args-local chat` through a pseudo-terminal, and the cache reuse between turns."""

from __future__ import annotations

import os
import sys

import pexpect
import pytest

from args_local.chat import ChatSession
from args_local.core.errors import PromptError
from args_local.core.request import Result
from args_local.core.settings import Settings
from args_local.runtime.engine import Engine
from args_local.runtime.policy import LlamaPolicy

pytestmark = pytest.mark.slow  # real models or the real CLI


def test_second_turn_evaluates_only_the_new_tokens(policy, reward):
    session = ChatSession(Engine(policy, reward), Settings(top_k=4, weight=2.0, max_tokens=16))
    first = Result()
    list(session.reply("Hello! My name is Ann.", first))
    before = policy.evaluated
    history = len(session.tokens)
    second = Result()
    list(session.reply("What is my name?", second))
    evaluated_in_turn_two = policy.evaluated - before
    new_prompt_tokens = second.prompt_tokens - history
    # Only the new user turn (and at most the last reply token) plus the new reply are evaluated.
    assert evaluated_in_turn_two <= new_prompt_tokens + 1 + second.tokens
    assert second.prompt_tokens > history  # the history is in the prompt...
    assert evaluated_in_turn_two < second.prompt_tokens  # ...but was not evaluated again


def test_set_commands_change_the_next_reply_settings(policy, reward):
    session = ChatSession(Engine(policy, reward), Settings(weight=1.5))
    assert session.command("/set k 20") == "k = 20"
    assert session.command("/set w 2.5") == "w = 2.5"
    assert session.command("/set mode sample") == "mode = sample"
    assert session.command("/set temp 0.8") == "temp = 0.8"
    assert session.settings == Settings(top_k=20, weight=2.5, mode="sample", temperature=0.8)
    with pytest.raises(ValueError):
        session.command("/set k 0")
    assert session.command("/bye") is None


def test_set_takes_every_knob(policy, reward):
    session = ChatSession(Engine(policy, reward), Settings(weight=1.5))
    knobs = dict(repeat_penalty=1.3, repeat_last_n=32, presence_penalty=0.4, frequency_penalty=0.2, top_p=0.9, min_p=0.05)
    for name, value in knobs.items():
        assert session.command(f"/set {name} {value}") == f"{name} = {value}"
    assert session.command("/set mode greedy") == "mode = greedy"
    assert session.command("/set temp 0.9") == "temp = 0.9 (mode = sample)"  # a temperature samples
    assert session.command("/set temp 0") == "temp = 0.0 (mode = greedy)"
    with pytest.raises(ValueError, match="repeat-penalty"):
        session.command("/set repeat_penalty 0")
    assert session.settings == Settings(weight=1.5, mode="greedy", temperature=0.0, **knobs)
    result = Result()
    list(session.reply("Say hi.", result))
    assert result.tokens > 0


LONG_TURN = ("Here is what happened to me today, in some detail, because I want your advice on all of it: "
             "the train was late, the coffee machine broke, my manager moved the meeting twice, and then "
             "the printer jammed while I was printing the report that everyone was waiting for. Turn {}.")


def test_chat_outlives_its_context(policy_path):
    """Sixteen long turns in a 1024-token window: the oldest exchanges go, the system message
    stays, the user is told, and no turn fails."""
    small = LlamaPolicy(policy_path, n_ctx=1024)
    notes: list[str] = []
    system = "You are a patient assistant."
    session = ChatSession(Engine(small, None), Settings(weight=0.0, max_tokens=8, system=system), notify=notes.append)
    for turn in range(16):
        result = Result()
        list(session.reply(LONG_TURN.format(turn), result))
        assert result.tokens > 0
        assert result.prompt_tokens + result.tokens <= small.n_ctx
    assert notes and all("to fit the 1024-token context" in n for n in notes)
    assert session.messages[-2]["content"] == LONG_TURN.format(15)  # the newest exchange is kept...
    assert all(m["content"] != LONG_TURN.format(0) for m in session.messages)  # ...the oldest went
    assert small.render_chat(session._all_messages()).startswith(f"<|im_start|>system\n{system}<|im_end|>")

    kept = list(session.messages)
    with pytest.raises(PromptError, match="more than the 1024-token context window"):
        list(session.reply("word " * 1200, Result()))
    assert session.messages == kept  # a message that cannot fit alone is refused, the rest kept
    result = Result()
    list(session.reply("Are you still there?", result))
    assert result.tokens > 0
    small.close()


@pytest.fixture
def chat_process(tmp_path):
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "args_local", "chat", "-n", "24"], env=env, encoding="utf-8", timeout=120)
    child.expect_exact(">>> ")
    yield child
    child.close(force=True)


def test_chat_in_a_terminal(chat_process, tmp_path):
    child = chat_process
    child.sendline("Hi, my name is Ann.")
    child.expect_exact(">>> ")
    first_reply = child.before
    assert len(first_reply.strip()) > len("Hi, my name is Ann.")

    child.sendline("/set verbose")
    child.expect_exact("verbose on")
    child.sendline("/set k 1")
    child.expect_exact("k = 1")
    child.sendline("What is my name?")
    child.expect(r"\[\d+ tokens, [\d.]+ tokens/s, 0 reward calls")  # k = 1: the reward model is not asked
    child.expect_exact(">>> ")

    child.sendline("/set n 400")
    child.expect_exact("n = 400")
    child.sendline("/set k 10")
    child.expect_exact("k = 10")
    child.expect_exact(">>> ")
    child.sendline("Write a very long story about a dragon and a castle.")
    child.expect_exact("castle.")  # the terminal's echo of the line
    child.expect(r"\w+ \w+ \w+ \w+")  # the reply has started streaming
    child.sendintr()  # Ctrl-C
    child.expect_exact("[reply stopped]")
    child.expect_exact(">>> ")
    child.sendline("Thanks!")  # the session is still alive
    child.expect_exact(">>> ")

    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "What is my name?" in (tmp_path / "args-local" / "history").read_text()


def test_ctrl_d_leaves(chat_process):
    chat_process.sendeof()
    chat_process.expect(pexpect.EOF)
    chat_process.close()
    assert chat_process.exitstatus == 0
