"""Chat templates from model files, rendered with bounds on time and size.

A GGUF file (or a Hugging Face folder) carries its chat template as Jinja2 source, so the
template is data from whoever made the file. Jinja2's immutable sandbox already stops it
from reaching Python internals; it does not stop it from running long or building huge
strings (``{{ 'x' * 10**10 }}``, a loop that doubles a string, nested ``range(100000)``
loops). :class:`ChatTemplate` adds the missing bounds, in-process and without a second
process, so that a normal template still renders in microseconds:

* a deadline (:data:`TIME_LIMIT_S`), checked at every loop iteration, every call (functions,
  macros, methods) and every filter, and every piece of output;
* a size limit (:data:`MAX_SIZE`), checked *before* the operations that can multiply sizes
  run (``*``, ``**``, ``+``, ``~``, ``%``, ``join``, ``replace``, ``indent``, ``center``,
  ``format``, ``tojson``...: any integer argument above the limit is refused, and the
  result's size is estimated from the arguments), and after every call on its result, on
  every list, tuple and dict literal, on every value written out and on everything written.

Sizes are measured as the text a value would print as, following references, so a list that
holds the same large string many times counts every time (:func:`text_size`); the walk stops
as soon as it passes the limit, so measuring is never slower than the limit allows.
Python's own limits stay in force beneath these (integer-to-text conversion is capped at
4300 digits, recursion at about 1000 frames); whatever a template raises becomes one
sentence (:class:`TemplateFailure`).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import re
import time
from datetime import datetime
from typing import Any, Callable, Iterable, Iterator, Sequence, Sized

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.runtime import Namespace
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from ..core.errors import PromptError

TIME_LIMIT_S = 1.0  # a normal template renders in well under a millisecond
MAX_SIZE = 1 << 20  # characters of output, and of any one value a template builds
MAX_INT_BITS = 1 << 16  # integers a template computes (Python prints at most 4300 digits anyway)

_DEADLINE: contextvars.ContextVar[float] = contextvars.ContextVar("template_deadline", default=float("inf"))


class TemplateFailure(PromptError):
    """A chat template that cannot render this conversation: broken, refusing, or out of bounds."""


class TemplateOutOfBounds(TemplateFailure):
    """A template stopped at a bound: more time or text than any chat template needs."""


class _OutOfBounds(SecurityError):
    """Raised inside the sandbox; becomes a :class:`TemplateFailure` naming the bound."""


class _Refused(Exception):
    """The template's own ``raise_exception(message)``: it does not accept the conversation."""


def text_size(value: Any, limit: int = MAX_SIZE) -> int:
    """About how many characters ``value`` prints as, following every reference (a list that
    holds one string n times counts it n times); stops once past ``limit``."""
    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, (str, bytes)):
            total += len(v) + 2
        elif isinstance(v, bool) or v is None:
            total += 5
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 2
        elif isinstance(v, dict):
            total += 2 * len(v) + 2
            if total <= limit:
                stack.extend(v.keys())
                stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += len(v) + 2
            if total <= limit:
                stack.extend(v)
        elif isinstance(v, range):
            total += 8 * len(v) + 2
        elif isinstance(v, Namespace):
            stack.append(v._Namespace__attrs)  # type: ignore[attr-defined]
        else:  # floats, undefined values, loop and macro objects: short texts
            total += 24
    return total


def _exceeded(what: str) -> _OutOfBounds:
    return _OutOfBounds(f"it would build {what} (the limit is {MAX_SIZE:,} characters)")


def _check_size(value: Any) -> Any:
    """``value`` if it prints within :data:`MAX_SIZE`, else out of bounds."""
    if text_size(value) > MAX_SIZE:
        raise _exceeded("a value larger than that")
    return value


def _tick() -> None:
    if time.monotonic() > _DEADLINE.get():
        raise _OutOfBounds(f"it ran for more than {TIME_LIMIT_S:g} s")


def _int_bits(value: Any) -> int:
    return abs(value).bit_length() if isinstance(value, int) and not isinstance(value, bool) else 0


def _format_size(fmt: Any, args: Sequence[Any]) -> int:
    """An upper bound on ``fmt % args`` or ``fmt.format(*args)``: every number written in the
    format (a field width or precision) and every integer argument (a ``*`` width) may pad."""
    text = str(fmt) if isinstance(fmt, str) else ""
    widths = sum(min(int(d[:8]), MAX_SIZE + 1) for d in re.findall(r"\d+", text))
    stars = sum(min(abs(a), MAX_SIZE + 1) for a in args if isinstance(a, int) and not isinstance(a, bool))
    return len(text) + widths + stars + sum(text_size(a) for a in args)


def _count(value: Any) -> int:
    return len(value) if isinstance(value, Sized) else 0


def _lines(value: Any) -> int:
    return str(value).count("\n") + 1 if isinstance(value, str) else 1


def _estimate(name: str, receiver: Any, params: list[Any], kwargs: dict[str, Any]) -> int:
    """An upper bound on the size of what a string-building operation returns, for the
    operations that can return far more than they are given (0 for the others). ``receiver``
    is the string a method is called on, or the value a filter is applied to."""
    text = receiver if isinstance(receiver, (str, bytes)) else None
    values = params + list(kwargs.values())
    if name == "join" and text is not None and params:
        return text_size(params[0]) + _count(params[0]) * len(text)
    if name == "do_join":
        return text_size(receiver) + _count(receiver) * text_size(values[0] if values else "")
    if name in ("replace", "do_replace") and len(values) >= 2:
        old, new, whole = str(values[0]), str(values[1]), str(receiver)
        return len(whole) + (whole.count(old) if old else len(whole) + 1) * len(new)
    if name == "do_indent":
        width = values[0] if values else 4
        pad = width if isinstance(width, int) else len(str(width))
        return text_size(receiver) + _lines(receiver) * pad
    if name == "expandtabs" and text is not None:
        size = values[0] if values and isinstance(values[0], int) else 8
        return len(text) * (1 + max(size, 0))
    if name == "translate" and text is not None and values and isinstance(values[0], dict):
        return len(text) * max((text_size(v) for v in values[0].values()), default=1)
    if name in ("format", "format_map", "do_format"):
        return _format_size(receiver, values)
    if name == "do_wordwrap":
        wrap = kwargs.get("wrapstring", params[2] if len(params) > 2 else "\n")
        return text_size(receiver) * (1 + len(str(wrap)))
    if name == "do_sum":
        start = kwargs.get("start", params[1] if len(params) > 1 else 0)
        if not isinstance(start, (int, float)) and isinstance(receiver, (list, tuple)):
            return text_size(receiver) * len(receiver)  # sum() of sequences copies as it goes
    return 0


# Filters and methods whose argument may be a one-pass iterator that _estimate must read.
_MATERIALIZED = frozenset({"join", "do_join", "do_sum"})
_JINJA_KWARGS = frozenset({"_loop_vars", "_block_vars", "caller"})


def _guard(func: Any, receiver_index: int | None, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """The checks before a call or a filter runs: the deadline, no number above the size
    limit among its parameters, and an estimate of what it builds. Returns ``args`` with
    iterators read into lists where the estimate needs them."""
    _tick()
    target = inspect.unwrap(func) if callable(func) else func
    name = getattr(target, "__name__", "")
    name = name.removeprefix("sync_") if isinstance(name, str) else ""  # Jinja's async-capable filters
    if name in _MATERIALIZED:
        args = tuple(list(a) if isinstance(a, Iterator) else a for a in args)
    own = {k: v for k, v in kwargs.items() if k not in _JINJA_KWARGS}
    if receiver_index is None:
        receiver, params = getattr(target, "__self__", None), list(args)
    else:
        receiver = args[receiver_index] if len(args) > receiver_index else None
        params = list(args[receiver_index + 1:])
    if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_SIZE for v in (*params, *own.values())):
        raise _exceeded("a text or list sized by a number above that")
    if _estimate(name, receiver, params, own) > MAX_SIZE:
        raise _exceeded(f"a text longer than that with {name}")
    return args


def _result(value: Any) -> Any:
    """What a call or filter returned, if within bounds (iterators are checked as they are read)."""
    return value if isinstance(value, Iterator) else _check_size(value)


def _bounded_filter(func: Callable[..., Any]) -> Callable[..., Any]:
    """A filter with :func:`_guard` before it and :func:`_result` after it. The value it is
    applied to comes after the context Jinja passes to some filters (``jinja_pass_arg``)."""
    index = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)  # keeps jinja_pass_arg
    def guarded(*args: Any, **kwargs: Any) -> Any:
        return _result(func(*_guard(func, index, args, kwargs), **kwargs))

    return guarded


def _binop_check(operator: str, left: Any, right: Any) -> None:
    """Refuse an operator whose result would be too large, before computing it."""
    sized = (str, bytes, list, tuple)
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if not isinstance(seq, sized) or not isinstance(n, int):
                continue
            size = len(seq) if isinstance(seq, (str, bytes)) else text_size(seq)
            if size * max(n, 0) > MAX_SIZE:
                raise _exceeded(f"{type(seq).__name__} repeated {n:,} times")
        if _int_bits(left) + _int_bits(right) > MAX_INT_BITS:
            raise _OutOfBounds(f"it would compute an integer of more than {MAX_INT_BITS:,} bits")
    elif operator == "**":
        if _int_bits(left) > 1 and isinstance(right, int) and (_int_bits(left) - 1) * right > MAX_INT_BITS:
            raise _OutOfBounds(f"it would compute an integer of more than {MAX_INT_BITS:,} bits")
    elif operator == "+":
        if isinstance(left, sized) and isinstance(right, sized) and text_size(left) + text_size(right) > MAX_SIZE:
            raise _exceeded("a concatenation longer than that")
    elif operator == "%" and isinstance(left, str):
        values = right if isinstance(right, tuple) else (right,)
        if _format_size(left, values) > MAX_SIZE:
            raise _exceeded("a formatted text longer than that")


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's compiler, with three more hooks into the generated Python: every for-loop
    iterates through ``environment.bounded_iter``, every ``~`` goes through
    ``environment.concat_values``, and every list, tuple and dict literal through
    ``environment.sized``."""

    def visit_For(self, node: nodes.For, frame: Any) -> None:
        node.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [node.iter], [], None, None, lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        self.write("environment.concat_values((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _sized(self, visit: Callable[[Any, Any], None], node: Any, frame: Any) -> None:
        if getattr(node, "ctx", "load") != "load":  # an assignment target, not a value
            return visit(node, frame)
        self.write("environment.sized(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame: Any) -> None:
        self._sized(super().visit_List, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame: Any) -> None:
        self._sized(super().visit_Tuple, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Any) -> None:
        self._sized(super().visit_Dict, node, frame)


class _IgnoreGenerationTags(jinja2.ext.Extension):
    """Hugging Face's ``{% generation %}`` tag (marks the assistant's text for training):
    rendered as its content, as transformers and llama-cpp-python do."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox with time and size bounds (see the module docstring)."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(
            loader=jinja2.BaseLoader(),
            trim_blocks=True,
            lstrip_blocks=True,
            optimized=False,  # the optimizer evaluates constant expressions at compile time, unbounded
            extensions=[_IgnoreGenerationTags, jinja2.ext.loopcontrols],
            finalize=self._finalize,
        )
        self.filters["tojson"] = _tojson
        self.filters.pop("pprint", None)  # a debugging aid whose output size is hard to bound
        self.filters = {name: _bounded_filter(f) for name, f in self.filters.items()}
        self.globals.pop("lipsum", None)  # lorem ipsum: a loop over its argument inside Python
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.globals["raise_exception"] = _raise

    # -- hooks called by the generated code ------------------------------------------------

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        """Every call a template makes: functions, macros, methods, ``range``, ``namespace``."""
        args = _guard(__obj, None, args, kwargs)
        return _result(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        _binop_check(operator, left, right)
        return _check_size(super().call_binop(context, operator, left, right))

    def concat_values(self, values: tuple) -> str:
        """``a ~ b``: sized before anything is converted to text."""
        _tick()
        if sum(text_size(v) for v in values) > MAX_SIZE:
            raise _exceeded("a concatenation longer than that")
        return "".join(str(v) for v in values)

    @staticmethod
    def concat(pieces: Iterable[str]) -> str:
        """The text of a macro, a ``{% set %}`` block or a filter block."""
        pieces = list(pieces)
        if sum(len(p) for p in pieces) > MAX_SIZE:
            raise _exceeded("a block of text longer than that")
        return "".join(pieces)

    @staticmethod
    def sized(value: Any) -> Any:
        """A list, tuple or dict literal: its elements may all be the same large value."""
        return _check_size(value)

    @staticmethod
    def bounded_iter(iterable: Iterable[Any]) -> Iterator[Any]:
        """A for-loop's items, with the deadline checked before each."""
        for item in iterable:
            _tick()
            yield item

    @staticmethod
    def _finalize(value: Any) -> Any:
        """Every ``{{ value }}``, before it is converted to text."""
        _tick()
        return _check_size(value)


def _raise(message: Any) -> None:
    raise _Refused(str(message)[:500])


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """JSON as transformers' chat templates write it (not HTML-escaped, unlike Jinja's own)."""
    pad = len(indent) if isinstance(indent, str) else (indent or 0)
    if text_size(value) * (1 + min(pad, MAX_SIZE + 1)) > MAX_SIZE:
        raise _exceeded("JSON longer than that")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A chat template compiled once and rendered many times, each time within the bounds.

    ``name`` says whose template it is in error messages (the model file); ``specials`` are the
    variables templates expect beside the messages (``bos_token``, ``eos_token``...).
    """

    def __init__(self, source: str, name: str, **specials: Any) -> None:
        self.name = name
        self.specials = specials
        try:
            self.template = BoundedEnvironment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateFailure(f"the chat template of {name} is not valid Jinja ({e.message}, line {e.lineno}); "
                                  "pass --raw to send prompts without it") from None
        except (RecursionError, MemoryError):
            raise TemplateFailure(f"the chat template of {name} is nested too deeply to compile; "
                                  "pass --raw to send prompts without it") from None

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The conversation as text, or a :class:`TemplateFailure` that says why not."""
        values = {"messages": list(messages), "add_generation_prompt": add_generation_prompt,
                  "tools": None, "functions": None, "function_call": None, "tool_choice": None,
                  **self.specials, **extra}
        token = _DEADLINE.set(time.monotonic() + TIME_LIMIT_S)
        size, pieces = 0, []
        try:
            for piece in self.template.generate(**values):
                size += len(piece)
                if size > MAX_SIZE:
                    raise _exceeded("a prompt longer than that")
                _tick()
                pieces.append(piece)
        except _OutOfBounds as e:
            raise TemplateOutOfBounds(f"the chat template of {self.name} was stopped: {e}; the model file's template "
                                  "is broken or hostile (pass --raw to send prompts without it)") from None
        except _Refused as e:
            raise TemplateFailure(f"the chat template of {self.name} refused this conversation: {e}") from None
        except (RecursionError, MemoryError) as e:
            raise TemplateOutOfBounds(f"the chat template of {self.name} was stopped: {type(e).__name__} "
                                  "(pass --raw to send prompts without it)") from None
        except Exception as e:  # the template's own errors: undefined names, wrong types...
            raise TemplateFailure(f"the chat template of {self.name} failed on this conversation: "
                                  f"{type(e).__name__}: {str(e)[:300]}") from None
        finally:
            _DEADLINE.reset(token)
        return "".join(pieces)
