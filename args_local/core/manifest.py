"""The reward-model manifest, ``reward.json``: one schema, read by the runtime and written by
``args-local export`` and ``scripts/train_reward.py``.

It says how the text is built (``input``, ``format``, ``template``, ``system_template``), which
output holds the reward and how to read it (``output``, ``index``, ``activation``, ``range``), and
for causal models exported with their KV cache which layout they use (``kv_cache``, see
:mod:`args_local.core.contract`). Unknown keys are kept (``extra``) and written back.

The conversation (:meth:`Manifest.segments`): a ``template`` holds ``{prompt}`` and
``{response}``, and may hold ``{system}``; ``system_template`` is the same conversation with a
system message (a chat template often writes a default one when it is given none, so the two
differ by more than a placeholder), used when there is a system message. A system message and
a template with neither reads it before the prompt, ``system + "\n" + prompt``, as ``--raw``
hands both to the policy. A KV-cached model may read a template too: the text before
``{response}`` is its cache prefix, the text after it ends every candidate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .contract import ACTIVATIONS, KV_LAYOUTS
from .errors import ModelError

FILENAME = "reward.json"
MAX_BYTES = 1 << 20  # a manifest is a few hundred bytes; a larger file is not one
INPUTS = ("token_ids", "text")
FORMATS = ("response", "pair", "template")
REFERENCE_WEIGHT = 1.5  # the ARGS reference code's w, for reward models that suggest none
PLACEHOLDERS = re.compile(r"(\{system\}|\{prompt\}|\{response\})")
Runs = list[tuple[str, bool]]  # (text, is_template): template text may hold control tokens, user text never


@dataclass(frozen=True)
class Manifest:
    """How to build the reward model's input and read its reward."""

    name: str
    input: Literal["token_ids", "text"] = "token_ids"
    format: Literal["response", "pair", "template"] = "response"
    template: str | None = None
    system_template: str | None = None
    kv_cache: Literal["per-row", "shared"] | None = None
    bos_token_id: int | None = None
    pad_token_id: int = 0
    tokenizer_sha256: str | None = None
    output: str | None = None
    index: int = 0
    activation: Literal["none", "sigmoid", "softmax"] = "none"
    range: tuple[float, float] | None = None
    max_length: int = 512
    weight: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: Path | str = FILENAME) -> "Manifest":
        """A checked manifest; ``kv_cache: true`` (folders exported before the layouts had
        names) reads as ``"per-row"`` and ``false`` as none."""
        known = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("name", Path(str(where)).parent.name or "reward-model")
        if values.get("kv_cache") is True:
            values["kv_cache"] = "per-row"
        elif values.get("kv_cache") is False:
            values["kv_cache"] = None
        if values.get("range") is None and values.get("activation") in ("sigmoid", "softmax"):
            values["range"] = (0.0, 1.0)
        m = cls(**values, extra={k: v for k, v in data.items() if k not in known})
        m.check(where)
        if m.range is not None:
            object.__setattr__(m, "range", (float(m.range[0]), float(m.range[1])))
        return m

    def to_dict(self) -> dict[str, Any]:
        """What ``reward.json`` holds: every field that is set, in the schema's order, then extras."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out.update(self.extra)
        return out

    def write(self, folder: Path) -> Path:
        """``folder/reward.json``, checked first: an exporter cannot write what the runtime refuses."""
        self.check(folder / FILENAME)
        path = folder / FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    def segments(self, prompt: str, response: str, system: str | None = None) -> Runs:
        """The conversation in the template, as ``(text, is_template)`` runs (see the module's
        docstring). Each placeholder is filled once, so a prompt that contains ``{response}``
        stays as it was typed."""
        template, values = self._filled(prompt, system)
        return _runs(template, {**values, "{response}": response})

    def around_response(self, prompt: str, system: str | None = None) -> tuple[Runs, Runs]:
        """(before, after): the runs that surround the response (a KV-cached template has one
        ``{response}``, and nothing of the user's after it; see :meth:`check`)."""
        template, values = self._filled(prompt, system)
        before, after = template.split("{response}", 1)
        return _runs(before, values), _runs(after, values)

    def _filled(self, prompt: str, system: str | None) -> tuple[str, dict[str, str]]:
        assert self.template is not None, "only a template format renders a conversation"
        template = self.template
        if system and self.system_template:
            template = self.system_template
        elif system and "{system}" not in template:
            prompt = f"{system}\n{prompt}"
        return template, {"{system}": system or "", "{prompt}": prompt}

    @property
    def suggested_weight(self) -> float:
        """The -w to use when none is given: this model's own suggestion, else the reference's."""
        return self.weight if self.weight is not None else REFERENCE_WEIGHT

    def check(self, where: Path | str) -> None:
        """Every field's type and value; a bad one is a ModelError naming the file and the rule."""
        def bad(what: str) -> ModelError:
            return ModelError(f"{where}: {what}")

        if not isinstance(self.name, str):
            raise bad('"name" must be a string')
        if self.input not in INPUTS:
            raise bad(f'"input" must be one of {", ".join(INPUTS)}, not {self.input!r}')
        if self.format not in FORMATS:
            raise bad(f'"format" must be one of {", ".join(FORMATS)}, not {self.format!r}')
        if self.format == "template" and not (isinstance(self.template, str) and "{response}" in self.template):
            raise bad('"format": "template" needs a "template" containing {response}')
        if self.system_template is not None and not (
            self.format == "template" and isinstance(self.system_template, str) and "{response}" in self.system_template
        ):
            raise bad('"system_template" goes with "format": "template" and must contain {response}')
        if self.activation not in ACTIVATIONS:
            raise bad(f'"activation" must be one of {", ".join(ACTIVATIONS)}')
        if self.kv_cache is not None and self.kv_cache not in KV_LAYOUTS:
            raise bad('"kv_cache" must be false, true or "per-row" (a past per row), or "shared" (one past for all rows)')
        if self.kv_cache and (self.input != "token_ids" or self.format not in ("response", "template")):
            raise bad('"kv_cache" needs "input": "token_ids" and "format": "response" or "template"')
        if self.kv_cache and self.format == "template":
            for key in ("template", "system_template"):
                text = getattr(self, key)
                if text is not None and (text.count("{response}") != 1 or PLACEHOLDERS.search(text.split("{response}")[1])):
                    raise bad(f'a "kv_cache" model\'s "{key}" must hold {{response}} once, with no placeholder after it '
                              "(the text before the response is its cache)")
        for key in ("bos_token_id", "pad_token_id", "index", "max_length"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise bad(f'"{key}" must be an integer')
        if self.max_length < 1:
            raise bad('"max_length" must be at least 1')
        if self.output is not None and not isinstance(self.output, str):
            raise bad('"output" must be the name of an output')
        if self.weight is not None and (isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight)):
            raise bad('"weight" must be a finite number')
        if self.range is not None and not (
            isinstance(self.range, (list, tuple)) and len(self.range) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in self.range)
            and self.range[0] <= self.range[1]
        ):
            raise bad('"range" must be [low, high] with finite low <= high')


def _runs(template: str, values: dict[str, str]) -> Runs:
    """``template`` with its placeholders filled from ``values``, as runs; empty runs are left out."""
    parts = PLACEHOLDERS.split(template)
    runs = [(values[part], False) if i % 2 else (part, True) for i, part in enumerate(parts)]
    return [(text, own) for text, own in runs if text]


def read_manifest(folder: Path) -> Manifest | None:
    """``folder/reward.json``, or None when the folder has none. Only a regular file of bounded
    size is read (a FIFO or a device named reward.json would block or never end)."""
    where = folder / FILENAME
    if not where.exists():
        return None
    if not where.is_file():
        raise ModelError(f"{where} is not a regular file")
    try:
        with where.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise ModelError(f"{where} is larger than {MAX_BYTES // 1024} KiB; a manifest is a small JSON object")
        data = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{where} must hold a JSON object")
    try:
        return Manifest.from_dict(data, where)
    except TypeError as e:
        raise ModelError(f"{where}: {e}") from None
