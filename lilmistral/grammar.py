"""Structured answers: JSON mode (Ollama's `format: "json"`, OpenAI's `response_format: {"type": "json_object"}`)
holds the answer to one JSON object, and a JSON schema (Ollama's `format: {...}`, OpenAI's `json_schema`) to a value
the schema accepts, as llama.cpp's grammars do: the sampler draws only tokens whose text keeps the answer the
beginning of one (`JsonConstraint`), and the answer ends when the value does.

`Grammar` reads a character at a time. A state is a tuple (the frames still open, innermost last; whitespace in a
row), so a candidate token's text is tried from the current states without copying anything; where the schema
leaves a choice open (anyOf, an optional property, enum values that share a beginning) there are several states at
once. Whitespace between tokens is limited to MAX_WHITESPACE characters in a row (a model held to JSON otherwise may
write newlines for ever); none comes before the value or after it.

A schema's properties come in the order it lists them (optional ones may be left out; more properties, where
`additionalProperties` allows them, only after every required one), as llama.cpp writes them. Enforced: type,
properties, required, additionalProperties, items, prefixItems, minItems, maxItems, enum, const, anyOf, oneOf (as
anyOf), allOf of one schema, minLength, maxLength, and $ref into the schema's own $defs/definitions. Not enforced
(accepted, as llama.cpp leaves most of them): number bounds, pattern, format, uniqueItems. Refused: the rest.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import LilmistralError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

MAX_WHITESPACE = 20
MAX_STATES = 1024  # ways a schema may leave open at once (anyOf options alike, nested: they multiply)
WHITESPACE = " \t\n\r"
DIGITS = "0123456789"
# number parts: after "-", after a leading 0, in the integer, after ".", in the fraction, after e, after its sign,
# in the exponent; those a number may end in
NUMBER_ENDS = {"zero", "int", "frac", "exp"}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly", "$defs", "definitions", "discriminator"}  # discriminator: a hint
NOT_ENFORCED = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "pattern", "format",
                "uniqueItems", "minProperties", "maxProperties", "contentEncoding", "contentMediaType"}
KNOWN = ANNOTATIONS | NOT_ENFORCED | {"type", "properties", "required", "additionalProperties", "items", "prefixItems",
                                      "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "minLength",
                                      "maxLength", "$ref"}
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
# a frame: ("value", node) a value to come | ("obj", node, next property, phase, the value's node) |
# ("arr", node, values so far, phase) | ("str", least, most, characters so far, escape) | ("num", integer, part) |
# ("lit", text still to come)
Frame = tuple
State = tuple[tuple[Frame, ...], int]


@dataclass(frozen=True)
class Node:
    """A compiled schema: "anyof" (options), "object" (properties (key's JSON texts, node, required),
    extra: the node of further properties' values or None), "array" (prefix, items or None, least, most),
    "string" (least, most), "number", "integer", "literal" (texts)."""

    kind: str
    options: tuple[int, ...] = ()
    properties: tuple[tuple[tuple[str, ...], int, bool], ...] = ()
    extra: int | None = None
    prefix: tuple[int, ...] = ()
    items: int | None = None
    least: int = 0
    most: int | None = None
    texts: tuple[str, ...] = ()
    last_required: int = -1  # the index of the last required property


def _invalid(message: str) -> LilmistralError:
    return LilmistralError(f"format: {message}")


def _texts(value: Any) -> tuple[str, ...]:
    """A scalar's JSON texts: non-ASCII characters as they are, or escaped."""
    return tuple(dict.fromkeys((json.dumps(value, ensure_ascii=False), json.dumps(value))))


def schema_of(format: Any) -> Any:
    """A pydantic model class's JSON schema; any other format as it is."""
    return format.model_json_schema() if isinstance(format, type) and hasattr(format, "model_json_schema") else format


def _number(part: str, ch: str, integer: bool) -> str | None:
    """The number's part after `ch`, None where `ch` cannot continue it."""
    if ch in DIGITS:
        return {"minus": "zero" if ch == "0" else "int", "int": "int", "dot": "frac", "frac": "frac", "e": "exp",
                "esign": "exp", "exp": "exp"}.get(part)
    if integer:
        return None
    if ch == ".":
        return "dot" if part in ("zero", "int") else None
    if ch in "eE":
        return "e" if part in ("zero", "int", "frac") else None
    if ch in "+-":
        return "esign" if part == "e" else None
    return None


class Grammar:
    """The answers `format` allows: "json" (one JSON object), a JSON schema (a dict), or a pydantic model class (its
    model_json_schema())."""

    def __init__(self, format: str | dict[str, Any] | type) -> None:
        self.nodes: list[Node] = []
        self.refs: dict[str, int] = {}
        format = schema_of(format)
        if format == "json":
            self.schema: dict[str, Any] = {"type": "object"}
        elif isinstance(format, dict):
            self.schema = format
        else:
            raise _invalid(f"{format!r} is not one lilmistral has (json, or a JSON schema object)")
        self.any = self._add(Node("anyof"))  # any JSON value
        self.nodes[self.any] = Node("anyof", options=(
            self._add(Node("object", extra=self.any)), self._add(Node("array", items=self.any)),
            self._add(Node("string")), self._add(Node("number")), self._add(Node("literal", texts=("true", "false",
                                                                                                  "null")))))
        try:
            root = self._compile(self.schema, "#")
        except RecursionError:
            raise _invalid("the schema nests too deeply") from None
        if self._may_be_number(root):
            raise _invalid("an answer that is a bare number is not supported (its end cannot be told)")
        self.start: tuple[State, ...] = (((("value", root),), 0),)

    # compiling a schema

    def _add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _ref(self, ref: Any) -> int:
        if ref not in self.refs:
            parts = ref.split("/") if isinstance(ref, str) else []
            if parts[:1] != ["#"]:
                raise _invalid(f"$ref {ref!r}: only references within the schema (#/...) are supported")
            target: Any = self.schema
            for part in parts[1:]:
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or part not in target:
                    raise _invalid(f"$ref {ref!r} points at nothing in the schema")
                target = target[part]
            self.refs[ref] = slot = self._add(Node("anyof"))
            self.nodes[slot] = Node("anyof", options=(self._compile(target, ref),))
        return self.refs[ref]

    def _compile(self, schema: Any, where: str) -> int:
        if schema is True or schema == {}:
            return self.any
        if not isinstance(schema, dict):
            raise _invalid(f"{where}: a schema is an object (or true), not {json.dumps(schema)[:40]}")
        unknown = sorted(set(schema) - KNOWN)
        if unknown:
            raise _invalid(f"{where}: the schema keyword {unknown[0]!r} is not supported")
        if "$ref" in schema:
            return self._ref(schema["$ref"])
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if not isinstance(values, list) or not values:
                raise _invalid(f"{where}: enum must be a list of at least one value")
            scalars = tuple(dict.fromkeys(t for v in values if not isinstance(v, dict | list) for t in _texts(v)))
            options = [self._const(v) for v in values if isinstance(v, dict | list)]
            options += [self._add(Node("literal", texts=scalars))] if scalars else []
            return options[0] if len(options) == 1 else self._add(Node("anyof", options=tuple(options)))
        for word in ("anyOf", "oneOf", "allOf"):
            if word in schema:
                options = schema[word]
                if not isinstance(options, list) or not options or word == "allOf" and len(options) != 1:
                    raise _invalid(f"{where}: {word} must be a list of " + ("one schema" if word == "allOf" else
                                                                            "at least one schema"))
                rest = {k: v for k, v in schema.items() if k != word and k not in ANNOTATIONS}
                if rest:
                    raise _invalid(f"{where}: {word} beside {sorted(rest)[0]!r} is not supported")
                return self._add(Node("anyof", options=tuple(self._compile(s, f"{where}/{word}/{i}")
                                                              for i, s in enumerate(options))))
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind:
                raise _invalid(f"{where}: type must name at least one type")
            return self._add(Node("anyof", options=tuple(self._compile(schema | {"type": k}, where) for k in kind)))
        if kind is None:
            if {"properties", "additionalProperties", "required"} & set(schema):
                kind = "object"
            elif {"items", "prefixItems"} & set(schema):
                kind = "array"
            else:
                return self.any
        if kind not in TYPES:
            raise _invalid(f"{where}: type {kind!r} is not one of {', '.join(TYPES)}")
        if kind == "object":
            return self._object(schema, where)
        if kind == "array":
            return self._array(schema, where)
        if kind == "string":
            least, most = self._bounds(schema, "minLength", "maxLength", where)
            return self._add(Node("string", least=least, most=most))
        if kind in ("number", "integer"):
            return self._add(Node(kind))
        return self._add(Node("literal", texts=("true", "false") if kind == "boolean" else ("null",)))

    def _const(self, value: Any) -> int:
        """A node for exactly `value`, with whitespace where JSON allows it."""
        if isinstance(value, dict):
            return self._add(Node("object", properties=tuple((_texts(k), self._const(v), True)
                                                             for k, v in value.items()), last_required=len(value) - 1))
        if isinstance(value, list):
            return self._add(Node("array", prefix=tuple(self._const(v) for v in value), least=len(value)))
        return self._add(Node("literal", texts=_texts(value)))

    @staticmethod
    def _bounds(schema: dict[str, Any], low: str, high: str, where: str) -> tuple[int, int | None]:
        least, most = schema.get(low, 0), schema.get(high)
        for value in (least, most):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise _invalid(f"{where}: {low} and {high} must be whole numbers >= 0")
        if most is not None and most < least:
            raise _invalid(f"{where}: {low} {least} is more than {high} {most}")
        return least, most

    def _object(self, schema: dict[str, Any], where: str) -> int:
        properties, required = schema.get("properties", {}), schema.get("required", [])
        if not isinstance(properties, dict) or not isinstance(required, list):
            raise _invalid(f"{where}: properties must be an object and required a list")
        missing = [name for name in required if name not in properties]
        if missing:
            raise _invalid(f"{where}: required property {missing[0]!r} is not among the properties")
        extra = schema.get("additionalProperties", None if properties else True)
        node = self._add(Node("object"))
        names = list(properties)
        self.nodes[node] = Node("object", properties=tuple(
            (_texts(name), self._compile(value, f"{where}/properties/{name}"),
             name in required) for name, value in properties.items()),
            extra=None if extra is None or extra is False else self._compile(extra, f"{where}/additionalProperties"),
            last_required=max((names.index(name) for name in required), default=-1))
        return node

    def _array(self, schema: dict[str, Any], where: str) -> int:
        prefix, items = schema.get("prefixItems", []), schema.get("items", True)
        if not isinstance(prefix, list):
            raise _invalid(f"{where}: prefixItems must be a list of schemas")
        least, most = self._bounds(schema, "minItems", "maxItems", where)
        node = self._add(Node("array"))
        prefix_nodes = tuple(self._compile(s, f"{where}/prefixItems/{i}") for i, s in enumerate(prefix))
        items_node = None if items is False else self._compile(items, f"{where}/items")
        if items_node is None and least > len(prefix):
            raise _invalid(f"{where}: minItems {least} is more than the {len(prefix)} items it allows")
        self.nodes[node] = Node("array", prefix=prefix_nodes, items=items_node, least=least, most=most)
        return node

    def _may_be_number(self, node: int, seen: tuple[int, ...] = ()) -> bool:
        n = self.nodes[node]
        if n.kind == "anyof":
            return any(self._may_be_number(option, (*seen, node)) for option in n.options if option not in seen)
        return n.kind in ("number", "integer")

    # reading an answer

    def _begin(self, node: int, ch: str, seen: tuple[int, ...] = ()) -> list[tuple[Frame, ...]]:
        """The frames of a value of `node` that begins with `ch` (one list entry for each way it may)."""
        n = self.nodes[node]
        if n.kind == "anyof":
            return [frames for option in n.options if option not in seen
                    for frames in self._begin(option, ch, (*seen, node))]
        if n.kind == "object":
            return [(("obj", node, 0, "open", 0),)] if ch == "{" else []
        if n.kind == "array":
            return [(("arr", node, 0, "open"),)] if ch == "[" else []
        if n.kind == "string":
            return [(("str", n.least, n.most, 0, ""),)] if ch == '"' else []
        if n.kind in ("number", "integer"):
            part = "minus" if ch == "-" else _number("minus", ch, True)
            return [(("num", n.kind == "integer", part),)] if part else []
        return [(("lit", text[1:]),) if len(text) > 1 else () for text in n.texts if text[0] == ch]

    def step(self, state: State, ch: str) -> list[State]:
        """The states after `ch` (none where it cannot come next)."""
        stack, spaces = state
        if not stack:
            return []  # the value is finished: nothing may follow
        top, rest = stack[-1], stack[:-1]
        kind = top[0]
        if kind == "str":
            if top[4] == "" and ch != '"' and ch != "\\" and ch >= " " and (top[2] is None or top[3] < top[2]):
                return [((*rest, ("str", top[1], top[2], top[3] + 1, "")), 0)]  # the common case, first
            return self._string(rest, top, ch)
        if kind == "num":
            part = _number(top[2], ch, top[1])
            if part is not None:
                return [((*rest, ("num", top[1], part)), 0)]
            return self.step((rest, 0), ch) if top[2] in NUMBER_ENDS else []
        if kind == "lit":
            if ch != top[1][0]:
                return []
            return [((*rest, ("lit", top[1][1:])) if len(top[1]) > 1 else rest, 0)]
        if ch in WHITESPACE:
            return [(stack, spaces + 1)] if spaces < MAX_WHITESPACE and (rest or kind != "value") else []
        if kind == "value":
            return [((*rest, *frames), 0) for frames in self._begin(top[1], ch)]
        if kind == "obj":
            return self._object_step(rest, top, ch)
        return self._array_step(rest, top, ch)

    def _string(self, rest: tuple[Frame, ...], top: Frame, ch: str) -> list[State]:
        _, least, most, length, escape = top
        if escape == "":
            if ch == '"':
                return [(rest, 0)] if length >= least else []
            if most is not None and length >= most or ord(ch) < 0x20:
                return []
            return [((*rest, ("str", least, most, length, "\\") if ch == "\\" else
                      ("str", least, most, length + 1, "")), 0)]
        if escape == "\\":  # an escape counts as the one character it writes
            if ch == "u":
                return [((*rest, ("str", least, most, length, "4")), 0)]
            return [((*rest, ("str", least, most, length + 1, "")), 0)] if ch in '"\\/bfnrt' else []
        if ch not in "0123456789abcdefABCDEF":
            return []
        left = int(escape) - 1
        return [((*rest, ("str", least, most, length, str(left)) if left else ("str", least, most, length + 1, "")),
                 0)]

    def _object_step(self, rest: tuple[Frame, ...], top: Frame, ch: str) -> list[State]:
        _, node, next_property, phase, _ = top
        n = self.nodes[node]
        done = next_property > n.last_required  # every required property written
        if phase in ("open", "key") and ch == '"':
            # the next property, or one after it where those between are optional; or one the schema does not name
            states = []
            for i in range(next_property, len(n.properties)):
                keys, value, required = n.properties[i]
                states += [((*rest, ("obj", node, i + 1, "colon", value), ("lit", key[1:])), 0) for key in keys]
                if required:
                    break
            if n.extra is not None and done:
                states.append(((*rest, ("obj", node, len(n.properties), "colon", n.extra), ("str", 0, None, 0, "")), 0))
            return states
        if phase == "colon" and ch == ":":
            return [((*rest, ("obj", node, next_property, "after", 0), ("value", top[4])), 0)]
        if phase == "after" and ch == "," and (next_property < len(n.properties) or n.extra is not None):
            return [((*rest, ("obj", node, next_property, "key", 0)), 0)]
        if phase in ("open", "after") and ch == "}" and done:
            return [(rest, 0)]
        return []

    def _array_step(self, rest: tuple[Frame, ...], top: Frame, ch: str) -> list[State]:
        _, node, count, phase = top
        n = self.nodes[node]
        item = n.prefix[count] if count < len(n.prefix) else n.items
        more = item is not None and (n.most is None or count < n.most)
        if phase == "after":
            if ch == ",":
                return [((*rest, ("arr", node, count, "value")), 0)] if more else []
            return [(rest, 0)] if ch == "]" and count >= n.least else []
        if phase == "open" and ch == "]":
            return [(rest, 0)] if count >= n.least else []
        if not more:
            return []
        return self.step(((*rest, ("arr", node, count + 1, "after"), ("value", item)), 0), ch)

    def steps(self, states: tuple[State, ...], text: str) -> tuple[State, ...]:
        """The states after `text` (none where it cannot come next)."""
        for ch in text:
            if len(states) == 1:
                states = self.step(states[0], ch)
            else:
                states = list(dict.fromkeys(s for state in states for s in self.step(state, ch)))
                if len(states) > MAX_STATES:
                    raise _invalid(f"the schema leaves over {MAX_STATES} ways open at once (anyOf options that "
                                   "begin alike, nested)")
            if not states:
                return ()
        return tuple(states)

    def accepts(self, text: str) -> bool:
        """Whether `text` is a whole answer the format allows."""
        return any(not stack for stack, _ in self.steps(self.start, text))


class JsonConstraint:
    """Which tokens may come next in an answer held to a `Grammar`, by their text. A token's text is taken once,
    after a token of "a" (so that SentencePiece's "▁" is a space, as within an answer); a byte of a character split
    across tokens is U+FFFD, which only a string may hold. A token that writes nothing (a control token, an end of
    sequence) may not come before the value is finished; `finished` says it is."""

    SCAN = 2048

    def __init__(self, tokenizer: Tokenizer, grammar: Grammar) -> None:
        self.decode = tokenizer.decode
        self.anchor = tokenizer.encode("a")[-1:]
        self.anchor_text = self.decode(self.anchor)
        self.texts: dict[int, str] = {}
        self.grammar = grammar
        self.states = grammar.start

    @property
    def finished(self) -> bool:
        return any(not stack for stack, _ in self.states)

    def _text(self, token: int) -> str:
        if token not in self.texts:
            self.texts[token] = self.decode([*self.anchor, token])[len(self.anchor_text):]
        return self.texts[token]

    def _after(self, token: int) -> tuple[State, ...]:
        text = self._text(token)
        return self.grammar.steps(self.states, text) if text else ()

    def allowed(self, logits: torch.Tensor, wanted: int) -> torch.Tensor:
        """`logits` with every token but the `wanted` likeliest of those allowed set to -inf: of the SCAN likeliest
        tokens, or past them until one is allowed (where few tokens may come next, a colon, say, the unlikely rest
        of the vocabulary is not searched for more). Candidates are tried in order of their logits, the first
        256, then 8 times more while too few are allowed."""
        keep, tried, k = [], 0, 256
        while (len(keep) < wanted and tried < self.SCAN or not keep) and tried < logits.numel():
            k = min(k, logits.numel())
            for token in torch.topk(logits, k).indices[tried:].tolist():
                if self._after(token):
                    keep.append(token)
                    if len(keep) == wanted:
                        break
            tried, k = k, k * 8
        if not keep:
            raise LilmistralError("no token of this vocabulary goes on with the JSON answer")
        masked = torch.full_like(logits, -math.inf)
        masked[keep] = logits[keep]
        return masked

    def advance(self, token: int) -> None:
        self.states = self._after(token)
