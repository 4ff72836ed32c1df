"""What one request can set, checked in one place.

Every front end turns its own input into a :class:`Settings`: the CLI its flags, chat its
``/set`` lines, batch its JSONL rows, eval its plan, the server its HTTP bodies and the
Python API its keywords. :meth:`Settings.update` takes loose values (JSON, keywords),
:meth:`Settings.parse` takes text (``/set k 20``); both end in the same checks, so a bad
value gets the same one sentence wherever it came from. :data:`KNOBS` describes every
field once: its type, its bounds, its help text and the short names users type.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Mapping

from .errors import SettingsError
from .text import text_problem

Mode = Literal["greedy", "sample"]
MODES: tuple[str, ...] = ("greedy", "sample")
MAX_SEED = 2**32 - 1  # llama.cpp's seed is a uint32_t
_SHOWN = reprlib.Repr()  # a bad value, shown in its error message: bounded in length and depth
_SHOWN.maxstring = _SHOWN.maxother = 40


@dataclass(frozen=True)
class Knob:
    """One setting: how it is typed, bounded and explained."""

    name: str
    kind: type  # int, float, str, bool, or tuple (stop strings)
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False  # None is allowed (and means "the default of whoever runs it")
    aliases: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """The name as users read it in messages (top-k, max-tokens)."""
        return self.name.replace("_", "-")

    def describe(self) -> str:
        """What a valid value looks like, for error messages."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return "true or false"
        if self.kind is tuple:
            return "a string or a list of strings"
        if self.kind is str:
            return "a string"
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return f"{what} from {self.low:g}{' (exclusive)' if self.low_open else ''} to {self.high:g}"
        if self.low is not None:
            return f"{what} {'above' if self.low_open else 'of at least'} {self.low:g}"
        return f"a finite {what[3:] if what.startswith('an ') else what[2:]}"


KNOBS: dict[str, Knob] = {k.name: k for k in (
    Knob("top_k", int, "candidates the reward model scores per token", 1, aliases=("k",)),
    Knob("weight", float, "reward weight w in logit + w * reward [default: the reward model's]", optional=True, aliases=("w",)),
    Knob("mode", str, "greedy: argmax of the ARGS score; sample: draw from softmax(score / temp)", choices=MODES),
    Knob("temperature", float, "sampling temperature: setting it selects --mode sample, and 0 --mode greedy, as in llama.cpp", 0, 100, aliases=("temp",)),
    Knob("top_p", float, "keep the policy's most likely candidates whose probability adds up to p (1: off)", 0, 1, low_open=True),
    Knob("min_p", float, "drop candidates less likely than min-p times the most likely one (0: off)", 0, 1),
    Knob("repeat_penalty", float, "divide the logits of tokens seen in the last repeat-last-n tokens by this (1: off)", 0, 10, low_open=True),
    Knob("repeat_last_n", int, "how many last tokens the penalties look at (0: none)", 0, 1 << 20),
    Knob("presence_penalty", float, "subtract this from the logit of every token seen in that window (0: off)", -2, 2),
    Knob("frequency_penalty", float, "subtract this times its count from the logit of a token seen in that window (0: off)", -2, 2),
    Knob("seed", int, "random seed, for repeatable sampling (-1: random)", -1, MAX_SEED, optional=True),
    Knob("max_tokens", int, "most tokens to generate", 1, aliases=("n",)),
    Knob("stop", tuple, "stop when this string appears"),
    Knob("system", str, "system message for the chat template", optional=True),
    Knob("raw", bool, "send the prompt as it is, without the chat template"),
    Knob("ignore_eos", bool, "always generate max_tokens tokens (benchmarks)"),
    Knob("use_cache", bool, "score candidates against the reward model's KV cache (false: full re-scoring)"),
)}
ALIASES: dict[str, str] = {a: k.name for k in KNOBS.values() for a in (k.name, *k.aliases)}
# The knobs that keep replies from looping (and eval applies to every method alike).
LOOP_KNOBS: tuple[str, ...] = ("min_p", "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty")
# The ARGS paper's decoding: greedy on the raw logits, nothing penalised or truncated (the
# field defaults of Settings). One flag (--paper) away from the user's defaults, so that its
# results stay reproducible.
PAPER: Mapping[str, Any] = MappingProxyType({
    "mode": "greedy", "min_p": 0.0, "top_p": 1.0, "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
})


@dataclass(frozen=True)
class Settings:
    """Everything a request can set. Frozen: change it with :meth:`update` or :meth:`parse`,
    which check the new values. ``weight`` None means the reward model's own suggestion, filled
    in by the engine (:meth:`with_weight`). The field defaults are the ARGS paper's decoding
    (:data:`PAPER`: greedy, nothing penalised); what a user gets by default is
    :mod:`args_local.core.defaults`, measured against it."""

    top_k: int = 10
    weight: float | None = None
    mode: Mode = "greedy"
    temperature: float = 0.7
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    system: str | None = None
    raw: bool = False
    ignore_eos: bool = False
    use_cache: bool = True

    def __post_init__(self) -> None:
        for knob in KNOBS.values():
            object.__setattr__(self, knob.name, _check(knob, getattr(self, knob.name)))
        if self.seed == -1:  # llama.cpp's spelling of "random"
            object.__setattr__(self, "seed", None)
        if self.mode == "sample" and self.temperature == 0:
            raise SettingsError("temperature 0 is greedy decoding; sampling needs a temperature above 0", "temperature")

    def update(self, values: Mapping[str, Any] | None = None, /, **more: Any) -> "Settings":
        """A copy with ``values`` (JSON rows, HTTP bodies, keywords; short names allowed)
        checked and applied. Unknown names and wrong types are a :class:`SettingsError`.

        A temperature is what users of llama.cpp and ollama reach for to sample, so giving one
        chooses the mode too: above 0 sampling, 0 greedy (llama.cpp's ``--temp 0``). Giving a
        mode that contradicts it in the same update is an error, never a silent choice."""
        changes: dict[str, Any] = {}
        for key, value in {**(values or {}), **more}.items():
            name = ALIASES.get(key) if isinstance(key, str) else None
            if name is None:
                raise SettingsError(f"unknown setting {key!r}; settings are {', '.join(KNOBS)}")
            changes[name] = value
        if "temperature" not in changes:
            return dataclasses.replace(self, **changes)
        temperature = _check(KNOBS["temperature"], changes["temperature"])
        implied = "greedy" if temperature == 0 else "sample"
        mode = _check(KNOBS["mode"], changes.setdefault("mode", implied))
        if mode != implied:
            raise SettingsError(f"temperature {temperature:g} means {implied} decoding but the mode given is "
                                f"{mode}; give one or the other", "temperature")
        return dataclasses.replace(self, **changes)

    def parse(self, key: str, text: str) -> "Settings":
        """A copy with one setting given as text, as chat's ``/set k 20`` types it."""
        name = ALIASES.get(key)
        if name is None:
            raise SettingsError(f"unknown setting {key!r}; settings are {', '.join(ALIASES)}")
        return self.update({name: _from_text(KNOBS[name], text)})

    def with_weight(self, default: float) -> "Settings":
        """These settings with the weight filled in where none was chosen."""
        return self if self.weight is not None else dataclasses.replace(self, weight=default)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (what ``--json`` and result rows report)."""
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        return d


def _check(knob: Knob, value: Any) -> Any:
    """``value`` as the knob's type, or a SettingsError that names the knob and the rule."""
    def bad() -> SettingsError:
        return SettingsError(f"{knob.label} must be {knob.describe()}, not {_SHOWN.repr(value)}", knob.name)

    if value is None and knob.optional:
        return None
    if knob.kind is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if knob.kind is tuple:
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
            raise bad()
        for s in value:
            _check_text(knob, s)
        return tuple(s for s in value if s)
    if knob.kind is str:
        if not isinstance(value, str) or (knob.choices and value not in knob.choices):
            raise bad()
        return _check_text(knob, value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad()
    if knob.kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise bad()
        value = int(value)
    else:
        try:
            value = float(value)
        except OverflowError:  # an integer beyond the float range
            raise bad() from None
        if not math.isfinite(value):
            raise bad()
    if knob.low is not None and (value < knob.low or (knob.low_open and value == knob.low)):
        raise bad()
    if knob.high is not None and value > knob.high:
        raise bad()
    return value


def _check_text(knob: Knob, text: str) -> str:
    problem = text_problem(text)
    if problem:
        raise SettingsError(f"{knob.label} {problem}", knob.name)
    return text


def _from_text(knob: Knob, text: str) -> Any:
    """A typed value from what a user typed; the knob's checks come after."""
    text = text.strip()
    if knob.optional and text.lower() in ("", "none", "default"):
        return None
    try:
        if knob.kind is int:
            return int(text)
        if knob.kind is float:
            return float(text)
    except ValueError:
        raise SettingsError(f"{knob.label} must be {knob.describe()}, not {_SHOWN.repr(text)}", knob.name) from None
    if knob.kind is bool:
        if text.lower() in ("1", "true", "on", "yes"):
            return True
        if text.lower() in ("0", "false", "off", "no"):
            return False
        raise SettingsError(f"{knob.label} must be {knob.describe()}, not {_SHOWN.repr(text)}", knob.name)
    return text
