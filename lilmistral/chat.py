"""Chat formats: Mistral's instruct format by tokenizer version, and chat templates from model files (GGUF
`tokenizer.chat_template`, HF `chat_template`), rendered in a sandbox.

A template comes from an untrusted file: Jinja's immutable sandbox keeps it away from Python internals
(attribute access to dunders, mutation of the messages, calling unsafe methods); `TemplateSandbox` also keeps
it from taking all the memory (`{{ "a" * 10**10 }}`) or running for ever (`_timed_loops`), and any failure of
it is one line.
"""
from __future__ import annotations

import contextvars
import functools
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import LilmistralError


def _raise(message: str) -> None:
    raise LilmistralError(f"chat template: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


TEMPLATE_LIMIT = 1 << 23  # characters a template may write; the most any value it makes may hold
TEMPLATE_SECONDS = 10.0  # the longest a template may render (ordinary ones take milliseconds)
_deadline = contextvars.ContextVar("template_deadline", default=math.inf)  # this render's, time.monotonic()'s
_WIDE_FORMAT = re.compile(r"%[-#0 +]*(\d{7}|\d*\.\d{7})")  # a printf width or precision of millions


def _size(value: Any) -> int:
    """What a value holds, as the limit counts it: an int's magnitude, a string's characters, a list's items
    and their characters (so that `[big] * n` is as large as its join)."""
    if isinstance(value, int):
        return abs(value)
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple)):
        return len(value) + sum(len(v) for v in value if isinstance(v, str))
    return 0


def _bounded(*values: Any) -> None:
    if any(_size(v) > TEMPLATE_LIMIT for v in values):
        raise LilmistralError("chat template failed: it makes a value too large")
    if time.monotonic() > _deadline.get():
        raise LilmistralError(f"chat template failed: it ran for over {TEMPLATE_SECONDS:g} s")


def _timed(items: Iterable) -> Iterator:
    """A template loop's items, the clock looked at before each: every loop and call of a render does, so
    that the work between two looks is bounded (one operation on values of at most TEMPLATE_LIMIT)."""
    for item in items:
        _bounded()
        yield item


def _timed_loops(template: nodes.Template) -> nodes.Template:
    """The template with each loop's items given by `_timed`, a recursive loop's `loop(items)` too (calls,
    macros' included, pass the sandbox's `call`)."""
    timed = nodes.ImportedName(f"{__name__}._timed")  # the compiler's import: no name a template could set
    for loop in list(template.find_all(nodes.For)):
        loop.iter = nodes.Call(timed, [loop.iter], [], None, None, lineno=loop.lineno)
    for call in list(template.find_all(nodes.Call)):
        if isinstance(call.node, nodes.Name) and call.node.name == "loop" and call.args:
            call.args[0] = nodes.Call(timed, [call.args[0]], [], None, None, lineno=call.lineno)
    return template


class TemplateSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox where no operator, call or filter takes or makes a value larger than
    TEMPLATE_LIMIT (a size's int argument included: `"a".center(10**10)`), nor runs past the render's
    deadline (`_bounded`)."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _bounded(left, right)
        if operator == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
            left, right = right, left
        if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int):
            _bounded(_size(left) * right)  # the product's size, before making it
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            _bounded(right * left.bit_length() // 3)  # about the digits of the power
        elif operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
            _bounded(TEMPLATE_LIMIT + 1)
        return super().call_binop(context, operator, left, right)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _bounded(*args, *kwargs.values())
        return super().call(context, obj, *args, **kwargs)


def _bounded_filter(f: Callable) -> Callable:
    @functools.wraps(f)  # keeps Jinja's pass_context (and the like) marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _bounded(*args, *kwargs.values())
        return f(*args, **kwargs)
    return bounded


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    env = TemplateSandbox(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(_timed_loops(env.parse(source)))


def render_chat_template(source: str, messages: list[dict[str, Any]], **variables: Any) -> str:
    """Render with `add_generation_prompt=True`, as HF and llama.cpp do for a reply; at most TEMPLATE_LIMIT
    characters, in at most TEMPLATE_SECONDS."""
    deadline = _deadline.set(time.monotonic() + TEMPLATE_SECONDS)
    try:
        pieces, written = [], 0
        for piece in _compile(source).generate(messages=messages, add_generation_prompt=True, **variables):
            written += len(piece)
            _bounded(written)
            pieces.append(piece)
        return "".join(pieces)
    except LilmistralError:
        raise
    except Exception as e:  # the template's own faults (TemplateError, the sandbox's SecurityError, 1 / 0, ...)
        raise LilmistralError(f"chat template failed: {type(e).__name__}: {e}") from None
    finally:
        _deadline.reset(deadline)


def check_conversation(messages: list[dict[str, Any]]) -> None:
    """The conversations Mistral's own library accepts for a reply (text only, no tools)."""
    if not messages:
        raise LilmistralError("invalid conversation: it has no messages")
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant"):
            raise LilmistralError(f"unknown message role {m.get('role')!r} (use system, user, assistant)")
        if not isinstance(m.get("content"), str):
            raise LilmistralError(f"invalid conversation: a {m['role']} message's content must be text")
        if m["role"] == "assistant" and not m["content"]:
            raise LilmistralError("invalid conversation: an assistant message is empty")
    if len(messages) > 1 and messages[-1]["role"] != "user":
        raise LilmistralError("invalid conversation: it must end with a user message")
    if len(messages) == 1 and messages[0]["role"] == "assistant":
        raise LilmistralError("invalid conversation: it must start with a user or system message")
    if any(a["role"] == "assistant" and b["role"] == "system" for a, b in itertools.pairwise(messages)):
        raise LilmistralError("invalid conversation: a system message cannot follow an assistant message")


def mistral_instruct(messages: list[dict[str, Any]], version: int, encode: Callable[[str], list[int]],
                     special: Callable[[str], int], bos: int, eos: int) -> list[int]:
    """The prompt ids of a conversation in Mistral's instruct format of tokenizer `version` (1, 2, 3, 7 or
    later), as mistral_common encodes it (tests/test_chat_format.py compares every version's ids): runs of
    messages of one role joined by a blank line; up to v3 the system messages joined into one prompt, put
    before the first (v1) or the last (v2, v3) user message, from v7 each in [SYSTEM_PROMPT] tokens where it
    stands; v1 writes [INST] as text, later versions as control tokens."""
    check_conversation(messages)
    turns: list[tuple[str, str]] = []
    for role, run in itertools.groupby(messages, key=lambda m: m["role"]):
        texts = [m["content"] for m in run]
        if role != "system":
            turns.append((role, "\n\n".join(t for t in texts if t)))
        elif version >= 7:
            turns += [(role, t) for t in texts]
    if not turns or (version < 7 and turns[0][0] != "user"):
        turns.insert(0, ("user", ""))
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    users = [i for i, (role, _) in enumerate(turns) if role == "user"]
    ids = [bos]
    for i, (role, text) in enumerate(turns):
        if role == "system":
            ids += [special("[SYSTEM_PROMPT]"), *encode(text), special("[/SYSTEM_PROMPT]")]
        elif role == "assistant":
            ids += [*encode(text if version == 1 else text.rstrip(" ")), eos]
        elif version == 1:
            text = f"{system}\n\n{text}" if system and i == users[0] else text
            ids += encode(f"[INST] {text} [/INST]")
        else:
            text = f"{system}\n\n{text}" if system and version < 7 and i == users[-1] else text
            ids += [special("[INST]"), *encode(text), special("[/INST]")]
    return ids
