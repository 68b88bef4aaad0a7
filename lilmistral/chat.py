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
import random
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, NoReturn

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


ROLES = ("system", "user", "assistant", "tool")
_FOLLOWS = {"system": ("system", "user", "assistant"), "user": ("system", "user", "assistant"),
            "assistant": ("user", "assistant", "tool"), "tool": ("user", "assistant", "tool")}
_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")  # a tool call's id from v3 to v11 (v13: any)


def _invalid(why: str) -> NoReturn:
    raise LilmistralError(f"invalid conversation: {why}")


def _check_name(name: Any, what: str) -> None:
    if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
        _invalid(f"{what} {name!r} is not 1-64 letters, digits, _ or -")


def _check_call_id(call_id: Any, version: int, what: str) -> None:
    if version >= 13 and (not isinstance(call_id, str) or call_id in ("", "null")):
        _invalid(f"{what} has no id")
    if 3 <= version < 13 and (not isinstance(call_id, str) or not CALL_ID.fullmatch(call_id)):
        _invalid(f"{what}'s id {call_id!r} is not 9 letters or digits")


def _check_tool_calls(calls: Any, version: int) -> list[dict[str, Any]]:
    if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                              for c in calls):
        _invalid('tool_calls must be a list of {"id", "function": {"name", "arguments"}}')
    for call in calls:
        _check_name(call["function"].get("name"), "a tool call's function name")
        _check_call_id(call.get("id"), version, "a tool call")
        if not isinstance(call["function"].get("arguments"), (str, dict, type(None))):
            _invalid("a tool call's arguments must be a JSON object or its text")
    return calls


def check_tools(tools: Any) -> None:
    """Tools as OpenAI's and Ollama's APIs take them: [{"type": "function", "function": {"name", "description",
    "parameters"}}]."""
    if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type", "function") == "function"
                                              and isinstance(t.get("function"), dict) for t in tools):
        raise LilmistralError('tools must be a list of {"type": "function", "function": {"name", "description", '
                              '"parameters"}}')
    for tool in tools:
        _check_name(tool["function"].get("name"), "a tool's name")
        if not isinstance(tool["function"].get("parameters") or {}, dict):
            raise LilmistralError("a tool's parameters must be a JSON schema object")
        if not isinstance(tool["function"].get("description") or "", str):
            raise LilmistralError("a tool's description must be text")


def check_conversation(messages: list[dict[str, Any]], version: int, tools: list[dict[str, Any]] | None = None) -> None:
    """The conversations Mistral's own library accepts for a reply in tokenizer `version`'s format: roles in an
    order it takes, tool calls answered by tool results (by their ids from v11) before the next answer."""
    if not messages:
        _invalid("it has no messages")
    if tools is not None:
        check_tools(tools)
    if version < 2 and (tools or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)):
        raise LilmistralError("this model's chat format (Mistral v1) has no tool calls")
    previous, pending = None, []  # the last answer's tool call ids not yet answered by a tool message
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise LilmistralError(f"unknown message role {role!r} (use system, user, assistant, tool)")
        if not isinstance(content, str) and not (role == "assistant" and content is None):
            _invalid(f"a {role} message's content must be text")
        if previous is not None and role not in _FOLLOWS[previous]:
            _invalid(f"a {role} message cannot follow a {previous} message")
        if role == "assistant":
            calls = _check_tool_calls(m.get("tool_calls") or [], version)
            if not content and not calls:
                _invalid("an assistant message is empty")
            if pending:
                _invalid("tool calls without their results")
            pending = [c.get("id") for c in calls]
        elif role == "tool":
            _check_call_id(m.get("tool_call_id"), version, "a tool message")
            if m.get("name") is not None:
                _check_name(m["name"], "a tool message's name")
            if not pending or (version >= 11 and m.get("tool_call_id") not in pending):
                _invalid(f"a tool result answers no tool call (tool_call_id {m.get('tool_call_id')!r})")
            pending.remove(m["tool_call_id"] if version >= 11 else pending[0])
        previous = role
    if len(messages) > 1 and messages[-1]["role"] not in ("user", "tool"):
        _invalid("it must end with a user or tool message")
    if len(messages) == 1 and messages[0]["role"] not in ("user", "system"):
        _invalid("it must start with a user or system message")


def _json_value(text: str | dict[str, Any] | None) -> Any:
    """A tool call's arguments or a tool result as mistral_common writes them in JSON: parsed where they are
    JSON, else the text; nothing is {}."""
    if not isinstance(text, str):
        return {} if text is None else text
    try:
        return json.loads(text or "{}")
    except json.JSONDecodeError:
        return text


def _turns(messages: list[dict[str, Any]], version: int) -> list[dict[str, Any]]:
    """Messages as mistral_common's normalizer leaves them: runs of user or assistant messages joined (their
    texts by a blank line, their tool calls in order), up to v3 the system messages taken out (they join the
    user message that _encode gives them), from v11 the tool results in the order of the calls; an empty user
    message first where the format needs one."""
    turns: list[dict[str, Any]] = []
    called: list[str] = []  # the ids of the tool calls since the last tool results
    for role, run in itertools.groupby(messages, key=lambda m: m["role"]):
        run = list(run)
        if role in ("user", "assistant"):
            turns.append({"role": role, "content": "\n\n".join(m["content"] for m in run if m.get("content")),
                          "tool_calls": [c for m in run for c in m.get("tool_calls") or []]})
            called += [c.get("id") for c in turns[-1]["tool_calls"]]
        elif role == "tool":
            if version >= 11:
                run.sort(key=lambda m: called.index(m["tool_call_id"]) if m["tool_call_id"] in called else len(called))
            turns += run
            called = []
        elif version >= 7:
            turns += run
    if not turns or (version < 7 and turns[0]["role"] != "user"):
        turns.insert(0, {"role": "user", "content": ""})
    return turns


def _tool_call_ids(calls: list[dict[str, Any]], version: int, encode: Callable[[str], list[int]],
                   special: Callable[[str], int]) -> list[int]:
    """An answer's tool calls: up to v7 one JSON list after [TOOL_CALLS]; from v11 each call's name and its
    arguments' JSON after [TOOL_CALLS] and [ARGS] (v11 with [CALL_ID] and the id between them)."""
    prepared = [{"name": c["function"]["name"], "arguments": _json_value(c["function"].get("arguments"))}
                | ({"id": c["id"]} if version >= 3 and c.get("id") not in (None, "", "null") else {}) for c in calls]
    if version < 11:
        return [special("[TOOL_CALLS]"), *encode(json.dumps(prepared, ensure_ascii=False))]
    ids = []
    for call in prepared:
        ids += [special("[TOOL_CALLS]"), *encode(call["name"])]
        if version == 11 and "id" in call:
            ids += [special("[CALL_ID]"), *encode(call["id"])]
        ids += [special("[ARGS]"), *encode(json.dumps(call["arguments"], ensure_ascii=False))]
    return ids


def _tool_result_ids(message: dict[str, Any], version: int, encode: Callable[[str], list[int]],
                     special: Callable[[str], int]) -> list[int]:
    """A tool message: v2 {"name", "content"} in a JSON list, v3 {"content", "call_id"}, v7 and v11 the call's id
    and the text after [TOOL_CONTENT], from v13 the text alone; between [TOOL_RESULTS] and [/TOOL_RESULTS]."""
    content = message["content"]
    if version == 2:
        content = json.dumps([{"name": message.get("name"), "content": _json_value(content)}], ensure_ascii=False)
    elif version == 3:
        content = json.dumps({"content": _json_value(content), "call_id": message["tool_call_id"]},
                             ensure_ascii=False)
    elif version < 13:
        return [special("[TOOL_RESULTS]"), *encode(message["tool_call_id"]), special("[TOOL_CONTENT]"),
                *encode(content), special("[/TOOL_RESULTS]")]
    return [special("[TOOL_RESULTS]"), *encode(content), special("[/TOOL_RESULTS]")]


def _tools_ids(tools: list[dict[str, Any]], encode: Callable[[str], list[int]],
               special: Callable[[str], int]) -> list[int]:
    specs = [{"type": "function", "function": {"name": t["function"]["name"],
                                               "description": t["function"].get("description") or "",
                                               "parameters": t["function"].get("parameters") or {}}} for t in tools]
    return [special("[AVAILABLE_TOOLS]"), *encode(json.dumps(specs, ensure_ascii=False)), special("[/AVAILABLE_TOOLS]")]


def mistral_instruct(messages: list[dict[str, Any]], version: int, encode: Callable[[str], list[int]],
                     special: Callable[[str], int], bos: int, eos: int, tools: list[dict[str, Any]] | None = None,
                     settings: dict[str, Any] | None = None) -> list[int]:
    """The prompt ids of a conversation in Mistral's instruct format of tokenizer `version` (1, 2, 3, 7 or
    later), as mistral_common encodes it (tests/test_chat_format.py compares every version's ids): runs of
    messages of one role joined by a blank line; up to v3 the system messages joined into one prompt, put
    before the first (v1) or the last (v2, v3) user message, from v7 each in [SYSTEM_PROMPT] tokens where it
    stands; v1 writes [INST] as text, later versions as control tokens. `tools` go before the last user
    message (from v13 the first), and after them v15's model `settings` (their names sorted); v2 leaves out the
    tool calls and results before the last user message."""
    check_conversation(messages, version, tools)
    turns = _turns(messages, version)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    users = [i for i, turn in enumerate(turns) if turn["role"] == "user"]
    last_user = users[-1] if users else -1
    if version == 2 and any(len(list(run)) > 1 for role, run in itertools.groupby(
            turn["role"] for turn in turns[last_user + 1:]) if role == "tool"):
        raise LilmistralError("this model's chat format (Mistral v2) takes one tool result per tool call turn")
    ids = [bos]
    for i, turn in enumerate(turns):
        role, text = turn["role"], turn["content"]
        if role == "system":
            ids += [special("[SYSTEM_PROMPT]"), *encode(text), special("[/SYSTEM_PROMPT]")]
        elif role == "tool":
            if version > 2 or i > last_user:
                ids += _tool_result_ids(turn, version, encode, special)
        elif role == "assistant":
            if text and turn["tool_calls"] and version < 7:
                _invalid(f"an answer has both text and tool calls (Mistral v{version}'s format takes one)")
            if turn["tool_calls"] and version == 2 and i < last_user:
                continue
            ids += encode(text if version == 1 else text.rstrip(" ")) if text else []
            ids += _tool_call_ids(turn["tool_calls"], version, encode, special) if turn["tool_calls"] else []
            ids.append(eos)
        elif version == 1:
            text = f"{system}\n\n{text}" if system and i == users[0] else text
            ids += encode(f"[INST] {text} [/INST]")
        else:
            if i == (users[0] if version >= 13 else last_user):
                ids += _tools_ids(tools, encode, special) if tools else []
                ids += [special("[MODEL_SETTINGS]"), *encode(json.dumps({k: settings[k] for k in sorted(settings)},
                        ensure_ascii=False)), special("[/MODEL_SETTINGS]")] if settings else []
            text = f"{system}\n\n{text}" if system and version < 7 and i == last_user else text
            ids += [special("[INST]"), *encode(text), special("[/INST]")]
    return ids


def mistral_fim(prefix: str, suffix: str, encode: Callable[[str], list[int]], special: Callable[[str], int],
                bos: int) -> list[int]:
    """The prompt ids to fill in between `prefix` and `suffix` (Codestral's fill-in-the-middle), as mistral_common
    encodes them: the suffix first, its leading space kept (a "☺" encoded before it and its two tokens dropped:
    SentencePiece would take a leading space as the start of a word), then the prefix, where the answer goes on."""
    suffix_ids = encode("☺" + suffix)[2:] if suffix else []
    return [bos, special("[SUFFIX]"), *suffix_ids, special("[PREFIX]"), *encode(prefix)]


def new_call_id() -> str:
    """A tool call's id as Mistral's formats take it (v3 to v11: 9 letters or digits), for a call the model
    wrote without one."""
    return "".join(random.choices(string.ascii_letters + string.digits, k=9))


def parse_tool_calls(ids: list[int], version: int, decode: Callable[[list[int]], str],
                     control_id: Callable[[str], int | None]) -> list[dict[str, Any]] | None:
    """The tool calls an answer wrote from its [TOOL_CALLS] token on (what `_tool_call_ids` writes), as an
    assistant message's "tool_calls" holds them ({"id", "type", "function": {"name", "arguments"}}, the
    arguments parsed); None where they are not well formed (a call cut short by max_tokens, say)."""
    calls_id, args_id, call_id_id = (control_id(t) for t in ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"))
    if version < 11:
        try:
            calls = json.loads(decode([i for i in ids if i != calls_id]))
        except json.JSONDecodeError:
            return None
        calls = calls if isinstance(calls, list) else [calls]
    else:
        calls = []
        starts = [k for k, i in enumerate(ids) if i == calls_id]
        for start, end in zip(starts, [*starts[1:], len(ids)]):
            part = ids[start + 1:end]  # name [CALL_ID] id [ARGS] arguments
            if args_id not in part:
                return None
            head, args = part[:part.index(args_id)], part[part.index(args_id) + 1:]
            cut = head.index(call_id_id) if call_id_id in head else len(head)
            try:
                arguments = json.loads(decode(args) or "{}")
            except json.JSONDecodeError:
                return None
            calls.append({"name": decode(head[:cut]), "arguments": arguments, "id": decode(head[cut + 1:])})
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"] for c in calls):
        return None
    return [{"id": c["id"] if isinstance(c.get("id"), str) and c["id"] else new_call_id(), "type": "function",
             "function": {"name": c["name"], "arguments": _json_value(c.get("arguments"))}} for c in calls]
