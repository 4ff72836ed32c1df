"""A plugin for simonw's ``llm``: ARGS decoding as llm models.

Registered through this package's ``llm`` entry point. ``args-local`` is the default policy
(or ``$ARGS_LOCAL_MODEL``); ``args-local/NAME`` is each model ``args-local models`` finds.
The reward model is the shipped one unless ``$ARGS_LOCAL_REWARD_MODEL`` names another;
``$ARGS_LOCAL_THREADS`` sets the threads. ``$ARGS_LOCAL_POLICY_URL`` (with
``$ARGS_LOCAL_POLICY_API_KEY``) runs the policy on that server, as ``--policy-url`` does: llm's
options have no place for a model's loading, and a server is set once, like the model; the
model's name then only chooses the GGUF read for the tokenizer (``args-local``: the server's own). Each reply renders the whole conversation llm
keeps (its system message, earlier prompts and replies) in the policy's chat template.

Options (``-o top_k 5``) are the request settings, checked by the same rules as everywhere
else: a pydantic validator hands each value to :meth:`Settings.update`, so llm shows the
settings' own message for a bad one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import llm
from llm.parts import TextPart
from pydantic import Field, ValidationInfo, create_model, field_validator

from .core.defaults import CHAT, ENV_VARS
from .core.errors import SettingsError
from .core.settings import KNOBS, Knob

# Settings llm sets its own way: the system message is llm's -s, and a conversation is
# always rendered in the chat template.
NOT_OPTIONS = ("system", "raw")


def _annotation(knob: Knob) -> Any:
    """The type pydantic coerces ``-o`` text to; the settings check the value after."""
    return (str | list[str]) if knob.kind is tuple else knob.kind


def _check(value: Any, info: ValidationInfo) -> Any:
    if value is not None:
        try:
            CHAT.update({info.field_name: value})
        except SettingsError as e:
            raise ValueError(str(e)) from None
    return value


Options = create_model(
    "Options",
    __base__=llm.Options,
    __validators__={"check_setting": field_validator("*")(_check)},
    **{name: (_annotation(k) | None, Field(default=None, description=k.help)) for name, k in KNOBS.items() if name not in NOT_OPTIONS},
)


class ArgsLocal(llm.Model):
    """One policy under ARGS decoding, loaded on its first prompt and kept for the next."""

    can_stream = True
    Options = Options

    def __init__(self, model_id: str, policy: str | Path | None) -> None:
        self.model_id = model_id
        self.policy = policy
        self._model = None

    def _load(self):
        if self._model is None:
            from .api import load

            threads = os.environ.get(ENV_VARS["threads"])
            if threads is not None and not threads.strip().isdigit():
                raise SettingsError(f"{ENV_VARS['threads']} must be a whole number, not {threads!r}")
            self._model = load(self.policy, os.environ.get(ENV_VARS["reward_model"]) or None, int(threads) if threads else None,
                               policy_url=os.environ.get(ENV_VARS["policy_url"]) or None,
                               policy_api_key=os.environ.get(ENV_VARS["policy_api_key"]) or None)
        return self._model

    def execute(self, prompt: llm.Prompt, stream: bool, response: llm.Response, conversation: llm.Conversation | None) -> Iterator[str]:
        """Stream the reply to the conversation so far; ``prompt.messages`` holds all of it."""
        messages = []
        for message in prompt.messages:
            text = "".join(p.text for p in message.parts if isinstance(p, TextPart))
            if message.role in ("system", "user", "assistant"):
                messages.append({"role": message.role, "content": text})
        settings = CHAT.update({k: v for k, v in prompt.options if v is not None})
        reply = self._load().chat_stream(messages, settings)
        yield from reply
        response.set_usage(input=reply.result.prompt_tokens, output=reply.result.tokens)


@llm.hookimpl
def register_models(register) -> None:
    """``args-local``, and ``args-local/NAME`` for every model found by name (a directory scan)."""
    from .runtime.models import find_models

    register(ArgsLocal("args-local", os.environ.get(ENV_VARS["model"]) or None))
    for found in find_models():
        register(ArgsLocal(f"args-local/{found.name}", found.path), aliases=[f"args-local/{a}" for a in found.aliases])
