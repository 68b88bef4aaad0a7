"""Prefill, incremental decode and sampling. Generation is an iterator and never prints."""
from __future__ import annotations

import math
import types
import warnings
import weakref
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field, fields

import torch

from .cache import RollingKVCache
from .errors import LilmistralError
from .grammar import Grammar, JsonConstraint
from .model import Experts, Transformer
from .quant import vnni

PREFILL_CHUNK = 512  # tokens per prefill step for models without a sliding window
NO_IDS = torch.empty(0, dtype=torch.long)
INT32_MAX = 2**31 - 1


@dataclass
class SamplingParams:
    """Ollama's defaults; temperature 0 is greedy."""

    temperature: float = 0.8
    top_k: int = 40  # 0: off
    top_p: float = 0.9  # 1.0: off
    repeat_penalty: float = 1.1  # 1.0: off
    repeat_last_n: int = 64  # 0: off; -1: every token so far (as Ollama)
    seed: int | None = None
    max_tokens: int | None = None  # None: until EOS or the context is full
    stop: list[str] = field(default_factory=list)
    format: str | dict | type | None = None  # "json": one JSON object; a JSON schema (or pydantic model): a value of it

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> SamplingParams:
        known = {f.name for f in fields(cls)}
        unknown = set(kwargs) - known
        if unknown:
            raise LilmistralError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        params = cls(**kwargs)  # type: ignore[arg-type]
        params.validate()
        return params

    def validate(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 <= self.top_k <= INT32_MAX, f"top_k must be between 0 (off) and {INT32_MAX}"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (-1 <= self.repeat_last_n <= INT32_MAX, f"repeat_last_n must be between -1 (every token so far) and "
                                                   f"{INT32_MAX}"),
            (self.max_tokens is None or self.max_tokens >= 0, "max_tokens must be >= 0"),
            (self.seed is None or -2**63 <= self.seed < 2**64, "seed must be between -2**63 and 2**64 - 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise LilmistralError(message)
        if self.format is not None:
            Grammar(self.format)  # a format it cannot hold to is refused before anything runs


RECOMMENDABLE = {"temperature": float, "top_k": int, "top_p": float, "repeat_penalty": float, "repeat_last_n": int}


def recommended_sampling(values: object, where: str) -> dict[str, float | int]:
    """The sampling options a model recommends ({SamplingParams name: value}), checked: they come from its files
    (GGUF metadata, generation_config.json, a manifest) or models.toml. One of the wrong type or out of range is
    left out with a warning; the rest stand."""
    kept: dict[str, float | int] = {}
    for name, value in (values if isinstance(values, dict) else {}).items():
        kind = RECOMMENDABLE.get(name)
        if kind is None:
            continue
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and \
                (kind is float or value == int(value)):
            value = kind(f"{value:.6g}" if kind is float else value)  # a float32 0.949999988 is 0.95
            try:
                SamplingParams(**{name: value}).validate()
                kept[name] = value
                continue
            except LilmistralError:
                pass
        warnings.warn(f"lilmistral: {where}: the recommended {name} {value!r:.40} is not a valid one; left out")
    return kept


class Sampler:
    """Draws tokens from float32 logits [vocab] on their device, never waiting for it (no host sync): the repeat
    penalty over the recent ids (kept on the device: the prompt's last repeat_last_n to start with), temperature,
    top-k, top-p (over the top-k candidates only, sorted by topk, not over a sort of the whole vocabulary), then
    the draw. On the CPU with lilmistral's kernels, one call does it all (`sample`, sampling.cpp: the same
    candidates and probabilities, drawn by one uniform number from the generator). A token comes as a tensor [1]
    on the device, and joins the recent ids."""

    def __init__(self, params: SamplingParams, history: list[int], device: torch.device) -> None:
        self.params = params
        self.generator = None if params.seed is None else torch.Generator(device=device).manual_seed(params.seed)
        n = params.repeat_last_n
        self.recent = None  # no penalty
        if params.repeat_penalty != 1.0 and n != 0:
            self.recent = torch.tensor(history[-n:] if n > 0 else history, dtype=torch.long, device=device)
        self.in_one_call = torch.device(device).type == "cpu" and vnni.available()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if self.in_one_call:
            u = 0.0 if p.temperature == 0 else torch.rand((), dtype=torch.float64, generator=self.generator).item()
            recent = self.recent if self.recent is not None else NO_IDS
            token = torch.ops.lilmistral.sample(logits.contiguous(), recent, p.repeat_penalty, p.temperature, p.top_k,
                                                p.top_p, u)
        else:
            token = self.draw(logits)
        if self.recent is not None:
            self.recent = torch.cat([self.recent, token])
            if p.repeat_last_n > 0:
                self.recent = self.recent[-p.repeat_last_n:]
        return token

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """The draw by PyTorch's operators (on any device)."""
        p = self.params
        if self.recent is not None:  # repeated ids write the same value
            picked = logits[self.recent]
            penalized = torch.where(picked > 0, picked / p.repeat_penalty, picked * p.repeat_penalty)
            logits = logits.index_put((self.recent,), penalized)
        if p.temperature == 0:
            return torch.argmax(logits, dim=-1, keepdim=True)
        if p.top_k > 0:
            values, ids = torch.topk(logits, min(p.top_k, logits.shape[-1]))  # largest first
        else:
            values, ids = torch.sort(logits, descending=True)
        probs = torch.softmax(values / p.temperature, dim=-1)
        if p.top_p < 1.0:  # the smallest prefix reaching top_p: keep the token crossing it
            probs = probs * (probs.cumsum(dim=-1) - probs < p.top_p)
        return ids[torch.multinomial(probs, 1, generator=self.generator)]


def prefill(model: Transformer, cache: RollingKVCache, ids: list[int], all_logits: bool = False) -> torch.Tensor:
    """Run ids in chunks (at most the window for sliding-window models); logits of the last token or of all."""
    chunk = cache.window or PREFILL_CHUNK
    outputs = []
    for start in range(0, len(ids), chunk):
        tokens = torch.tensor(ids[start:start + chunk], dtype=torch.long, device=cache.device)
        logits = model(tokens, cache, last_only=not all_logits)
        if all_logits or start + chunk >= len(ids):
            outputs.append(logits)
    return torch.cat(outputs)


def _own_code(method: Callable) -> Callable:
    """The bound method with a code object of its own. torch.compile keeps its graphs per code object and
    the decode step skips the guards on the model's modules, so each model needs its own (or a second model
    in the process could run the first one's graph)."""
    fn = method.__func__
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(copy, method.__self__)


def trace_step(model: Transformer, args: tuple) -> Callable | None:
    """model.decode_step traced into a TorchScript graph, whose operators run without Python between them (a
    small model's CPU token ~1.6x faster; the trace takes well under a second). None where it may not
    generalise: a mixture of experts that loops over the routed experts' ids (Experts.forward refuses to be
    traced; QuantExperts' batched kernels take the ids as a tensor, and trace), the tracer warned of a value
    it had to take as a constant (a branch on a tensor's data or shape), the trace failed, or its logits for
    `args` are not the eager step's, bit for bit. Tracing runs the step: its cache writes are the step's own,
    so running it again is harmless. On Python 3.14+, where PyTorch calls TorchScript unsupported (its
    breakages there are torch.jit.script's reading of annotations, which tracing does not do), the same
    checks decide."""
    tokens, position, mask, keys, values = args
    layers = len(keys)

    def flat_step(*flat: torch.Tensor) -> torch.Tensor:  # the tracer takes tensors, not lists of them
        return model.decode_step(*flat[:3], list(flat[3:3 + layers]), list(flat[3 + layers:]))

    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        try:
            graph, _ = torch._C._create_graph_by_tracing(flat_step, (tokens, position, mask, *keys, *values),
                                                         lambda value: "", True, False)
            # a compilation unit of its own, freed with the step: torch.jit.trace puts the graph, which holds
            # the weights as constants, in PyTorch's global one for good (each traced model would stay in memory)
            graph_step = torch._C.CompilationUnit().create_function("decode_step", graph)
        except Exception:  # the eager step computes the same; a bug in it surfaces there
            return None

    def traced(tokens, position, mask, keys, values):
        return graph_step(tokens, position, mask, *keys, *values)

    return traced if torch.equal(traced(*args), model.decode_step(*args)) else None


def capturable(model: Transformer) -> bool:
    """Whether the decode step can be captured as a CUDA graph: nothing in it waits for the GPU. Only a mixture
    of experts' loop over its routed experts does (Experts.forward); QuantExperts' batched kernels do not."""
    return all(getattr(m, "batched", None) is not None for m in model.modules() if isinstance(m, Experts))


class GraphedStep:
    """Transformer.decode_step over one cache, captured as CUDA graphs (one per number of slots attended, a
    multiple of DecodeStep.CUDA_GRAPH_BUCKET) and replayed: each token one launch instead of hundreds, which
    at batch 1 cost more than the GPU's work. The token goes into a buffer at a fixed address; the position
    and mask are the cache's own, written in place by begin_step."""

    def __init__(self, model: Transformer, cache: RollingKVCache) -> None:
        self.model, self.cache = model, weakref.ref(cache)
        self.token = torch.zeros(1, dtype=torch.long, device=cache.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # slots attended -> graph, logits
        self.pool = None  # the graphs share one memory pool: only one runs at a time

    def __call__(self, token: int | torch.Tensor, position: torch.Tensor, mask: torch.Tensor, keys: list[torch.Tensor],
                 values: list[torch.Tensor]) -> torch.Tensor:
        """The step's logits [1, vocab], in the graph's output buffer (overwritten by the next call). token: an
        id, or one on the device [1]."""
        n = mask.shape[0]
        if isinstance(token, torch.Tensor):
            self.token.copy_(token)
        else:
            self.token.fill_(token)
        if n not in self.graphs:
            self.graphs[n] = self._capture(position, mask, keys, values)
        graph, logits = self.graphs[n]
        graph.replay()
        return logits

    def _capture(self, position: torch.Tensor, mask: torch.Tensor, keys: list[torch.Tensor],
                 values: list[torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        def step() -> torch.Tensor:
            return self.model.decode_step(self.token, position, mask, keys, values)

        side = torch.cuda.Stream(self.token.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # kernels built and workspaces allocated before capturing
            step()  # writes this token's key and value, which the replay writes again
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = step()
        self.pool = graph.pool()
        return graph, logits


class DecodeStep:
    """Runs one token after the prompt: `Transformer.decode_step`, compiled with torch.compile when asked
    (with CUDA graphs on a GPU); else on a GPU captured as CUDA graphs (`GraphedStep`) unless graphs=False, on
    the CPU traced (`trace_step`) unless trace=False; or a pipeline's own forward."""

    CUDA_GRAPH_BUCKET = 256  # keys are attended to in multiples of this, so that one graph serves 256 positions

    def __init__(self, model: Transformer, compile: bool = False, trace: bool = True, graphs: bool = True) -> None:
        self.model = model
        self.compile = compile and hasattr(model, "decode_step")
        self.trace = trace and not self.compile and hasattr(model, "decode_step")
        self.graphs = graphs and not self.compile and hasattr(model, "decode_step") and capturable(model)
        self._compiled = None
        self._traced: Callable | None = None
        self._graphed: GraphedStep | None = None
        self._marked: weakref.ref | None = None  # the cache whose tensors are marked as static inputs

    @property
    def mode(self) -> str:
        """How tokens are decoded: "compiled", "graphed" (CUDA graphs), "traced", "eager" (neither, or not
        yet) or "pipeline"."""
        if not hasattr(self.model, "decode_step"):
            return "pipeline"
        if self.compile:
            return "compiled"
        if self._graphed is not None:
            return "graphed"
        traced = self._traced is not None and self._traced != self.model.decode_step
        return "traced" if traced else "eager"

    def _compiled_step(self, cache: RollingKVCache):
        cuda = cache.device.type == "cuda"
        if self._compiled is None:
            # the model's modules never change after loading: skipping their guards saves ~1 ms a token, and
            # the graph's own checks of its inputs' shapes (which dynamo's guards on the rest make) ~7%
            options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "triton.cudagraphs": cuda,
                       "size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}
            self._compiled = torch.compile(_own_code(self.model.decode_step), options=options)
        if cuda and (self._marked is None or self._marked() is not cache):
            for t in cache.k + cache.v:  # CUDA graphs replay in-place writes only into tensors at fixed addresses
                torch._dynamo.mark_static_address(t)
            self._marked = weakref.ref(cache)
        return self._compiled

    def _graphed_step(self, token: int | torch.Tensor, cache: RollingKVCache) -> torch.Tensor:
        if self._graphed is None or self._graphed.cache() is not cache:
            self._graphed = GraphedStep(self.model, cache)
        position, mask = cache.begin_step(self.CUDA_GRAPH_BUCKET)
        logits = self._graphed(token, position, mask, cache.k, cache.v)
        cache.end()
        return logits[-1]

    def __call__(self, token: int | torch.Tensor, cache: RollingKVCache) -> torch.Tensor:
        """float32 logits [vocab] of `token` (an id, or one on the cache's device [1]) at the cache's next position."""
        if self.graphs and cache.device.type == "cuda":
            return self._graphed_step(token, cache)
        tokens = token.reshape(1) if isinstance(token, torch.Tensor) else torch.tensor([token], device=cache.device)
        if not hasattr(self.model, "decode_step"):  # a pipeline
            return self.model(tokens, cache)[-1]
        step, bucket = self.model.decode_step, 1
        if self.compile:
            step = self._compiled_step(cache)
            bucket = self.CUDA_GRAPH_BUCKET if cache.device.type == "cuda" else 1
        position, mask = cache.begin_step(bucket)
        if self.compile and mask.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(mask, 0)  # one graph for every number of keys
        args = (tokens, position, mask, cache.k, cache.v)
        if self.trace and cache.device.type == "cpu":
            if self._traced is None:
                self._traced = trace_step(self.model, args) or self.model.decode_step
            step = self._traced
        logits = step(*args)
        cache.end()
        return logits[-1]


def generate_tokens(model: Transformer, cache: RollingKVCache, prompt: list[int], params: SamplingParams,
                    eos_ids: Iterable[int], step: DecodeStep | None = None, ahead: bool | None = None,
                    constraint: JsonConstraint | None = None) -> Generator[int, None, str]:
    """Stream sampled token ids after the prompt; the generator returns why it ended: "stop" (an
    end-of-sequence token), "length" (max_tokens) or "context" (the context is full). The cache may already
    hold a prefix of the prompt (cache.length < len(prompt) tokens of it); only the rest is prefilled. `step`
    runs each new token (default: untraced, as tracing pays off over many calls: an LLM keeps its own
    DecodeStep). The tokens are drawn on the device (`Sampler`); ahead (default: on a GPU), each step and the
    next draw are queued before the host reads the token they follow, so the GPU computes token i + 1 while
    the host hands out token i (else, between two steps, it waits for the host to read a token, return it and
    queue the next step); a step run ahead for an end-of-sequence token is taken back (the cache rewinds one
    position): the same tokens and cache. A `constraint` (JSON mode) draws only the tokens it allows, on the
    host (so never ahead), and ends the answer where it is finished."""
    step = step or DecodeStep(model, trace=False)
    if ahead is None:
        ahead = cache.device.type == "cuda" and hasattr(model, "decode_step") and constraint is None
    sampler, eos, host = Sampler(params, prompt, cache.device), set(eos_ids), HostRead(cache.device)
    # the allowed candidates the sampler chooses from: one for a greedy draw, else as many as its top-k takes
    wanted = 1 if params.temperature == 0 and params.repeat_penalty == 1 else params.top_k or 64

    def constrained(logits: torch.Tensor) -> torch.Tensor:
        token = sampler(constraint.allowed(logits, wanted))
        constraint.advance(int(token))
        return token

    draw = sampler if constraint is None else constrained

    def advance(token: torch.Tensor, last: bool) -> torch.Tensor | None:  # run token; then draw the next one
        logits = step(token, cache)
        return None if last else draw(logits)

    token = draw(prefill(model, cache, prompt[cache.length:])[-1])
    produced = 0
    while params.max_tokens is None or produced < params.max_tokens:
        room = cache.fits()  # else the context is full
        last = params.max_tokens is not None and produced + 1 >= params.max_tokens
        read = host.later(token)
        if ahead and room:  # this token's step and the next draw queued before the host reads this token
            token = advance(token, last)
        value = read()
        if value in eos:
            if ahead and room and not cache.rewind(cache.length - 1):  # the step run ahead, taken back
                raise AssertionError("a cache can always take back its last position")
            return "stop"
        yield value
        produced += 1
        if constraint is not None and constraint.finished:
            return "stop"
        if not room:
            return "context"
        if not ahead:
            token = advance(token, last)
    return "length"


class HostRead:
    """Reads of token ids on the device [1] that wait only when called: on a GPU, each copied into one pinned
    slot behind the work queued so far (one read outstanding at a time: the slot is reused, not allocated a
    token)."""

    def __init__(self, device: torch.device) -> None:
        self.on_gpu = device.type == "cuda"
        if self.on_gpu:
            self.slot = torch.empty(1, dtype=torch.long, pin_memory=True)
            self.copied = torch.cuda.Event()

    def later(self, token: torch.Tensor) -> Callable[[], int]:
        if not self.on_gpu:
            return lambda: int(token)
        self.slot.copy_(token, non_blocking=True)
        self.copied.record()
        return self._read

    def _read(self) -> int:
        self.copied.synchronize()
        return int(self.slot)

