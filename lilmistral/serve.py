"""`lilmistral serve`: Ollama's HTTP API (/api/chat, /api/generate, /api/embed, /api/embeddings, /api/show,
/api/tags, /api/ps, /api/version) and OpenAI's (/v1/chat/completions, /v1/completions, /v1/embeddings,
/v1/models) over the pulled models, so that the clients written for them (Open WebUI, editors' assistants, the
`ollama` and `openai` Python libraries) talk to lilmistral.

One model is held at a time, loaded at its first request and replaced when another is asked for; requests take
turns on it. Requests are untrusted: bodies are size-limited JSON, checked field by field; model names are
looked up in the store (never a path, never a download); a request with an Origin other than a loopback one (a
web page's, through the browser) is refused, and on a loopback address one with a Host other than a loopback
name (a DNS name rebound to 127.0.0.1).
"""
from __future__ import annotations

import base64
import contextlib
import itertools
import json
import queue
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from . import __version__
from .chat import CALL_ID, new_call_id
from .errors import LilmistralError
from .llm import LLM, Thinking

MAX_BODY = 32 << 20  # bytes a request body may have
LOOPBACK = {"localhost", "127.0.0.1", "::1"}
OLLAMA_OPTIONS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "seed": "seed",
                  "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n", "num_predict": "max_tokens"}
INTEGER_OPTIONS = {"top_k", "seed", "repeat_last_n", "max_tokens"}
OPENAI_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
                  "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens"}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Models:
    """The model the server holds, by its folder (or file); a model given to `serve` by its path is served under
    the name it was given. Everything done with it (loading, answering) runs on one thread, the one in `work()`,
    one request at a time: `serve` gives it the main thread, which loaded the first model. One thread for all of
    it leaves PyTorch one pool of CPU threads (lilmistral.threads: a second pool, idle, slows the other's operators
    ~2x; SmolLM2 decoded 137-142 tokens/s from requests' threads before loads and answers let their pools go)."""

    def __init__(self, load: Callable[[str], LLM], preloaded: tuple[str, str, LLM] | None = None) -> None:
        self.load, self.jobs = load, queue.Queue()
        self.name, self.path, self.llm, self.paths = None, None, None, {}
        if preloaded:
            self.name, self.path, self.llm = preloaded
            self.paths[self.name] = self.path

    def work(self) -> None:
        """Run the jobs requests submit, in turn, until `stop()`."""
        while (job := self.jobs.get()) is not None:
            job()

    def stop(self) -> None:
        self.jobs.put(None)

    def submit(self, job: Callable[[], Any]) -> Iterator[Any]:
        """Run `job` (a function, or a generator function whose items are passed on as they come) on the working
        thread; iterate what it gives. Closing the iterator stops a generator job at its next item."""
        results: queue.Queue = queue.Queue()
        cancelled = threading.Event()

        def run() -> None:
            try:
                made = job()
                for item in made if isinstance(made, Iterator) else [made]:
                    if cancelled.is_set():
                        break
                    results.put((True, item))
                if isinstance(made, Iterator):
                    made.close()
                results.put((True, StopIteration))
            except Exception as e:  # the request's error (its status), or a bug: raised in the request's thread
                results.put((False, e))

        self.jobs.put(run)
        try:
            while True:
                ok, item = results.get()
                if not ok:
                    raise item
                if item is StopIteration:
                    return
                yield item
        finally:
            cancelled.set()

    def path_of(self, name: str) -> str:
        """A requested model's folder (or file): `serve`'s own by its name, else a pulled one (404 if none)."""
        from .store import Store

        return self.paths.get(name.removesuffix(":latest")) or model_path(name.removesuffix(":latest"), Store())

    def take(self, name: str) -> tuple[LLM, float]:
        """The model `name` (on the working thread), and the seconds its load took now (0 when it was held)."""
        path = self.path_of(name)
        self.name = name
        if path == self.path:
            return self.llm, 0.0
        self.close()
        start = time.perf_counter()
        try:
            self.llm = self.load(path)
        except LilmistralError as e:
            raise ApiError(500, f"{name}: {e}") from None
        self.path, self.name = path, name
        return self.llm, time.perf_counter() - start

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
        self.name = self.path = self.llm = None


def model_path(name: str, store) -> str:
    """A pulled model's folder, by its registry name (`mistral`, `mistral:7b-instruct-v0.3`; `:latest` is Ollama's
    default tag, a name's default here) or the name `list` shows; 404 where there is none."""
    from .registry import resolve

    try:
        installed = store.installed(resolve(name, store.home))
    except LilmistralError:
        installed = None
    installed = installed or next((m for m in store.list() if f"{m.name}:{m.tag}" == name), None)
    if installed is None:
        raise ApiError(404, f"model '{name}' not found: pull it first (lilmistral pull {name})")
    return str(installed.path)


def _number(value: Any, what: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{what} must be a number")
    return value


def _integer(value: Any, what: str) -> int:
    value = _number(value, what)
    if isinstance(value, float) and not value.is_integer():
        raise ApiError(400, f"{what} must be an integer")
    return int(value)


def _object(body: dict[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key) or {}
    if not isinstance(value, dict):
        raise ApiError(400, f"{key} must be an object")
    return value


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "stop must be text or a list of texts")
    return stops


def sampling(options: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """lilmistral's sampling keywords from a request's options (Ollama's `options`, OpenAI's top-level fields);
    those lilmistral does not have are left out, as Ollama leaves them."""
    kwargs = {}
    for theirs, ours in names.items():
        if options.get(theirs) is None:
            continue
        kwargs[ours] = (_integer if ours in INTEGER_OPTIONS else _number)(options[theirs], theirs)
    if kwargs.get("max_tokens", 0) < 0:  # Ollama's num_predict -1 (no limit) and -2 (fill the context)
        del kwargs["max_tokens"]
    if options.get("stop") is not None:
        kwargs["stop"] = _stop(options["stop"])
    return kwargs


def _ollama_format(body: dict[str, Any]) -> dict[str, Any]:
    """Ollama's `format`: "json" holds the answer to one JSON object, a JSON schema to a value the schema accepts."""
    format = body.get("format")
    if format in (None, ""):
        return {}
    if format != "json" and not isinstance(format, dict):
        raise ApiError(400, 'format must be "json" or a JSON schema (an object)')
    return {"format": format}


def _openai_format(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's `response_format`: text, json_object (one JSON object) or json_schema (a value its schema accepts)."""
    response_format = _object(body, "response_format")
    kind = response_format.get("type", "text")
    if kind not in ("text", "json_object", "json_schema"):
        raise ApiError(400, f"response_format {kind!r} is not supported (text, json_object, json_schema)")
    if kind == "text":
        return {}
    schema = _object(response_format, "json_schema").get("schema") if kind == "json_schema" else None
    if schema is not None and not isinstance(schema, dict):
        raise ApiError(400, "response_format.json_schema.schema must be an object")
    return {"format": schema or "json"}


def _unloads(body: dict[str, Any]) -> bool:
    """Ollama's `keep_alive` 0: let go of the model once the request is answered."""
    return body.get("keep_alive") in (0, "0", "0s", "0m", "0h")


def _text(content: Any, role: str) -> str:
    """A message's text: a string, or OpenAI's list of text parts."""
    if content is None and role in ("assistant", "system", "user"):
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, "only text content is supported (no images or audio)")
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"a {role} message's content must be text")
    return content


def messages_in(messages: Any) -> list[dict[str, Any]]:
    """A request's messages as `LLM.chat` takes them. Ollama's clients send tool calls without ids and results by
    function name (`tool_name`): each call gets an id and each result the id of the call it answers. Ids that
    Mistral's formats cannot hold (OpenAI's "call_..." ones) are replaced by ones they can, the same way in the
    calls and their results."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "messages must be a non-empty list of objects")
    out, pending, renamed = [], [], {}

    def our_id(call_id: Any) -> str:
        if not isinstance(call_id, str) or not CALL_ID.fullmatch(call_id):
            return renamed.setdefault(call_id, new_call_id()) if isinstance(call_id, str) else new_call_id()
        return call_id

    for m in messages:
        if m.get("images"):
            raise ApiError(400, "images are not supported")
        role = m.get("role")
        message = {"role": role, "content": _text(m.get("content"), str(role))}
        if role == "assistant":
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise ApiError(400, "tool_calls must be a list of objects")
            pending = [{**c, "id": our_id(c.get("id"))} for c in calls]
            if pending:
                message["tool_calls"] = pending
        elif role == "tool":
            name = m.get("tool_name") or m.get("name")
            call_id = our_id(m["tool_call_id"]) if m.get("tool_call_id") else next(
                (c["id"] for c in pending if isinstance(c.get("function"), dict) and c["function"].get("name") == name),
                pending[0]["id"] if pending else None)
            pending = [c for c in pending if c["id"] != call_id]
            message.update(tool_call_id=call_id, **({"name": name} if name else {}))
        out.append(message)
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class Handler(BaseHTTPRequestHandler):
    server: Server
    server_version = f"lilmistral/{__version__}"

    def do_HEAD(self) -> None:
        self._serve(lambda: self._send_json({}, head=True))

    def do_GET(self) -> None:
        routes = {"/": lambda: self._send("lilmistral is running"), "/api/version": self.version,
                  "/api/tags": self.tags, "/api/ps": self.running, "/v1/models": self.openai_models}
        self._serve(routes.get(urlsplit(self.path).path.rstrip("/") or "/"))

    def do_POST(self) -> None:
        routes = {"/api/chat": self.chat, "/api/generate": self.generate, "/api/show": self.show,
                  "/api/embed": self.embed, "/api/embeddings": self.embeddings,
                  "/v1/chat/completions": self.openai_chat, "/v1/completions": self.openai_completion,
                  "/v1/embeddings": self.openai_embeddings}
        self._serve(routes.get(urlsplit(self.path).path.rstrip("/")))

    def _serve(self, route: Callable[[], None] | None) -> None:
        try:
            self._check_origin()
            if route is None:
                raise ApiError(404, f"no such endpoint: {self.command} {urlsplit(self.path).path}")
            route()
        except ApiError as e:
            self._send_json({"error": str(e)}, e.status)
        except LilmistralError as e:  # the request's conversation or options, as the model's format judged them
            self._send_json({"error": str(e)}, 400)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away: what it asked for was stopped

    def _check_origin(self) -> None:
        """No Origin but a loopback one (a web page's request carries its own), and on a loopback address a Host
        of a loopback name (a DNS name rebound to 127.0.0.1 arrives with that name)."""
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).hostname not in LOOPBACK:
            raise ApiError(403, f"requests from {origin!r} are not served")
        host = self.headers.get("Host")
        if self.server.loopback and host is not None and urlsplit(f"//{host}").hostname not in LOOPBACK:
            raise ApiError(403, f"Host {host!r} is not this machine's loopback address")

    def _body(self) -> dict[str, Any]:
        encoding = self.headers.get("Transfer-Encoding")
        if encoding is not None and encoding.strip().lower() != "chunked":
            self.close_connection = True
            raise ApiError(501, f"Transfer-Encoding {encoding!r} is not supported (chunked is)")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            raise ApiError(400, "Content-Length is not a length")
        if length > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY >> 20} MB")
        try:
            body = json.loads((self._chunks() if encoding else self.rfile.read(length)) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not JSON ({e})") from None
        except RecursionError:
            raise ApiError(400, "the request body nests too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise ApiError(400, "model is required")
        return body

    def _chunks(self) -> bytes:
        """A chunked body (what clients that stream a request send), at most MAX_BODY bytes."""
        parts, size = [], 1
        while size:
            try:
                size = int(self.rfile.readline(1024).split(b";")[0], 16)
            except ValueError:
                self.close_connection = True
                raise ApiError(400, "a chunk of the body has no size") from None
            if size < 0 or sum(map(len, parts)) + size > MAX_BODY:
                self.close_connection = True
                raise ApiError(413, f"the request body is over {MAX_BODY >> 20} MB")
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)  # the chunk's CRLF; after the last, the (empty) trailer's
        return b"".join(parts)

    def _send_json(self, value: Any, status: int = 200, head: bool = False) -> None:
        self._send(json.dumps(value, ensure_ascii=False), "application/json", status, head)

    def _send(self, text: str, content_type: str = "text/plain", status: int = 200, head: bool = False) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _stream(self, content_type: str, events: Iterator[bytes]) -> None:
        """A response of unknown length (the connection's end ends it, as HTTP/1.0 allows), each event flushed."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        for event in events:
            self.wfile.write(event)
            self.wfile.flush()

    def version(self) -> None:
        self._send_json({"version": __version__})

    def _listed(self) -> list[tuple[str, int, float, str]]:
        """(name, bytes, modified, quantization) of each model a request may name: the pulled ones, and the one
        given to `serve` by its path."""
        from .store import Store, folder_size

        listed = [(f"{m.name}:{m.tag}", m.size, m.modified, m.quant) for m in Store().list()]
        for name, path in self.server.models.paths.items():
            listed.append((name, folder_size(Path(path)), Path(path).stat().st_mtime, ""))
        return listed

    def tags(self) -> None:
        self._send_json({"models": [{"name": name, "model": name, "size": size, "digest": "",
                                     "modified_at": datetime.fromtimestamp(modified, timezone.utc).isoformat(),
                                     "details": {"format": "lilmistral", "quantization_level": quant}}
                                    for name, size, modified, quant in self._listed()]})

    def show(self) -> None:
        """Ollama's /api/show: a model's details, architecture and capabilities, from its files (it is not loaded)."""
        from .convert import is_converted
        from .loader import load_model_tokenizer, model_args, model_sampling, read_manifest
        from .store import human_parameters

        path = Path(self.server.models.path_of(self._body()["model"]))
        args, tokenizer = model_args(path), load_model_tokenizer(path)
        template = getattr(tokenizer, "chat_template", None) or ""
        tools = (tokenizer.instruct_version or 0) >= 2 or "tools" in template
        insert = bool(tokenizer.instruct_version) and None not in map(tokenizer.control_id, ("[SUFFIX]", "[PREFIX]"))
        quant = read_manifest(path)[0]["quant"]["scheme"] if is_converted(path) else ""
        family = args.architecture.removesuffix("ForCausalLM").lower()
        self._send_json({
            "modelfile": "", "template": template, "capabilities": ["completion"] + ["tools"] * tools + ["insert"] * insert,
            "parameters": "\n".join(f"{k} {v}" for k, v in model_sampling(path).items()),
            "details": {"format": "lilmistral", "family": family, "parameter_size": human_parameters(args.n_parameters),
                        "quantization_level": quant},
            "model_info": {"general.architecture": family, "general.parameter_count": args.n_parameters,
                           f"{family}.context_length": args.max_seq_len, f"{family}.embedding_length": args.dim,
                           f"{family}.block_count": args.n_layers, f"{family}.attention.head_count": args.n_heads,
                           f"{family}.attention.head_count_kv": args.n_kv_heads}})

    def running(self) -> None:
        """Ollama's /api/ps: the model held, if any."""
        from .store import folder_size

        models = self.server.models
        held = [(models.name, models.path)] if models.path else []
        self._send_json({"models": [{"name": name, "model": name, "size": folder_size(Path(path)), "digest": "",
                                     "details": {"format": "lilmistral"}, "expires_at": "2100-01-01T00:00:00Z",
                                     "size_vram": 0} for name, path in held]})

    def openai_models(self) -> None:
        self._send_json({"object": "list", "data": [{"id": name, "object": "model", "created": int(modified),
                                                     "owned_by": "lilmistral"}
                                                    for name, _, modified, _ in self._listed()]})

    def _answer(self, body: dict[str, Any], start: Callable[[LLM], Iterator[str]], num_ctx: Any = None
                ) -> Iterator[tuple[LLM, str | None]]:
        """(llm, piece) for each piece of the answer `start(llm)` streams on the model's thread, then (llm, None)
        at its end. The caller takes the first before sending anything, so that a request the model's format
        refuses (or its prefill) is a 400."""
        def answer() -> Iterator[tuple[LLM, str | None]]:
            with self._held(body, num_ctx) as llm:
                pieces = start(llm)
                try:
                    for piece in pieces:
                        yield llm, piece
                    yield llm, None
                finally:
                    pieces.close()

        return self.server.models.submit(answer)

    @contextlib.contextmanager
    def _held(self, body: dict[str, Any], num_ctx: Any = None) -> Iterator[LLM]:
        """The model the request names (on the model's thread), its context resized where `num_ctx` asks; let go
        of after the request where its `keep_alive` is 0."""
        models = self.server.models
        llm, self.load_s = models.take(body["model"])
        try:
            if num_ctx is not None and _integer(num_ctx, "num_ctx") != llm.num_ctx:
                llm.resize_context(int(num_ctx))
            yield llm
        finally:
            if _unloads(body):
                models.close()

    def _embeddings(self, body: dict[str, Any], truncate: Any = True, num_ctx: Any = None, key: str = "input",
                    normalize: bool = True) -> tuple[LLM, list]:
        """The model's embeddings of `body[key]` (a text or a list of texts), cut to `dimensions` and scaled to
        length 1 again where it asks (as Ollama's Matryoshka cut)."""
        texts, dimensions = body.get(key), body.get("dimensions")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise ApiError(400, f"{key} must be text or a list of texts")
        if not isinstance(truncate, bool):
            raise ApiError(400, "truncate must be true or false")
        def embed() -> tuple[LLM, torch.Tensor]:
            with self._held(body, num_ctx) as llm:
                return llm, llm.embed(texts, truncate, normalize) if texts else torch.empty(0, llm.args.dim)

        [(llm, vectors)] = self.server.models.submit(embed)
        if dimensions is not None:
            kept = _integer(dimensions, "dimensions")
            if not 1 <= kept <= vectors.shape[1]:
                raise ApiError(400, f"dimensions must be between 1 and {vectors.shape[1]}")
            vectors = torch.nn.functional.normalize(vectors[:, :kept], dim=-1)
        return llm, vectors.tolist()

    def embed(self) -> None:
        """Ollama's /api/embed."""
        request_start, body = time.perf_counter(), self._body()
        options = _object(body, "options")
        llm, vectors = self._embeddings(body, body.get("truncate", True), options.get("num_ctx"))
        self._send_json({"model": body["model"], "embeddings": vectors,
                         "total_duration": _ns(time.perf_counter() - request_start), "load_duration": _ns(self.load_s),
                         "prompt_eval_count": llm.stats.prompt_tokens})

    def embeddings(self) -> None:
        """Ollama's older /api/embeddings: one `prompt`, its vector not scaled to length 1."""
        body = self._body()
        if not isinstance(body.get("prompt"), str):
            raise ApiError(400, "prompt must be text")
        options = _object(body, "options")
        _, [vector] = self._embeddings(body, True, options.get("num_ctx"), "prompt", normalize=False)
        self._send_json({"embedding": vector})

    def openai_embeddings(self) -> None:
        """OpenAI's /v1/embeddings: floats, or base64 of little-endian float32 (what OpenAI's client asks for)."""
        body = self._body()
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(400, f"encoding_format {encoding!r} is not supported (float, base64)")
        llm, vectors = self._embeddings(body)
        if encoding == "base64":
            vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
        tokens = llm.stats.prompt_tokens
        self._send_json({"object": "list", "model": body["model"], "usage": {"prompt_tokens": tokens,
                                                                             "total_tokens": tokens},
                         "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]})

    def _ollama_stats(self, llm: LLM, request_start: float) -> dict[str, Any]:
        s = llm.stats
        return {"done": True, "done_reason": s.done_reason, "total_duration": _ns(time.perf_counter() - request_start),
                "load_duration": _ns(self.load_s), "prompt_eval_count": s.prompt_tokens,
                "prompt_eval_duration": _ns(s.prefill_s), "eval_count": s.eval_tokens, "eval_duration": _ns(s.eval_s)}

    def chat(self) -> None:
        """Ollama's /api/chat."""
        request_start, body = time.perf_counter(), self._body()
        options = _object(body, "options")
        messages, tools = messages_in(body.get("messages")), body.get("tools") or None
        kwargs = sampling(options, OLLAMA_OPTIONS) | _ollama_format(body)
        answer = self._answer(body, lambda llm: llm.chat(messages, tools=tools, **kwargs), options.get("num_ctx"))

        def chunks() -> Iterator[dict[str, Any]]:
            for llm, piece in answer:
                head = {"model": body["model"], "created_at": _now()}
                if piece is not None:
                    yield head | {"message": {"role": "assistant"} | _apart(piece, "content"), "done": False}
                    continue
                message = {"role": "assistant", "content": ""} | ({"tool_calls": llm.tool_calls} if llm.tool_calls
                                                                  else {})
                yield head | {"message": message} | self._ollama_stats(llm, request_start)

        self._ollama_reply(body, chunks(), "message")

    def generate(self) -> None:
        """Ollama's /api/generate: a prompt (and system prompt) in the model's chat format, or `raw`."""
        request_start, body = time.perf_counter(), self._body()
        for unsupported in ("images", "template", "context"):
            if body.get(unsupported):
                raise ApiError(400, f"{unsupported} is not supported")
        prompt, system, suffix = body.get("prompt", ""), body.get("system"), body.get("suffix") or None
        options = _object(body, "options")
        if not all(isinstance(text, (str, type(None))) for text in (prompt, system, suffix)):
            raise ApiError(400, "prompt, system and suffix must be text")
        if not prompt:  # as Ollama: load the model (or with keep_alive 0 unload it), answer nothing
            models = self.server.models
            list(models.submit(lambda: models.close() if _unloads(body) else models.take(body["model"])))
            self._send_json({"model": body["model"], "created_at": _now(), "response": "", "done": True,
                             "done_reason": "unload" if _unloads(body) else "load"})
            return
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        kwargs = sampling(options, OLLAMA_OPTIONS) | _ollama_format(body)
        if suffix is not None or body.get("raw"):  # fill in the middle, or the prompt as it is
            answer = self._answer(body, lambda llm: llm.complete(prompt, suffix, **kwargs), options.get("num_ctx"))
        else:
            answer = self._answer(body, lambda llm: llm.chat(messages, **kwargs), options.get("num_ctx"))

        def chunks() -> Iterator[dict[str, Any]]:
            for llm, piece in answer:
                head = {"model": body["model"], "created_at": _now()}
                yield head | (_apart(piece, "response") | {"done": False} if piece is not None
                              else {"response": ""} | self._ollama_stats(llm, request_start))

        self._ollama_reply(body, chunks(), "response")

    def _ollama_reply(self, body: dict[str, Any], chunks: Iterator[dict[str, Any]], text_key: str) -> None:
        """Streamed as lines of JSON (Ollama's default), or one object with the whole text (`"stream": false`)."""
        first = next(chunks)  # the prompt's checks and prefill, before a status is sent
        if body.get("stream", True):
            with contextlib.closing(chunks):  # a client gone stops the answer now
                self._stream("application/x-ndjson", (json.dumps(c, ensure_ascii=False).encode() + b"\n"
                                                      for c in itertools.chain([first], chunks)))
            return
        parts = [first, *chunks]
        texts = [p["message"] if text_key == "message" else p for p in parts]  # where each part's text is
        key = "content" if text_key == "message" else "response"
        texts[-1][key] = "".join(t[key] for t in texts)
        if thinking := "".join(t.get("thinking", "") for t in texts):
            texts[-1]["thinking"] = thinking
        self._send_json(parts[-1])

    def openai_chat(self) -> None:
        """OpenAI's /v1/chat/completions."""
        body = self._body()
        if body.get("n", 1) != 1:
            raise ApiError(400, "n must be 1")
        options = sampling(body, OPENAI_OPTIONS) | _openai_format(body)
        messages, tools, effort = messages_in(body.get("messages")), body.get("tools") or None, \
            body.get("reasoning_effort")
        if not isinstance(effort, (str, type(None))):
            raise ApiError(400, "reasoning_effort must be text")
        answer = self._answer(body, lambda llm: llm.chat(messages, tools=tools, reasoning_effort=effort, **options))
        answer = itertools.chain([next(answer)], answer)  # the prompt's checks and prefill, before a status is sent
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body["model"]}
        if body.get("stream"):
            self._server_sent(reply, self._openai_chunks(answer, _object(body, "stream_options").get("include_usage")))
            return
        text, thinking, llm = "", "", None
        for llm, piece in answer:
            if isinstance(piece, Thinking):
                thinking += piece
            else:
                text += piece or ""
        calls = [_openai_call(c) for c in llm.tool_calls]
        message = {"role": "assistant", "content": text or (None if calls else "")} | (
            {"tool_calls": calls} if calls else {}) | ({"reasoning_content": thinking} if thinking else {})
        self._send_json(reply | {"object": "chat.completion", "choices": [
            {"index": 0, "message": message, "finish_reason": _finish_reason(llm)}], "usage": _usage(llm)})

    def openai_completion(self) -> None:
        """OpenAI's /v1/completions: text after a prompt, or with `suffix` between them (fill-in-the-middle)."""
        body = self._body()
        prompt, suffix = body.get("prompt"), body.get("suffix") or None
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not isinstance(suffix, (str, type(None))):
            raise ApiError(400, "prompt (one) and suffix must be text")
        if body.get("n", 1) != 1 or body.get("echo") or body.get("logprobs") is not None:
            raise ApiError(400, "n other than 1, echo and logprobs are not supported")
        options = sampling(body, OPENAI_OPTIONS)
        answer = self._answer(body, lambda llm: llm.complete(prompt, suffix, **options))
        answer = itertools.chain([next(answer)], answer)
        reply = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                 "model": body["model"]}

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            return {"choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.get("stream"):
            self._server_sent(reply, (choice(piece, None) if piece is not None else choice("", _finish_reason(llm))
                                      for llm, piece in answer))
            return
        text, llm = "", None
        for llm, piece in answer:
            text += piece or ""
        self._send_json(reply | choice(text, _finish_reason(llm)) | {"usage": _usage(llm)})

    def _server_sent(self, reply: dict[str, Any], chunks: Iterator[dict[str, Any]]) -> None:
        """OpenAI's stream: each chunk an event, then [DONE]."""
        with contextlib.closing(chunks):  # a client gone stops the answer now
            self._stream("text/event-stream", (b"data: " + json.dumps(reply | c, ensure_ascii=False).encode()
                                               + b"\n\n" for c in chunks))
        self.wfile.write(b"data: [DONE]\n\n")

    @staticmethod
    def _openai_chunks(answer: Iterator[tuple[LLM, str | None]], include_usage: bool) -> Iterator[dict[str, Any]]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        yield chunk({"role": "assistant", "content": ""})
        for llm, piece in answer:
            if piece is not None:
                yield chunk({"reasoning_content" if isinstance(piece, Thinking) else "content": piece})
                continue
            if llm.tool_calls:
                yield chunk({"tool_calls": [{"index": i} | _openai_call(c) for i, c in enumerate(llm.tool_calls)]})
            yield chunk({}, _finish_reason(llm))
            if include_usage:
                yield {"object": "chat.completion.chunk", "choices": [], "usage": _usage(llm)}


def _apart(piece: str, key: str) -> dict[str, str]:
    """A piece of an answer under `key`, or of its thinking under "thinking" (Ollama's)."""
    return {key: "", "thinking": piece} if isinstance(piece, Thinking) else {key: piece}


def _openai_call(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call as OpenAI writes it: its arguments as JSON text."""
    return {"id": call["id"], "type": "function",
            "function": {"name": call["function"]["name"],
                         "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False)}}


def _finish_reason(llm: LLM) -> str:
    if llm.tool_calls:
        return "tool_calls"
    return "length" if llm.stats.done_reason in ("length", "context") else "stop"


def _usage(llm: LLM) -> dict[str, int]:
    s = llm.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.eval_tokens,
            "total_tokens": s.prompt_tokens + s.eval_tokens}


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, models: Models) -> None:
        super().__init__((host, port), Handler)
        self.models = models
        self.loopback = host in LOOPBACK or host.startswith("127.")


def make_server(host: str, port: int, models: Models) -> Server:
    """The server, bound (a port in use is one line); `serve_forever()` runs it."""
    try:
        return Server(host, port, models)
    except OSError as e:
        raise LilmistralError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
