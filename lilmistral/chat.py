"""Chat templates from model files (GGUF `tokenizer.chat_template`, HF `chat_template`), rendered in a sandbox.

A template comes from an untrusted file: Jinja's immutable sandbox keeps it away from Python internals
(attribute access to dunders, mutation of the messages, calling unsafe methods).
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import LilmistralError


def _raise(message: str) -> None:
    raise LilmistralError(f"chat template: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat_template(source: str, messages: list[dict[str, Any]], **variables: Any) -> str:
    """Render with `add_generation_prompt=True`, as HF and llama.cpp do for a reply."""
    try:
        return _compile(source).render(messages=messages, add_generation_prompt=True, **variables)
    except LilmistralError:
        raise
    except TemplateError as e:  # includes the sandbox's SecurityError
        raise LilmistralError(f"chat template failed: {e}") from None
