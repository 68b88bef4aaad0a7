"""JSON mode (Ollama's `format: "json"`, OpenAI's `response_format: {"type": "json_object"}`): the answer is held
to one JSON object, as llama.cpp's json grammar holds it, by letting the sampler draw only tokens whose text keeps
it the beginning of one (`JsonConstraint`); the answer ends when the object closes.

`json_step` reads a character at a time with a state that is a tuple, so a candidate token's text is tried from
the current state without copying anything. Whitespace between tokens is limited to MAX_WHITESPACE characters in
a row (a model held to JSON otherwise may write newlines for ever).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .errors import LilmistralError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

MAX_WHITESPACE = 20
WHITESPACE = " \t\n\r"
DIGITS = "0123456789"
LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
# number parts: after "-", after a leading 0, in the integer, after ".", in the fraction, after e, after its sign,
# in the exponent; those a number may end in
NUMBER_ENDS = {"zero", "int", "frac", "exp"}
# a state: (the open containers, "{" or "[", innermost last; what comes next; its detail; whitespace in a row)
State = tuple[str, str, str, int]
START: State = ("", "object", "", 0)  # the answer is one object


def _after_value(stack: str) -> State:
    return (stack, "after", "", 0) if stack else (stack, "done", "", 0)


def _value(stack: str, ch: str) -> State | None:
    """A value starting with `ch`."""
    if ch == "{":
        return stack + "{", "key_or_close", "", 0
    if ch == "[":
        return stack + "[", "value_or_close", "", 0
    if ch == '"':
        return stack, "string", "", 0
    if ch == "-":
        return stack, "number", "minus", 0
    if ch in DIGITS:
        return stack, "number", "zero" if ch == "0" else "int", 0
    if ch in LITERALS:
        return stack, "literal", LITERALS[ch], 0
    return None


def _number(part: str, ch: str) -> str | None:
    """The number's part after `ch`, None where `ch` cannot continue it."""
    if ch in DIGITS:
        return {"minus": "zero" if ch == "0" else "int", "int": "int", "dot": "frac", "frac": "frac", "e": "exp",
                "esign": "exp", "exp": "exp"}.get(part)
    if ch == ".":
        return "dot" if part in ("zero", "int") else None
    if ch in "eE":
        return "e" if part in ("zero", "int", "frac") else None
    if ch in "+-":
        return "esign" if part == "e" else None
    return None


def json_step(state: State, ch: str) -> State | None:
    """The state after `ch`, or None where `ch` cannot come next in one JSON object."""
    stack, mode, detail, spaces = state
    if mode == "string":  # detail: "k" for an object's key
        if ch == '"':
            return (stack, "colon", "", 0) if detail == "k" else _after_value(stack)
        if ch == "\\":
            return stack, "escape", detail, 0
        return None if ord(ch) < 0x20 else state
    if mode == "escape":
        if ch == "u":
            return stack, "unicode", detail + "4", 0
        return (stack, "string", detail, 0) if ch in '"\\/bfnrt' else None
    if mode == "unicode":  # detail: the string's, then the hex digits still to come
        if ch not in "0123456789abcdefABCDEF":
            return None
        left = int(detail[-1]) - 1
        return (stack, "string", detail[:-1], 0) if left == 0 else (stack, "unicode", detail[:-1] + str(left), 0)
    if mode == "number":
        part = _number(detail, ch)
        if part is not None:
            return stack, "number", part, 0
        if detail not in NUMBER_ENDS:
            return None
        return json_step(_after_value(stack), ch)
    if mode == "literal":
        if ch != detail[0]:
            return None
        return (stack, "literal", detail[1:], 0) if len(detail) > 1 else _after_value(stack)
    if ch in WHITESPACE:  # not before the object, as llama.cpp's grammar, nor after it
        return (stack, mode, detail, spaces + 1) if spaces < MAX_WHITESPACE and mode not in ("object", "done") \
            else None
    if mode == "object":
        return (stack + "{", "key_or_close", "", 0) if ch == "{" else None
    if mode in ("key_or_close", "key"):
        if ch == '"':
            return stack, "string", "k", 0
        return _after_value(stack[:-1]) if ch == "}" and mode == "key_or_close" else None
    if mode == "colon":
        return (stack, "value", "", 0) if ch == ":" else None
    if mode == "value_or_close" and ch == "]":
        return _after_value(stack[:-1])
    if mode in ("value", "value_or_close"):
        return _value(stack, ch)
    if mode == "after":
        if ch == ",":
            return (stack, "key", "", 0) if stack[-1] == "{" else (stack, "value", "", 0)
        if ch == "}]"[stack[-1] == "["]:
            return _after_value(stack[:-1])
    return None  # done: nothing may follow


def json_steps(state: State | None, text: str) -> State | None:
    for ch in text:
        if state is None:
            return None
        state = json_step(state, ch)
    return state


class JsonConstraint:
    """Which tokens may come next in an answer held to one JSON object, by their text. A token's text is taken
    once, after a token of "a" (so that SentencePiece's "▁" is a space, as within an answer); a byte of a
    character split across tokens is U+FFFD, which only a string may hold. A token that writes nothing (a
    control token, an end of sequence) may not come before the object closes; `finished` says it has."""

    SCAN = 2048

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.decode = tokenizer.decode
        self.anchor = tokenizer.encode("a")[-1:]
        self.anchor_text = self.decode(self.anchor)
        self.texts: dict[int, str] = {}
        self.state: State | None = START

    @property
    def finished(self) -> bool:
        return self.state is not None and self.state[1] == "done"

    def _text(self, token: int) -> str:
        if token not in self.texts:
            self.texts[token] = self.decode([*self.anchor, token])[len(self.anchor_text):]
        return self.texts[token]

    def _after(self, token: int) -> State | None:
        text = self._text(token)
        return json_steps(self.state, text) if text else None

    def allowed(self, logits: torch.Tensor, wanted: int) -> torch.Tensor:
        """`logits` with every token but the `wanted` likeliest of those allowed set to -inf: of the SCAN likeliest
        tokens, or past them until one is allowed (where few tokens may come next, a colon, say, the unlikely rest
        of the vocabulary is not searched for more). Candidates are tried in order of their logits, the first
        256, then 8 times more while too few are allowed."""
        keep, tried, k = [], 0, 256
        while (len(keep) < wanted and tried < self.SCAN or not keep) and tried < logits.numel():
            k = min(k, logits.numel())
            for token in torch.topk(logits, k).indices[tried:].tolist():
                if self._after(token) is not None:
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
        self.state = self._after(token)
