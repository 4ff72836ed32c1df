"""Terminal chat: a multi-turn conversation whose KV cache carries over between turns.

The conversation is kept as token ids: each new turn appends the template's text
between the last reply and the next assistant header to the tokens already
evaluated, so the policy's cache reuse (``LlamaPolicy.start``) evaluates only the
new turn, never the history again. When the next turn would not fit the context window,
the oldest exchanges are dropped (the system message stays), and the user is told.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .core.errors import ArgsLocalError, PromptError
from .core.request import Piece, Request, Result
from .core.settings import ALIASES, Settings
from .runtime.engine import Engine
from .runtime.reward import RewardModel

HELP = """Commands:
  /set k N          candidates per token (top-k)
  /set w X          reward weight
  /set mode M       greedy or sample
  /set temp T       sampling temperature (selects mode sample; 0: greedy)
  /set n N          most tokens per reply
  /set NAME VALUE   any other setting: repeat_penalty, top_p, min_p, seed, stop, ...
  /set              show the settings
  /set verbose      toggle per-reply timings and reward on stderr
  /reward PATH      switch to another reward model
  /system TEXT      set the system message (clears the conversation)
  /clear            forget the conversation
  /help             this text
  /bye              leave (Ctrl-D too)
  \"\"\"               start and end a multi-line message
Ctrl-C stops a reply and keeps the conversation."""


def _to_stderr(note: str) -> None:
    sys.stderr.write(f"[{note}]\n")


@dataclass
class ChatSession:
    """The conversation so far, as messages and as the token ids the policy has seen."""

    engine: Engine
    settings: Settings
    verbose: bool = False
    messages: list[dict[str, str]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    rendered: str = ""
    notify: Callable[[str], None] = _to_stderr  # notes for the user (dropped turns), not replies

    def clear(self) -> None:
        self.messages, self.tokens, self.rendered = [], [], ""

    def _all_messages(self) -> list[dict[str, str]]:
        system = self.settings.system
        return ([{"role": "system", "content": system}] if system else []) + self.messages

    def _prompt_tokens(self) -> list[int]:
        """Tokens for the next reply: the known history plus only the new turn's tokens."""
        policy = self.engine.policy
        messages = self._all_messages()
        rendered = policy.render_chat(messages)
        if self.tokens and rendered.startswith(self.rendered):
            tokens = self.tokens + policy.encode_chat(messages, skip_chars=len(self.rendered))
        else:
            tokens = policy.encode_chat(messages)
        self.rendered = rendered
        return tokens

    def _fitted_tokens(self) -> list[int]:
        """The next prompt, leaving room for a reply of ``max_tokens`` (at most half the window).

        When it does not fit, the oldest exchanges (a user message and its reply) are dropped
        until the prompt takes at most half the space left for it: like llama.cpp's context
        shift, half goes at once, so the re-evaluation that a changed history costs comes
        rarely. Only a new message that does not fit the window by itself is an error; it is
        then forgotten and the conversation kept."""
        policy = self.engine.policy
        room = min(self.settings.max_tokens, policy.n_ctx // 2)
        tokens = self._prompt_tokens()
        if len(tokens) + room <= policy.n_ctx:
            return tokens
        alone = len(policy.encode_chat(self._all_messages()[: 1 if self.settings.system else 0] + self.messages[-1:]))
        if alone >= policy.n_ctx:
            self.messages.pop()
            self.tokens, self.rendered = [], ""  # that rendering held the refused message
            raise PromptError(f"this message is {alone} tokens with the system message, more than the "
                              f"{policy.n_ctx}-token context window; shorten it or restart chat with a larger -c")
        dropped = 0
        while len(tokens) > (policy.n_ctx - room) // 2 and len(self.messages) > 1:
            del self.messages[:2]
            dropped += 1
            self.tokens, self.rendered = [], ""  # the history changed: render it anew
            tokens = self._prompt_tokens()
        if dropped:  # else the new message alone leaves less room than max_tokens: a shorter reply
            self.notify(f"dropped the oldest {dropped} exchange{'s' if dropped > 1 else ''} to fit the "
                        f"{policy.n_ctx}-token context; restart chat with a larger -c to keep more")
        return tokens

    def reply(self, text: str, result: Result) -> Iterator[Piece]:
        """Stream the assistant's answer to ``text``; the history keeps what was shown, even
        when the consumer stops early (Ctrl-C)."""
        self.messages.append({"role": "user", "content": text})
        tokens = self._fitted_tokens()
        request = Request(prompt=text, tokens=tokens, settings=self.settings)
        generated: list[int] = []
        try:
            for piece in self.engine.stream(request, result, continues=True):
                generated.append(piece.step.token)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": result.text})
            self.tokens = tokens + generated
            self.rendered += result.text

    def command(self, line: str) -> str | None:
        """Run a /command; returns what to show, or None for /bye."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name == "/bye":
            return None
        if name == "/help":
            return HELP
        if name == "/clear":
            self.clear()
            return "conversation cleared"
        if name == "/system":
            self.settings = self.settings.update(system=arg or None)
            self.clear()
            return f"system message {'set' if arg else 'removed'}; conversation cleared"
        if name == "/reward":
            if not arg:
                return "usage: /reward PATH"
            self.engine.reward = RewardModel(Path(arg).expanduser())
            return f"reward model: {self.engine.reward.manifest.name}"
        if name == "/set":
            return self._set(arg)
        return f"unknown command {name}; /help lists them"

    def _set(self, arg: str) -> str:
        key, _, value = arg.partition(" ")
        if not key:
            return ", ".join(f"{k} = {v!r}" for k, v in self.settings.as_dict().items())
        if key == "verbose":
            self.verbose = not self.verbose
            return f"verbose {'on' if self.verbose else 'off'}"
        if key not in ALIASES:
            return f"/set takes k, w, mode, temp, n, verbose or a setting ({', '.join(sorted(set(ALIASES.values())))}); not {key!r}"
        before = self.settings.mode
        self.settings = self.engine.resolve(self.settings.parse(key, value))  # checked in one place
        shown = f"{key} = {getattr(self.settings, ALIASES[key])}"
        return shown + (f" (mode = {self.settings.mode})" if self.settings.mode != before and key != "mode" else "")


def read_message(prompt: Callable[[str], str], interactive: bool = True) -> str:
    """One user message; \"\"\" opens a block that ends at the next \"\"\" line.
    Prompts are shown only on a terminal, so piped output holds replies alone."""
    line = prompt(">>> " if interactive else "")
    if line.strip() != '"""':
        return line
    lines = []
    while True:
        more = prompt("... " if interactive else "")
        if more.strip() == '"""':
            return "\n".join(lines)
        lines.append(more)


def history_file() -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    return base / "args-local" / "history"


def setup_readline() -> None:
    """Line editing and a history that survives sessions, where readline exists."""
    try:
        import readline
    except ImportError:
        return
    path = history_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            readline.read_history_file(path)
    except OSError:
        return
    readline.set_history_length(1000)
    import atexit

    atexit.register(_save_history, readline, path)


def _save_history(readline, path: Path) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass


def repl(session: ChatSession, out=sys.stdout, err=sys.stderr) -> None:
    """The interactive loop: replies on stdout, notes and timings on stderr."""
    setup_readline()
    err.write("args-local chat: /help for commands, /bye or Ctrl-D to leave\n")
    while True:
        try:
            text = read_message(input, sys.stdin.isatty())
        except KeyboardInterrupt:
            out.write("\n")
            continue
        except EOFError:
            out.write("\n")
            return
        if not text.strip():
            continue
        if text.startswith("/"):
            try:
                shown = session.command(text)
            except (ValueError, ArgsLocalError) as e:
                shown = f"error: {e}"
            if shown is None:
                return
            err.write(shown + "\n")
            continue
        result = Result()
        try:
            for piece in session.reply(text, result):
                out.write(piece.text)
                out.flush()
        except KeyboardInterrupt:
            err.write("\n[reply stopped]")
        except ArgsLocalError as e:
            err.write(f"\nerror: {e}")
        out.write("\n")
        out.flush()
        if result.stop_reason == "context":
            err.write(f"[the reply filled the {session.engine.policy.n_ctx}-token context; "
                      "the next turn drops the oldest exchanges]\n")
        if session.verbose:
            mean = f"{result.mean_reward:.3f}" if result.mean_reward is not None else "n/a"
            tps = result.tokens / result.elapsed_s if result.elapsed_s else 0.0
            err.write(f"[{result.tokens} tokens, {tps:.1f} tokens/s, {result.reward_calls} reward calls, mean reward {mean}, "
                      f"{session.engine.policy.evaluated} tokens evaluated in total]\n")
