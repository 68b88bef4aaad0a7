"""The public `LLM` object: a loaded model, its tokenizer and its KV cache."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .cache import RollingKVCache
from .config import ModelArgs
from .errors import ContextLengthError, LilmistralError
from .generate import PREFILL_CHUNK, DecodeStep, SamplingParams, generate_tokens, prefill
from .grammar import Grammar, JsonConstraint
from .model import Transformer
from .threads import release_threads
from .tokenizer import Message, StreamDecoder, Tokenizer

DEFAULT_NUM_CTX = 8192


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens in the prompt
    prefill_tokens: int = 0  # of those, tokens actually run (the rest came from the cache)
    prefill_s: float = 0.0
    eval_tokens: int = 0
    eval_s: float = 0.0
    dropped_messages: int = 0  # oldest messages left out to fit the context
    # why the answer ended, as Ollama's done_reason: "length" (max_tokens), "context" (the context filled up),
    # else "stop" (an end-of-sequence token, a stop string, or the reader stopped)
    done_reason: str = "stop"


class LLM:
    """Use `lilmistral.load()` to make one."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, num_ctx: int | None = None,
                 source: str = "", info: dict[str, Any] | None = None, compile: bool = False) -> None:
        self.model = model
        self.decode_step = DecodeStep(model, compile)
        self.tokenizer = tokenizer
        self.args: ModelArgs = model.args
        self.source = source
        self.info = info or {}
        self.stats = GenerationStats()
        self.load_s = 0.0  # seconds lilmistral.load() took (set by it)
        self.tool_calls: list[dict[str, Any]] = []  # the last chat()'s, as an assistant message's "tool_calls"
        self.sampling_defaults: dict[str, Any] = {}  # the model's recommended options, under the caller's (set by load)
        self.resize_context(num_ctx or DEFAULT_NUM_CTX)

    def resize_context(self, num_ctx: int) -> None:
        """(Re)allocate the KV cache for num_ctx tokens (capped at the model's maximum)."""
        if num_ctx < 16:
            raise LilmistralError("num_ctx must be at least 16")
        self.num_ctx = min(num_ctx, self.args.max_seq_len)
        param = self.model.tok_embeddings.weight
        if hasattr(self.model, "resize_context"):  # a pipeline: the other stages resize their caches too
            self.model.resize_context(self.num_ctx)
        self.cache = None  # free the old one first
        layers = getattr(self.model, "cache_layers", self.args.n_layers)  # a pipeline's first stage: its own
        self.cache = RollingKVCache.for_context(self.args, layers, self.num_ctx,
                                                param.dtype if param.is_floating_point() else torch.bfloat16,
                                                param.device)
        self._cached_ids: list[int] = []  # the tokens whose keys and values the cache holds

    def warm_up(self) -> None:
        """Run a short generation so that one-off costs (the decode step's trace or compile, GPU kernels' builds)
        are paid now: on a GPU a 16-token prompt, more rows than the decode GEMV takes (8), so that prefill's
        kernels are built too, not during the first answer's prompt."""
        prompt = 16 if self.cache.device.type == "cuda" else 3
        list(self.generate(list(range(1, prompt + 1)), temperature=0, max_tokens=3))
        self.cache.reset()
        self._cached_ids = []

    def close(self) -> None:
        """Stop a pipeline's worker processes (nothing to do for a single process)."""
        if hasattr(self.model, "close"):
            self.model.close()

    @torch.inference_mode()
    def forward(self, ids: list[int]) -> torch.Tensor:
        """float32 logits [len(ids), vocab], through the same chunked-prefill cache path as generation."""
        self.cache.reset()
        self._cached_ids = []
        logits = prefill(self.model, self.cache, list(ids), all_logits=True)
        self._cached_ids = list(ids)
        return logits

    def generate(self, ids: list[int], **sampling: Any) -> Iterator[int]:
        """Stream token ids after `ids`; sampling options as `SamplingParams` (those not given: the model's
        recommended ones, else SamplingParams' defaults)."""
        params = SamplingParams.from_kwargs(**(self.sampling_defaults | sampling))
        return self._generate(list(ids), params)

    def _reuse_prefix(self, ids: list[int]) -> None:
        """Keep the cached keys of the longest common prefix (at least one token is always recomputed)."""
        common = 0
        for a, b in zip(self._cached_ids, ids):
            if a != b:
                break
            common += 1
        if not self.cache.rewind(min(common, len(ids) - 1)):
            self.cache.reset()

    def _generate(self, ids: list[int], params: SamplingParams) -> Iterator[int]:
        if not ids:
            raise ValueError("generate needs at least one prompt token")
        if self.cache.window is None and len(ids) >= self.cache.size:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens; the context holds {self.cache.size} "
                                     f"(raise num_ctx, up to {self.args.max_seq_len})")
        self._reuse_prefix(ids)
        self.stats = GenerationStats(prompt_tokens=len(ids), prefill_tokens=len(ids) - self.cache.length,
                                     dropped_messages=self.stats.dropped_messages)
        generated: list[int] = []
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                constraint = None if params.format is None else JsonConstraint(self.tokenizer, Grammar(params.format))
                tokens = generate_tokens(self.model, self.cache, ids, params, self.tokenizer.eos_ids,
                                         self.decode_step, constraint=constraint)
                while True:
                    try:
                        token = next(tokens)
                    except StopIteration as end:
                        self.stats.done_reason = end.value
                        return
                    now = time.perf_counter()
                    if not generated:
                        self.stats.prefill_s = now - start
                        start = now
                    generated.append(token)
                    self.stats.eval_tokens = len(generated)
                    self.stats.eval_s = now - start
                    yield token
        finally:
            self._cached_ids = (ids + generated)[:self.cache.length]
            release_threads()  # the next answer may be asked for on another thread

    def tokenize_chat(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
                      settings: dict[str, Any] | None = None) -> list[int]:
        """The exact prompt ids for a list of {"role", "content"} messages (and the tools they may call; Mistral
        v15's model settings: `tokenizer.model_settings()`'s, by default its defaults)."""
        return self.tokenizer.encode_chat(messages, tools, settings)

    def fit_messages(self, messages: list[Message], reserve: int, tools: list[dict[str, Any]] | None = None,
                     settings: dict[str, Any] | None = None) -> list[Message]:
        """Drop the oldest turns (a user message and the answers, tool calls and results after it; never the
        system prompt or the last user message) until the prompt leaves `reserve` tokens for the answer.
        Sliding-window models never need to."""
        if self.cache.window is not None:
            return messages
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system):]
        while len(self.tokenize_chat(system + turns, tools, settings)) + reserve > self.num_ctx:
            later = [i for i, m in enumerate(turns) if i > 0 and m["role"] == "user"]
            if not later:
                raise ContextLengthError(f"the last message does not fit num_ctx={self.num_ctx} "
                                         f"with {reserve} tokens left for the answer")
            turns = turns[later[0]:]
        return system + turns

    def chat(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
             reasoning_effort: str | None = None, **sampling: Any) -> Iterator[str]:
        """Stream the assistant's answer as text pieces (whole UTF-8 characters), stopping at stop strings;
        sampling options as `generate`'s. With `tools` (OpenAI's and Ollama's form), an answer that calls them
        (Mistral's formats) leaves its calls in `self.tool_calls` once the stream ends. A model whose tokenizer
        (Mistral's v15) takes settings gets `reasoning_effort` (else its default) and the `format`'s schema."""
        params = SamplingParams.from_kwargs(**(self.sampling_defaults | sampling))
        settings = self.tokenizer.model_settings(params.format, reasoning_effort)
        reserve = min(params.max_tokens or 512, self.num_ctx // 4)
        fitted = self.fit_messages(list(messages), reserve, tools, settings)
        self.stats.dropped_messages = len(messages) - len(fitted)
        self.tool_calls = []
        tokens = self._generate(self.tokenize_chat(fitted, tools, settings), params)
        return stream_text(tokens, self.tokenizer, params.stop, self.tool_calls if tools else None)

    def complete(self, prompt: str, suffix: str | None = None, **sampling: Any) -> Iterator[str]:
        """Stream the text that follows `prompt` (no chat format; the tokenizer's BOS first), or with `suffix` the
        text that goes between them (fill-in-the-middle, Codestral's format); sampling options as `generate`'s."""
        ids = self.tokenizer.encode(prompt, bos=self.tokenizer.bos_id >= 0) if suffix is None else \
            self.tokenizer.encode_fim(prompt, suffix)
        params = SamplingParams.from_kwargs(**(self.sampling_defaults | sampling))
        return stream_text(self._generate(ids, params), self.tokenizer, params.stop)

    @torch.inference_mode()
    def embed(self, texts: str | list[str], truncate: bool = True, normalize: bool = True) -> torch.Tensor:
        """float32 embeddings [len(texts), dim], as Ollama's /api/embed makes them: the final hidden states (after
        the last norm) of each text's tokens (the tokenizer's BOS first) averaged, then scaled to length 1 (unless
        not `normalize`: Ollama's older /api/embeddings). A text longer than the context is cut to it
        (`truncate`), or refused. `stats` counts the tokens run."""
        if not hasattr(self.model, "run_layers"):
            raise LilmistralError("embeddings are not available with pipeline stages (pp > 1)")
        start, vectors = time.perf_counter(), []
        self.stats = GenerationStats()
        for text in [texts] if isinstance(texts, str) else texts:
            ids = self.tokenizer.encode(text, bos=self.tokenizer.bos_id >= 0)
            if len(ids) > self.num_ctx and not truncate:
                raise ContextLengthError(f"the input has {len(ids)} tokens; the context holds {self.num_ctx}")
            ids = ids[:self.num_ctx]
            self.stats.prompt_tokens += len(ids)
            self.cache.reset()
            self._cached_ids = []
            chunks = torch.tensor(ids, device=self.cache.device).split(self.cache.window or PREFILL_CHUNK)
            hidden = [self.model.norm(self.model.run_layers(self.model.tok_embeddings(chunk), self.cache)).float()
                      for chunk in chunks]
            vectors.append(torch.cat(hidden).mean(0))
        self.cache.reset()
        release_threads()
        self.stats.prefill_tokens, self.stats.prefill_s = self.stats.prompt_tokens, time.perf_counter() - start
        vectors = torch.stack(vectors)
        return (torch.nn.functional.normalize(vectors, dim=-1) if normalize else vectors).cpu()


def _partial_stop(text: str, stop: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (and so must be held back)."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class Thinking(str):
    """A piece of an answer's thinking (a reasoning model's text between its [THINK] and [/THINK] tokens, Mistral's
    v13 and later): a `str`, so that pieces joined are the text they were before thinking was told apart."""


def stream_text(tokens: Iterator[int], tokenizer: Tokenizer, stop: list[str],
                tool_calls: list[dict[str, Any]] | None = None) -> Iterator[str]:
    """Text pieces of a token stream; ends before the first stop string, which is not emitted. Given a list
    `tool_calls`, and a Mistral format: the text ends at a [TOOL_CALLS] token, the calls after it go into the
    list (their text into the answer where they are not well formed). In a Mistral format, text between [THINK]
    and [/THINK] comes as `Thinking` pieces, which stop strings do not end."""
    calls_id = tokenizer.control_id("[TOOL_CALLS]") if tool_calls is not None and tokenizer.instruct_version else None
    think, done_thinking = (tokenizer.control_id(t) if tokenizer.instruct_version else None
                            for t in ("[THINK]", "[/THINK]"))
    decoder = StreamDecoder(tokenizer.decode)
    held, thinking = "", False
    for token in tokens:
        if thinking or (think is not None and token == think):
            if held:  # text held back (the start of a stop string, maybe) comes before the thinking
                yield held
                held = ""
            thinking = token != done_thinking
            if piece := decoder.push(token):
                yield Thinking(piece)
            continue
        if token == calls_id:
            rest = [token, *tokens]
            calls = tokenizer.parse_tool_calls(rest)
            tool_calls.extend(calls or [])
            held += "" if calls else tokenizer.decode(rest)
            break
        held += decoder.push(token)
        hits = [i for i in (held.find(s) for s in stop if s) if i >= 0]
        if hits:
            if held[:min(hits)]:
                yield held[:min(hits)]
            close = getattr(tokens, "close", None)
            if close:
                close()  # lets the generator record what the cache holds
            return
        cut = len(held) - _partial_stop(held, stop)
        if cut > 0:
            yield held[:cut]
            held = held[cut:]
    if held:
        yield held
