"""`lilmistral serve`: Ollama's and OpenAI's HTTP APIs on a real loopback server, answering what `LLM.chat` answers."""
from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import lilmistral
from conftest import make_hf_model
from lilmistral.convert import convert
from lilmistral.llm import stream_text
from lilmistral.registry import resolve
from lilmistral.serve import Models, make_server
from lilmistral.store import Store

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of Japan?"}]
FORECAST = {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}, "sunny": {"type": "boolean"}},
            "required": ["unit", "sunny"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "tiny"
    make_hf_model(path, "mistral", sliding_window=None)
    return path


@pytest.fixture(scope="module")
def reference(folder):
    return lilmistral.load(folder)


@pytest.fixture
def server(folder, tmp_path, monkeypatch):
    """A server on 127.0.0.1 (a free port) holding the tiny model under the name "tiny", with a store of its own."""
    monkeypatch.setenv("LILMISTRAL_HOME", str(tmp_path / "home"))
    models = Models(lambda path: lilmistral.load(path, require_chat=True),
                    ("tiny", str(folder), lilmistral.load(folder)))
    httpd = make_server("127.0.0.1", 0, models)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    worker = httpd.worker = threading.Thread(target=models.work, daemon=True)
    worker.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    models.stop()
    worker.join(60)
    models.close()


def post(server, path: str, body, headers: dict | None = None) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get(server, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(server.url + path, headers=headers or {}),
                                    timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines() if line]


def events(data: bytes) -> list:
    found = [line.removeprefix("data: ") for line in data.decode().split("\n\n") if line]
    assert found[-1] == "[DONE]"
    return [json.loads(e) for e in found[:-1]]


def test_ollama_chat_answers_what_chat_answers(server, reference):
    """/api/chat, streamed (lines of JSON) and whole, answers the text LLM.chat gives, with Ollama's counts."""
    expected = "".join(reference.chat(QUESTION, temperature=0, max_tokens=6))
    prompt = len(reference.tokenize_chat(QUESTION))
    body = {"model": "tiny", "messages": QUESTION, "options": {"temperature": 0, "num_predict": 6}}
    status, data = post(server, "/api/chat", body)
    chunks = lines(data)
    assert status == 200 and len(chunks) > 2 and not any(c["done"] for c in chunks[:-1])
    assert "".join(c["message"]["content"] for c in chunks) == expected
    last = chunks[-1]
    assert last["done"] and last["done_reason"] == "length" and last["model"] == "tiny"
    assert last["eval_count"] == 6 and last["prompt_eval_count"] == prompt and last["total_duration"] > 0
    status, data = post(server, "/api/chat", body | {"stream": False, "model": "tiny:latest"})
    whole = json.loads(data)
    assert status == 200 and whole["message"] == {"role": "assistant", "content": expected} and whole["done"]


def test_ollama_generate_answers_a_prompt_in_the_chat_format_or_raw(server, reference):
    expected = "".join(reference.chat(QUESTION, temperature=0, max_tokens=5))
    body = {"model": "tiny", "system": "Be brief.", "prompt": "What is the capital of Japan?", "stream": False,
            "options": {"temperature": 0, "num_predict": 5}}
    status, data = post(server, "/api/generate", body)
    assert status == 200 and json.loads(data)["response"] == expected
    ids = reference.tokenizer.encode("Once upon a time", bos=True)
    raw = "".join(stream_text(reference.generate(ids, temperature=0, max_tokens=5), reference.tokenizer, []))
    status, data = post(server, "/api/generate", {"model": "tiny", "prompt": "Once upon a time", "raw": True,
                                                  "options": {"temperature": 0, "num_predict": 5}})
    assert "".join(c["response"] for c in lines(data)) == raw
    status, data = post(server, "/api/generate", {"model": "tiny"})  # Ollama's way to load a model
    assert json.loads(data)["done_reason"] == "load"


def test_fill_in_the_middle_through_ollamas_suffix_and_openais_completions(server, reference):
    """Codestral's fill-in-the-middle: Ollama's /api/generate with `suffix` and OpenAI's /v1/completions answer
    what LLM.complete answers; without a suffix, /v1/completions goes on from the prompt as it is."""
    prefix, suffix = "def area(r):\n    ", "\n    return result\n"
    expected = "".join(reference.complete(prefix, suffix, temperature=0, max_tokens=6))
    status, data = post(server, "/api/generate", {"model": "tiny", "prompt": prefix, "suffix": suffix, "stream": False,
                                                  "options": {"temperature": 0, "num_predict": 6}})
    assert status == 200 and json.loads(data)["response"] == expected
    body = {"model": "tiny", "prompt": prefix, "suffix": suffix, "temperature": 0, "max_tokens": 6}
    reply = json.loads(post(server, "/v1/completions", body)[1])
    assert reply["object"] == "text_completion" and reply["choices"][0]["text"] == expected
    assert reply["choices"][0]["finish_reason"] == "length" and reply["usage"]["completion_tokens"] == 6
    chunks = events(post(server, "/v1/completions", body | {"stream": True})[1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    plain = "".join(reference.complete(prefix, temperature=0, max_tokens=6))
    assert json.loads(post(server, "/v1/completions", body | {"suffix": None})[1])["choices"][0]["text"] == plain


def test_openai_chat_completions_answer_what_chat_answers(server, reference):
    expected = "".join(reference.chat(QUESTION, temperature=0, max_tokens=6))
    body = {"model": "tiny", "messages": QUESTION, "temperature": 0, "max_tokens": 6}
    status, data = post(server, "/v1/chat/completions", body)
    reply = json.loads(data)
    assert status == 200 and reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    assert reply["choices"] == [{"index": 0, "message": {"role": "assistant", "content": expected},
                                 "finish_reason": "length"}]
    assert reply["usage"]["completion_tokens"] == 6
    status, data = post(server, "/v1/chat/completions", body | {"stream": True,
                                                                 "stream_options": {"include_usage": True}})
    chunks = events(data)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == expected
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["total_tokens"] > 6
    content_parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                                  {"type": "text", "text": "of Japan?"}]}]
    status, data = post(server, "/v1/chat/completions", body | {"messages": QUESTION[:1] + content_parts})
    assert json.loads(data)["choices"][0]["message"]["content"] == expected


@pytest.mark.parametrize("format", ["json", FORECAST])
def test_json_mode_and_schemas_in_either_api(server, reference, format):
    """Ollama's format ("json" or a schema) and OpenAI's response_format (json_object or json_schema) hold the
    answer as `chat(format=...)` holds it."""
    from lilmistral.grammar import Grammar

    expected = "".join(reference.chat(QUESTION, temperature=0, max_tokens=8, format=format))
    assert Grammar(format).steps(Grammar(format).start, expected)
    status, data = post(server, "/api/chat", {"model": "tiny", "messages": QUESTION, "format": format,
                                              "stream": False, "options": {"temperature": 0, "num_predict": 8}})
    assert json.loads(data)["message"]["content"] == expected
    response_format = {"type": "json_object"} if format == "json" else {
        "type": "json_schema", "json_schema": {"name": "forecast", "schema": format, "strict": True}}
    status, data = post(server, "/v1/chat/completions", {"model": "tiny", "messages": QUESTION, "temperature": 0,
                                                         "max_tokens": 8, "response_format": response_format})
    assert json.loads(data)["choices"][0]["message"]["content"] == expected


def test_embeddings_in_either_api(server, reference):
    """Ollama's /api/embed and OpenAI's /v1/embeddings (floats, or base64 float32 as OpenAI's client asks) give
    `llm.embed`'s vectors; `dimensions` keeps the first ones, scaled to length 1 again; Ollama's older
    /api/embeddings gives one prompt's vector unscaled."""
    import base64
    import struct

    texts = ["Hello", "The capital of Japan is Tokyo."]
    expected = reference.embed(texts)
    status, data = post(server, "/api/embed", {"model": "tiny", "input": texts})
    reply = json.loads(data)
    assert status == 200 and torch.tensor(reply["embeddings"]).equal(expected)
    assert reply["prompt_eval_count"] == reference.stats.prompt_tokens and reply["load_duration"] == 0
    status, data = post(server, "/api/embed", {"model": "tiny", "input": texts[0], "dimensions": 8})
    cut = torch.tensor(json.loads(data)["embeddings"])
    torch.testing.assert_close(cut, torch.nn.functional.normalize(expected[:1, :8], dim=-1))
    status, data = post(server, "/v1/embeddings", {"model": "tiny", "input": texts})
    reply = json.loads(data)
    assert [d["index"] for d in reply["data"]] == [0, 1]
    assert reply["usage"]["prompt_tokens"] == reference.stats.prompt_tokens
    assert torch.tensor([d["embedding"] for d in reply["data"]]).equal(expected)
    status, data = post(server, "/v1/embeddings", {"model": "tiny", "input": texts, "encoding_format": "base64"})
    decoded = [struct.unpack(f"<{expected.shape[1]}f", base64.b64decode(d["embedding"]))
               for d in json.loads(data)["data"]]
    assert torch.tensor(decoded).equal(expected)
    status, data = post(server, "/api/embeddings", {"model": "tiny", "prompt": texts[1]})  # Ollama's older route
    unscaled = torch.tensor(json.loads(data)["embedding"])
    assert unscaled.equal(reference.embed(texts[1], normalize=False)[0]) and unscaled.norm() > 1.5
    torch.testing.assert_close(unscaled / unscaled.norm(), expected[1])


def test_tool_calls_go_out_and_their_results_come_back_in_either_api(server, monkeypatch):
    """A tool-calling answer (scripted: the tiny model's weights are random) reaches Ollama's clients with its
    arguments as an object and OpenAI's as JSON text; results sent back Ollama's way (calls without ids, results
    by tool_name) or OpenAI's (ids of their own) make the prompt the model's format writes for them."""
    llm = server.models.llm
    call = '[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]'
    answer = [llm.tokenizer.control("[TOOL_CALLS]"), *llm.tokenizer.encode(call)]
    prompts = []
    monkeypatch.setattr(llm, "_generate", lambda ids, params: prompts.append(ids) or iter(answer))
    question = [{"role": "user", "content": "Weather in Paris?"}]
    status, data = post(server, "/api/chat", {"model": "tiny", "messages": question, "tools": [WEATHER]})
    calls = lines(data)[-1]["message"]["tool_calls"]
    assert calls == [{"id": "abcDEF123", "type": "function",
                      "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    status, data = post(server, "/v1/chat/completions", {"model": "tiny", "messages": question, "tools": [WEATHER]})
    choice = json.loads(data)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [{"id": "abcDEF123", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]

    ollama_way = question + [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "21 C"}]
    post(server, "/api/chat", {"model": "tiny", "messages": ollama_way, "tools": [WEATHER]})
    ids = re.findall(r"\b[a-zA-Z0-9]{9}\b", llm.tokenizer.decode(prompts[-1]))
    call_id = ids[-1]
    linked = question + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": call_id, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "21 C"}]
    assert prompts[-1] == llm.tokenize_chat(linked, [WEATHER])
    openai_way = question + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_Xy12_long_openai_id", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_Xy12_long_openai_id", "content": "21 C"}]
    status, _ = post(server, "/v1/chat/completions", {"model": "tiny", "messages": openai_way, "tools": [WEATHER]})
    text = llm.tokenizer.decode(prompts[-1])
    assert status == 200 and "call_Xy12" not in text and len(set(re.findall(r'"call_id": "(\w+)"', text))) == 1


BAD_REQUESTS = [
    ("/api/chat", b"{not json", 400, "not JSON"),
    ("/api/chat", [1, 2], 400, "JSON object"),
    ("/api/chat", {"messages": QUESTION}, 400, "model is required"),
    ("/api/chat", {"model": "nothing-here", "messages": QUESTION}, 404, "not found: pull it first"),
    ("/api/chat", {"model": "tiny", "messages": QUESTION + [{"role": "assistant", "content": "x"}]}, 400,
     "must end with a user or tool message"),
    ("/api/chat", {"model": "tiny", "messages": QUESTION, "options": {"temperature": "hot"}}, 400,
     "temperature must be a number"),
    ("/api/chat", {"model": "tiny", "messages": QUESTION, "options": {"top_k": 2.5}}, 400, "top_k must be an integer"),
    ("/api/chat", {"model": "tiny", "messages": QUESTION, "options": {"temperature": -1}}, 400,
     "temperature must be >= 0"),
    ("/api/chat", {"model": "tiny", "messages": QUESTION, "format": ["json"]}, 400,
     'format must be "json" or a JSON schema'),
    ("/api/chat", {"model": "tiny", "messages": QUESTION, "format": {"type": "strnig"}}, 400,
     "format: #: type 'strnig' is not one of"),
    ("/v1/chat/completions", {"model": "tiny", "messages": QUESTION, "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"type": "object", "not": {}}}}}, 400,
     "format: #: the schema keyword 'not' is not supported"),
    ("/v1/chat/completions", {"model": "tiny", "messages": QUESTION, "response_format": {"type": "xml"}},
     400, "response_format 'xml' is not supported"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400,
     "images are not supported"),
    ("/api/chat", {"model": "tiny", "messages": QUESTION, "tools": [{"function": {"name": "a b"}}]}, 400,
     "is not 1-64 letters"),
    ("/v1/chat/completions", {"model": "tiny", "messages": QUESTION, "n": 2}, 400, "n must be 1"),
    ("/api/embed", {"model": "tiny", "input": [1, 2]}, 400, "input must be text or a list of texts"),
    ("/api/embeddings", {"model": "tiny", "prompt": ["a"]}, 400, "prompt must be text"),
    ("/api/chat", b'{"model": "tiny", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nests too deeply"),
    ("/api/embed", {"model": "tiny", "input": "x", "truncate": "yes"}, 400, "truncate must be true or false"),
    ("/api/embed", {"model": "tiny", "input": "x", "dimensions": 0}, 400, "dimensions must be between 1 and 64"),
    ("/api/embed", {"model": "tiny", "input": "x " * 100, "truncate": False, "options": {"num_ctx": 16}}, 400,
     "the context holds 16"),
    ("/v1/embeddings", {"model": "tiny", "input": "x", "encoding_format": "int8"}, 400,
     "encoding_format 'int8' is not supported"),
    ("/api/pull", {"model": "tiny"}, 404, "no such endpoint"),
    ("/api/chat", b'{"model": "tiny"}', 400, "messages must be a non-empty list"),
    ("/api/chat", {"model": "tiny", "messages": QUESTION, "options": [1]}, 400, "options must be an object"),
    ("/api/chat", {"model": "tiny", "messages": QUESTION, "options": {"num_ctx": 1e999}}, 400,
     "num_ctx must be an integer"),
    ("/v1/chat/completions", {"model": "tiny", "messages": QUESTION, "response_format": "json"}, 400,
     "response_format must be an object"),
]


@pytest.mark.parametrize("path,body,status,said", BAD_REQUESTS, ids=[b[3] for b in BAD_REQUESTS])
def test_a_bad_request_is_one_json_error(server, path, body, status, said):
    got, data = post(server, path, body)
    assert got == status and said in json.loads(data)["error"]
    assert get(server, "/api/version")[0] == 200  # and the server goes on


def test_a_chunked_body_is_read_and_a_bad_length_refused(server):
    """A body sent in chunks (as clients that stream a request send it) is the same request; a length that is
    not one, or another transfer encoding, is refused."""
    body = json.dumps({"model": "tiny", "messages": QUESTION, "stream": False,
                       "options": {"temperature": 0, "num_predict": 4}}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    connection.request("POST", "/api/chat", body=iter([body[:10], body[10:]]), encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 200
    assert json.loads(response.read())["message"] == json.loads(post(server, "/api/chat", json.loads(body))[1])[
        "message"]
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    connection.putrequest("POST", "/api/chat")
    connection.putheader("Transfer-Encoding", "gzip")
    connection.endheaders()
    assert connection.getresponse().status == 501
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    connection.putrequest("POST", "/api/chat")
    connection.putheader("Content-Length", "-5")
    connection.endheaders()
    assert connection.getresponse().status == 400


def test_only_this_machines_pages_and_names_reach_a_loopback_server(server):
    """A web page's request carries its Origin; a DNS name rebound to 127.0.0.1 arrives with that name as Host."""
    assert get(server, "/api/tags", {"Origin": "https://evil.example"})[0] == 403
    assert get(server, "/api/tags", {"Origin": "http://localhost:3000"})[0] == 200
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    connection.request("GET", "/api/tags", headers={"Host": "rebound.example:11434"})
    response = connection.getresponse()
    assert response.status == 403 and "loopback" in json.loads(response.read())["error"]
    status, data = post(server, "/api/chat", {"model": "tiny", "messages": QUESTION}, {"Origin": "null"})
    assert status == 403


def test_every_answer_runs_on_the_models_own_thread(server, monkeypatch):
    """Requests come on threads of their own; the model's work runs on the one thread in Models.work (the CLI's
    main thread: PyTorch's CPU threads run at half speed for another thread)."""
    llm, seen = server.models.llm, []
    generate = llm._generate
    monkeypatch.setattr(llm, "_generate", lambda ids, params: seen.append(threading.current_thread()) or
                        generate(ids, params))
    requests = [threading.Thread(target=post, args=(server, "/api/chat", {"model": "tiny", "messages": QUESTION,
                                                                          "options": {"num_predict": 3}}))
                for _ in range(3)]
    for request in requests:
        request.start()
    for request in requests:
        request.join(60)
    assert seen == [server.worker] * 3


def test_a_client_that_goes_away_stops_the_answer(server, monkeypatch):
    llm, ended = server.models.llm, threading.Event()

    def endless(ids, params):
        try:
            while True:
                yield llm.tokenizer.encode(" word")[-1]
                time.sleep(0.01)
        finally:
            ended.set()

    monkeypatch.setattr(llm, "_generate", endless)
    with socket.create_connection(server.server_address) as client:
        body = json.dumps({"model": "tiny", "messages": QUESTION}).encode()
        client.sendall(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
                       % (len(body), body))
        assert b'"done": false' in client.recv(4096) + client.recv(4096)
    assert ended.wait(10)  # the answer stopped, and the model is free for the next request
    monkeypatch.undo()
    status, _ = post(server, "/api/chat", {"model": "tiny", "messages": QUESTION, "options": {"num_predict": 2}})
    assert status == 200


def test_requests_name_any_pulled_model(server, folder):
    """/api/tags lists the pulled models and the one serve was given; a request for another loads it in place."""
    ref = resolve("someone/tiny:int8")
    convert(folder, Store().model_dir(ref), "int8")
    status, data = get(server, "/api/tags")
    names = [m["name"] for m in json.loads(data)["models"]]
    assert status == 200 and names == ["someone--tiny:int8", "tiny"]
    assert [m["id"] for m in json.loads(get(server, "/v1/models")[1])["data"]] == names
    for name, path, loaded in (("someone/tiny:int8", Store().model_dir(ref), True),
                               ("someone--tiny:int8", Store().model_dir(ref), False), ("tiny", folder, True)):
        status, data = post(server, "/api/chat", {"model": name, "messages": QUESTION, "stream": False,
                                                  "options": {"num_predict": 2}})
        reply = json.loads(data)
        assert status == 200 and reply["eval_count"] == 2 and (reply["load_duration"] > 0) == loaded
        assert server.models.path == str(path)


def test_show_and_ps_describe_a_model_as_ollamas_do(server, folder):
    """/api/show (what clients read to know a model can call tools) from the files; /api/ps the model held."""
    ref = resolve("someone/tiny:int8")
    convert(folder, Store().model_dir(ref), "int8")
    for name, quant in (("tiny", ""), ("someone/tiny:int8", "int8")):
        status, data = post(server, "/api/show", {"model": name})
        shown = json.loads(data)
        assert status == 200 and shown["capabilities"] == ["completion", "tools", "insert"]  # Mistral's v3 format
        assert shown["details"]["quantization_level"] == quant and shown["details"]["family"] == "mistral"
        assert shown["model_info"]["mistral.block_count"] == server.models.llm.args.n_layers
    assert post(server, "/api/show", {"model": "missing"})[0] == 404
    running = json.loads(get(server, "/api/ps")[1])["models"]
    assert [m["name"] for m in running] == ["tiny"] and running[0]["size"] > 0
    # keep_alive 0, Ollama's way to unload: after an answer, or alone
    post(server, "/api/chat", {"model": "tiny", "messages": QUESTION, "options": {"num_predict": 1}, "keep_alive": 0})
    assert json.loads(get(server, "/api/ps")[1])["models"] == [] and server.models.llm is None
    assert json.loads(post(server, "/api/generate", {"model": "tiny"})[1])["done_reason"] == "load"
    status, data = post(server, "/api/generate", {"model": "tiny", "keep_alive": "0s"})
    assert json.loads(data)["done_reason"] == "unload"
    assert server.models.llm is None


def test_a_port_or_host_it_cannot_listen_on_is_one_line(server, capsys):
    from lilmistral.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--port", "99999"])
    assert "99999 is not a port (0-65535)" in capsys.readouterr().err
    assert main(["serve", "--port", str(server.server_address[1])]) == 1  # taken by the fixture's server
    assert capsys.readouterr().err.startswith(f"Error: cannot listen on 127.0.0.1:{server.server_address[1]}: ")


def test_serve_listens_on_this_machine_only_by_default(tmp_path, folder):
    """`lilmistral serve MODEL --port 0`: 127.0.0.1, said on standard error; SIGINT stops it with status 0, and
    SIGTERM twice (a process group's, `timeout`'s) with 143 and nothing more said."""
    for stop in ([signal.SIGINT], [signal.SIGTERM, signal.SIGTERM]):
        process = subprocess.Popen([sys.executable, "-m", "lilmistral", "serve", str(folder), "--port", "0"],
                                   stderr=subprocess.PIPE, text=True, env={"LILMISTRAL_HOME": str(tmp_path),
                                                                           "PATH": "/usr/bin:/bin"})
        try:
            line = next(line for line in process.stderr if "listening on" in line)
            host, port = re.search(r"http://([\d.]+):(\d+)", line).groups()
            assert host == "127.0.0.1"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/tags", timeout=30) as response:
                assert json.loads(response.read())["models"][0]["name"] == str(folder)
            for number in stop:
                process.send_signal(number)
            assert process.wait(30) == (0 if stop == [signal.SIGINT] else 143)
            assert "Traceback" not in process.stderr.read()
        finally:
            process.kill()


def test_ollamas_and_openais_own_clients_talk_to_it(server, reference, monkeypatch):
    """The `ollama` and `openai` Python libraries, as their users call them: answers, streams, model lists, and a
    tool call's round trip (scripted answer) the way each library's documentation shows it."""
    from typing import Literal

    import ollama
    import openai
    import pydantic

    expected = "".join(reference.chat(QUESTION, temperature=0, max_tokens=6))
    client = ollama.Client(host=server.url)
    reply = client.chat(model="tiny", messages=QUESTION, options={"temperature": 0, "num_predict": 6})
    assert reply.message.content == expected and reply.eval_count == 6 and reply.done_reason == "length"
    parts = client.chat(model="tiny", messages=QUESTION, options={"temperature": 0, "num_predict": 6}, stream=True)
    assert "".join(part.message.content for part in parts) == expected
    assert client.generate(model="tiny", prompt="Hi", options={"num_predict": 2}).eval_count == 2
    assert [m.model for m in client.list().models] == ["tiny"]
    assert "tools" in client.show("tiny").capabilities and [m.model for m in client.ps().models] == ["tiny"]
    with pytest.raises(ollama.ResponseError, match="not found"):
        client.chat(model="missing", messages=QUESTION)

    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    completion = oa.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=6)
    assert completion.choices[0].message.content == expected and completion.usage.completion_tokens == 6
    stream = oa.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=6, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    assert [m.id for m in oa.models.list()] == ["tiny"]
    expected_vectors = reference.embed(["Hello", "World"]).tolist()
    assert client.embed(model="tiny", input=["Hello", "World"]).embeddings == expected_vectors
    assert client.embeddings(model="tiny", prompt="Hello").embedding == reference.embed("Hello", normalize=False)[
        0].tolist()
    vectors = [d.embedding for d in oa.embeddings.create(model="tiny", input=["Hello", "World"]).data]
    torch.testing.assert_close(torch.tensor(vectors), torch.tensor(expected_vectors))

    class Forecast(pydantic.BaseModel):  # structured outputs, as each library's documentation shows them
        unit: Literal["celsius", "fahrenheit"]
        sunny: bool

    reply = client.chat(model="tiny", messages=QUESTION, format=Forecast.model_json_schema(),
                        options={"temperature": 0})
    assert Forecast.model_validate_json(reply.message.content) and reply.done_reason == "stop"
    parsed = oa.chat.completions.parse(model="tiny", messages=QUESTION, temperature=0, response_format=Forecast)
    assert isinstance(parsed.choices[0].message.parsed, Forecast) and parsed.choices[0].finish_reason == "stop"

    llm = server.models.llm
    call = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    answer = [llm.tokenizer.control("[TOOL_CALLS]"), *llm.tokenizer.encode(call)]
    monkeypatch.setattr(llm, "_generate", lambda ids, params: iter(answer))
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat(model="tiny", messages=messages, tools=[WEATHER])
    assert reply.message.tool_calls[0].function.arguments == {"city": "Paris"}
    messages += [reply.message, {"role": "tool", "content": "21 C", "tool_name": "get_weather"}]
    monkeypatch.setattr(llm, "_generate", lambda ids, params: iter(llm.tokenizer.encode("It is 21 C.")))
    assert client.chat(model="tiny", messages=messages, tools=[WEATHER]).message.content == "It is 21 C."

    monkeypatch.setattr(llm, "_generate", lambda ids, params: iter(answer))
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    completion = oa.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER])
    calls = completion.choices[0].message.tool_calls
    assert completion.choices[0].finish_reason == "tool_calls" and json.loads(calls[0].function.arguments) == {
        "city": "Paris"}
    messages += [completion.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": calls[0].id, "content": "21 C"}]
    monkeypatch.setattr(llm, "_generate", lambda ids, params: iter(llm.tokenizer.encode("It is 21 C.")))
    completion = oa.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER])
    assert completion.choices[0].message.content == "It is 21 C."
