"""The Python API: load the models once, then generate, stream and chat with keyword settings.

::

    import args_local

    model = args_local.load()                      # the default policy and reward model
    result = model.generate("Tell me about your weekend.", max_tokens=64)
    print(result.text, result.tokens, result.elapsed_s, result.mean_reward)
    for piece in model.stream("Tell me about your weekend.", top_k=5, weight=4):
        print(piece, end="", flush=True)
    model.chat([{"role": "user", "content": "Hello!"}], max_tokens=64)

Keyword settings are the fields of :class:`~args_local.core.settings.Settings` (or the
short names chat's ``/set`` takes: ``k``, ``w``, ``temp``, ``n``), checked by
:meth:`Settings.update`, so a bad one raises the same :class:`SettingsError` the CLI
reports. Unset ones take the CLI's defaults (:mod:`args_local.core.defaults`), and the
weight is the reward model's suggestion. The command line, the ``llm`` plugin and the
server are built on this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from .core.defaults import CHAT, GENERATE
from .core.request import Request, Result
from .core.settings import Settings

if TYPE_CHECKING:
    from .runtime.engine import Engine


def load(
    model: str | Path | None = None,
    reward_model: str | Path | None = None,
    threads: int | None = None,
    gpu_layers: int = 0,
    ctx_size: int = 4096,
    verbose: bool = False,
    policy_url: str | None = None,
    policy_api: str = "auto",
    policy_api_key: str | None = None,
    policy_timeout: float = 600.0,
) -> "Model":
    """Load a policy and its reward model, as ``-m``, ``-r``, ``-t``, ``-ngl``, ``-c``, ``-v`` and
    the ``--policy-*`` flags do on the command line.

    ``model`` is a GGUF file or a name (``args-local models`` lists them: ollama's, LM
    Studio's, the Hugging Face cache's); None is the bundled SmolLM2-135M-Instruct.
    ``reward_model`` is a reward-model folder or ``.onnx`` file; None is the shipped sentiment
    model. ``threads`` None lets llama.cpp and onnxruntime choose; ``gpu_layers`` -1 offloads
    all layers. ``policy_url`` runs the policy on that server instead (llama.cpp's
    llama-server, vLLM; ``policy_api`` "native", "openai" or "auto"): ``model`` then only names
    the GGUF it serves, read for its tokenizer and chat template (None: the server's own), and
    the reward model still runs here. Raises :class:`~args_local.core.errors.ModelError` for a
    model that cannot be loaded, :class:`~args_local.core.errors.ServerError` for a policy
    server that cannot be used, and :class:`SettingsError` for an option out of range.
    """
    from .runtime.load import ModelOptions, load_engine

    options = ModelOptions(
        model=model,
        reward_model=Path(reward_model) if reward_model is not None else None,
        ctx_size=ctx_size,
        threads=threads,
        gpu_layers=gpu_layers,
        verbose=verbose,
        policy_url=policy_url,
        policy_api=policy_api,
        policy_api_key=policy_api_key,
        policy_timeout=policy_timeout,
    )
    return Model(load_engine(options))


class Stream:
    """One reply's text, piece by piece as it is decided. Iterate it once. ``result`` fills in
    as the pieces come and is complete when the iteration ends; when the consumer stops early
    it holds what was yielded. ``request`` is what was run: the prompt's tokens and the
    settings with the weight filled in."""

    def __init__(self, engine: "Engine", request: Request) -> None:
        self.request = request
        self.result = Result()
        self._pieces = engine.stream(request, self.result)

    def __iter__(self) -> Iterator[str]:
        return (piece.text for piece in self._pieces if piece.text)


class Model:
    """A loaded policy guided by a reward model. Requests run one after another (not from
    several threads at once). ``engine`` is the runtime underneath (policy, reward model)."""

    def __init__(self, engine: "Engine") -> None:
        self.engine = engine

    def stream(self, prompt: str, /, settings: Settings | None = None, **changes: Any) -> Stream:
        """The reply to ``prompt`` as text pieces. ``settings`` (default: the CLI's generate
        defaults) with ``changes`` applied; ``system`` is the system message, ``raw`` skips
        the chat template. The prompt is checked here, before the first piece."""
        request = self.engine.request(prompt, (settings or GENERATE).update(changes))
        return Stream(self.engine, request)

    def generate(self, prompt: str, /, settings: Settings | None = None, **changes: Any) -> Result:
        """The whole reply to ``prompt`` (see :meth:`stream`)."""
        return self.engine.generate(self.engine.request(prompt, (settings or GENERATE).update(changes)))

    def chat_stream(self, messages: Sequence[Mapping[str, Any]], /, settings: Settings | None = None, **changes: Any) -> Stream:
        """The next reply of a conversation, as text pieces. ``messages`` are
        ``{"role": "system" | "user" | "assistant", "content": str}``, the last one the
        user's; their contents are tokenized as plain text, so they cannot forge a turn.
        ``settings`` defaults to the CLI chat's."""
        request = self.engine.chat_request(messages, (settings or CHAT).update(changes))
        return Stream(self.engine, request)

    def chat(self, messages: Sequence[Mapping[str, Any]], /, settings: Settings | None = None, **changes: Any) -> Result:
        """The whole next reply of a conversation (see :meth:`chat_stream`)."""
        return self.engine.generate(self.engine.chat_request(messages, (settings or CHAT).update(changes)))
