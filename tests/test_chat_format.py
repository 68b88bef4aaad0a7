"""Prompt ids must be identical to mistral_common's for every tokenizer it ships (lilmistral encodes them
itself: mistral_common is the reference, a test dependency only)."""
from __future__ import annotations

import base64
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as Reference

from conftest import MC_DATA, MISTRAL_TEMPLATE, add_spm_vocab, make_hf_model, write_gguf
from lilmistral import LilmistralError
from lilmistral.cli import main
from lilmistral.convert import convert, open_source
from lilmistral.convert.gguf import gguf_tokenizer
from lilmistral.tokenizer import TEKKEN_CONTROLS, StreamDecoder, bpe_merges, load_tokenizer

# (file shipped by mistral_common, name it gets in the model folder). Bare tokenizer.model is how
# Mistral-7B-Instruct-v0.1/v0.2 and some v0.3 repos ship it: its version must be detected.
TOKENIZERS = [
    ("tokenizer.model.v1", "tokenizer.model"),
    ("mistral_instruct_tokenizer_240216.model.v2", "tokenizer.model.v2"),
    ("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3"),
    ("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model"),
    ("mistral_instruct_tokenizer_241114.model.v7", "tokenizer.model.v7"),
    ("mistral_instruct_tokenizer_241114.model.v7", "tokenizer.model"),
    ("mistral_instruct_tokenizer_241114.model.v7m1", "tokenizer.model.v7m1"),  # Mistral Large 2411's
    ("tekken_240718.json", "tekken.json"),
    ("tekken_240911.json", "tekken.json"),
]

S, U, A = "system", "user", "assistant"
CONVERSATIONS = [
    [(U, "Hello")],
    [(U, "What is the capital of France?")],
    [(S, "You are a helpful assistant."), (U, "Hi!")],
    [(U, "Hi"), (A, "Hello! How can I help?"), (U, "Tell me a joke.")],
    [(S, "Answer in French."), (U, "Good morning"), (A, "Bonjour"), (U, "Thank you")],
    [(U, "  leading and trailing spaces  ")],
    [(U, "line one\nline two\n\nline four")],
    [(U, "\ttabs\tand\r\nwindows newlines\r\n")],
    [(U, "naïve café résumé — “quotes” ‘single’")],
    [(U, "日本語のテキストと中文和한국어")],
    [(U, "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷")],
    [(U, "مرحبا بالعالم — שלום עולם")],
    [(U, "combining e\u0301 and zero\u200bwidth")],
    [(U, "[INST] not a control token [/INST] </s> <s>")],
    [(U, "code:\n```python\ndef f(x):\n    return x * 2\n```")],
    [(S, "Be terse."), (U, "1+1?"), (A, "2"), (U, "2+2?"), (A, "4"), (U, "3+3?")],
    [(U, "a" * 500)],
    [(U, "Numbers 1234567890 3.14159 -42 1e-9")],
    [(S, "multi\nline\nsystem"), (U, "x")],
    [(U, "first"), (A, " spaced answer "), (U, "second")],
    [(U, "¿Qué tal? Ça va? Grüß dich!"), (A, "Muy bien 😊"), (U, "Und dir?")],
    [(U, "    indented\n        more")],
    # shapes the format joins, moves or fills in
    [(S, "first"), (S, "second"), (U, "x")],
    [(U, "x"), (S, "in between"), (U, "y")],
    [(U, "x"), (U, "y")],
    [(S, "a system message alone")],
    [(S, "s"), (A, "an answer first"), (U, "x")],
    [(U, "")],
    [(S, ""), (U, "x")],
    [(U, "x"), (A, "trailing spaces   "), (U, "y")],
    [(U, "x"), (A, "one"), (A, "two"), (U, "y")],
    [(U, "x"), (S, "s1"), (A, "a"), (U, "y"), (S, "s2"), (U, "z")],
]
INVALID = [[], [(A, "x")], [(U, "x"), (A, "y")], [(U, "x"), (A, "y"), (S, "z"), (U, "w")],
           [(U, "x"), (A, ""), (U, "y")]]


# a v15 file's model settings, as mistral_common's ModelSettingsBuilder writes them: every prompt then says the
# reasoning effort (its default unless a request gives one), and a request's JSON schema
SETTINGS_BUILDER = {"reasoning_effort": {"type": "enum", "accepts_none": True, "default": "none",
                                         "values": ["none", "high"]},
                    "json_schema": {"type": "json_schema", "accepts_none": False, "default": None}}


def tekken_of_version(folder: Path, version: str, builder: dict | None = SETTINGS_BUILDER) -> Path:
    """tekken_240911.json (a v3 file) as a file of a later version: v7 reads its control tokens from the defaults,
    v11 and later from the file's own list, as Mistral's later files carry it (with tokens beyond the defaults');
    v15's with a model settings `builder`."""
    data = json.loads((MC_DATA / "tekken_240911.json").read_text())
    data["config"]["version"] = version
    if version != "v7":
        controls = [*TEKKEN_CONTROLS, "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]", "[MODEL_SETTINGS]",
                    "[/MODEL_SETTINGS]"]
        data["special_tokens"] = [{"rank": i, "token_str": t, "is_control": True} for i, t in enumerate(controls)]
    if version == "v15" and builder is not None:
        data["model_settings_builder"] = builder
    path = folder / "tekken.json"
    path.write_text(json.dumps(data))
    return path


def tokenizer_pair(tmp_path: Path, source: str, name: str):
    """lilmistral's tokenizer for the file under `name` (as a model folder holds it), and mistral_common's."""
    if source.startswith("tekken v"):
        path = tekken_of_version(tmp_path, source.removeprefix("tekken "))
    else:
        path = MC_DATA / source
        shutil.copy(path, tmp_path / name)
    return load_tokenizer(tmp_path), Reference.from_file(str(path))


ALL = [*TOKENIZERS, ("tekken v7", "tekken.json"), ("tekken v11", "tekken.json"), ("tekken v13", "tekken.json"),
       ("tekken v15", "tekken.json")]


def reference_ids(reference, conversation) -> list[int]:
    kinds = {S: SystemMessage, U: UserMessage, A: AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[r](content=c) for r, c in conversation])
    return reference.encode_chat_completion(request).tokens


@pytest.mark.parametrize("source,name", ALL, ids=[f"{s}->{n}" for s, n in ALL])
def test_prompt_ids_identical_to_mistral_common(tmp_path, source, name):
    ours, reference = tokenizer_pair(tmp_path, source, name)
    assert ours.kind.endswith(str(reference.instruct_tokenizer.tokenizer.version.value))
    for conversation in CONVERSATIONS:
        messages = [{"role": r, "content": c} for r, c in conversation]
        assert ours.encode_chat(messages) == reference_ids(reference, conversation), conversation
    for conversation in INVALID:  # what mistral_common refuses is a one-line error here
        with pytest.raises(Exception):
            reference_ids(reference, conversation)
        with pytest.raises(LilmistralError, match="invalid conversation"):
            ours.encode_chat([{"role": r, "content": c} for r, c in conversation])


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Paris"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get-time_2", "description": "L'heure à Zürich — “now”",
                                          "parameters": {"type": "object", "properties": {}}}}


def call(call_id: str, name: str = "get_weather", arguments=None):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def result(call_id: str, content: str, name: str | None = "get_weather"):
    return {"role": "tool", "tool_call_id": call_id, "name": name, "content": content}


def asks(*calls, content=None):
    return {"role": "assistant", "content": content, "tool_calls": list(calls)}


def user(text: str):
    return {"role": "user", "content": text}


PARIS = call("abcDEF123", arguments={"city": "Paris"})
TOKYO = call("Tokyo0001", arguments='{"city":  "Tokyo", "unit": "celsius"}')
# (name, messages, tools, the versions whose mistral_common refuses it)
TOOL_CONVERSATIONS = [
    ("tools offered", [user("What's the weather in Paris?")], [WEATHER, CLOCK], ()),
    ("no tools offered", [user("Hi")], [], ()),
    ("a call and its JSON result", [{"role": "system", "content": "Be brief."}, user("Weather in Paris?"), asks(PARIS),
                                    result("abcDEF123", '{"temperature": 21, "unit": "celsius"}')], [WEATHER], ()),
    ("a text result, no name", [user("Paris?"), asks(PARIS), result("abcDEF123", "sunny, 21 °C", None)], [WEATHER],
     ()),
    ("an empty result", [user("Paris?"), asks(PARIS), result("abcDEF123", "")], [WEATHER], ()),
    ("arguments as text, none, unicode", [user("x"), asks(TOKYO, call("noArgs123", "get-time_2"),
                                                              call("unicode12", arguments={"city": "Zürich"})),
                                          result("Tokyo0001", "[1, 2]"), result("noArgs123", "12:00"),
                                          result("unicode12", '"neige"')], [WEATHER, CLOCK], (2,)),
    ("results answered in another order", [user("x"), asks(PARIS, TOKYO), result("Tokyo0001", "rain"),
                                           result("abcDEF123", "sun")], [WEATHER], (2,)),
    ("a tool turn before the last user message", [user("Paris?"), asks(PARIS), result("abcDEF123", "21"),
                                                  {"role": "assistant", "content": "It is 21 °C. "},
                                                  user("And in Tokyo?")], [WEATHER], ()),
    ("two tool turns", [user("Paris?"), asks(PARIS), result("abcDEF123", "21"), asks(TOKYO),
                        result("Tokyo0001", "18")], [WEATHER], ()),
    ("text, then calls in the next message", [user("Paris?"), {"role": "assistant", "content": "Let me look."},
                                              asks(PARIS), result("abcDEF123", "21")], [WEATHER], (2, 3)),
    ("a system message after the results", [user("Paris?"), asks(PARIS), result("abcDEF123", "21"),
                                            user("ok"), {"role": "system", "content": "Answer in French."},
                                            user("Tokyo?")], [WEATHER], ()),
]
# (what lilmistral says, messages, tools)
BAD_TOOL_CONVERSATIONS = [
    ("answers no tool call", [user("x"), asks(PARIS), result("abcDEF123", "21"), result("Tokyo0001", "18"),
                              {"role": "assistant", "content": "y"}, user("z")], [WEATHER]),
    ("a tool message cannot follow a user message", [user("x"), result("abcDEF123", "21")], [WEATHER]),
    ("tool calls without their results", [user("x"), asks(PARIS), {"role": "assistant", "content": "y"}, user("z")],
     [WEATHER]),
    ("function name 'get weather' is not", [user("x"), asks(call("abcDEF123", "get weather")),
                                             result("abcDEF123", "1")], [WEATHER]),
    ("tool's name 'a.b' is not", [user("x")], [{"type": "function", "function": {"name": "a.b", "parameters": {}}}]),
    ("a tool message cannot follow a system message", [{"role": "system", "content": "s"},
                                                       result("abcDEF123", "1")], []),
]


def reference_request(messages, tools) -> ChatCompletionRequest:
    def reference(m):
        if m["role"] == "tool":
            return ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"], name=m["name"])
        if m["role"] == "assistant":
            calls = [ToolCall(id=c["id"], function=FunctionCall(**c["function"])) for c in m.get("tool_calls") or []]
            return AssistantMessage(content=m["content"], tool_calls=calls or None)
        return {"system": SystemMessage, "user": UserMessage}[m["role"]](content=m["content"])

    return ChatCompletionRequest(messages=[reference(m) for m in messages],
                                 tools=[Tool(function=Function(**t["function"])) for t in tools])


@pytest.mark.parametrize("source,name", ALL, ids=[f"{s}->{n}" for s, n in ALL])
def test_tool_conversations_identical_to_mistral_common(tmp_path, source, name):
    """Tools, tool calls and their results in every version's format (v2's JSON with names, v3's with call ids,
    v7's [TOOL_CONTENT], v11's [CALL_ID] and [ARGS], v13's tools at the first user message), as mistral_common
    encodes them; what it refuses is one line here."""
    ours, reference = tokenizer_pair(tmp_path, source, name)
    version = ours.instruct_version
    for title, messages, tools, refused_in in TOOL_CONVERSATIONS:
        request = reference_request(messages, tools)
        uses_tools = tools or any(m["role"] == "tool" for m in messages)
        if version == 1 and uses_tools:  # v1 has no tools (mistral_common leaves tools offered out)
            with pytest.raises(LilmistralError, match="Mistral v1"):
                ours.encode_chat(messages, tools)
            continue
        if version in refused_in:
            with pytest.raises(Exception):
                reference.encode_chat_completion(request)
            with pytest.raises(LilmistralError, match=f"Mistral v{version}"):
                ours.encode_chat(messages, tools)
            continue
        expected = reference.encode_chat_completion(request).tokens
        assert ours.encode_chat(messages, tools) == expected, title
    for said, messages, tools in BAD_TOOL_CONVERSATIONS:
        with pytest.raises(Exception):
            reference.encode_chat_completion(reference_request(messages, tools))
        with pytest.raises(LilmistralError, match=f"{said}|Mistral v1"):
            ours.encode_chat(messages, tools)


FIM = [("def f(x):\n    ", "\n    return y"), ("print(", ")"), ("", "  leading spaces"), ("x = ", ""),
       ("naïve 😀", " 日本語\n\tend")]


@pytest.mark.parametrize("source,name", ALL, ids=[f"{s}->{n}" for s, n in ALL])
def test_fill_in_the_middle_ids_identical_to_mistral_common(tmp_path, source, name):
    """Codestral's fill-in-the-middle prompt (suffix first, its leading space kept), as mistral_common encodes it;
    a vocabulary without [SUFFIX] and [PREFIX] (v1's, v2's) is one line (mistral_common writes <unk> for them)."""
    from mistral_common.protocol.fim.request import FIMRequest

    ours, reference = tokenizer_pair(tmp_path, source, name)
    if ours.control_id("[SUFFIX]") is None:
        with pytest.raises(LilmistralError, match="no fill-in-the-middle format"):
            ours.encode_fim("a", "b")
        return
    for prefix, suffix in FIM:
        assert ours.encode_fim(prefix, suffix) == reference.encode_fim(FIMRequest(prompt=prefix, suffix=suffix)).tokens


CALLS = [[PARIS], [TOKYO, call("noArgs123", "get-time_2"), call("unicode12", arguments={"city": "Zürich 🌨"})]]


@pytest.mark.parametrize("source,name", ALL, ids=[f"{s}->{n}" for s, n in ALL])
def test_tool_calls_a_model_writes_are_read_back(tmp_path, source, name):
    """An answer's tool calls, written as mistral_common writes them in an assistant message, are read back: names,
    arguments, and the ids where the format holds them (else a new id of 9 letters and digits)."""
    ours, reference = tokenizer_pair(tmp_path, source, name)
    version = ours.instruct_version
    if version == 1:
        return
    for calls in CALLS:
        message = reference_request([user("x"), asks(*calls)], []).messages[1]
        ids = reference.instruct_tokenizer.encode_assistant_message(message, False)
        assert ids[-1] == reference.instruct_tokenizer.tokenizer.eos_id and ids[0] == ours.control("[TOOL_CALLS]")
        parsed = ours.parse_tool_calls(ids[:-1])
        assert [c["function"]["name"] for c in parsed] == [c["function"]["name"] for c in calls]
        assert [c["function"]["arguments"] for c in parsed] == [json.loads(c["function"]["arguments"])
                                                                 if isinstance(c["function"]["arguments"], str)
                                                                 else c["function"]["arguments"] or {} for c in calls]
        keeps_ids = 3 <= version <= 11
        assert all((p["id"] == c["id"]) == keeps_ids and re.fullmatch("[a-zA-Z0-9]{9}", p["id"])
                   for p, c in zip(parsed, calls)), (version, parsed)
        assert ours.parse_tool_calls(ids[:-3]) is None  # cut short: not a call


def random_texts(seed: int) -> list[str]:
    """Slices of real prose and code, strings of awkward characters, and random code points."""
    rng = random.Random(seed)
    prose = (Path(__file__).parent.parent / "README.md").read_text() + Path(__file__).read_text()
    awkward = "aé日本語😀👍🏽 \n\t\r،ب  12.3\u200b\u0301ÿ\x00<s>[INST]"
    code_points = [*range(1, 0xD800), *range(0xE000, 0x30000)]  # no lone surrogates: not text
    texts = []
    for _ in range(400):
        start = rng.randrange(len(prose))
        texts.append(prose[start:start + rng.randrange(1, 400)])
        texts.append("".join(rng.choice(awkward) for _ in range(rng.randrange(1, 40))))
        texts.append("".join(chr(rng.choice(code_points)) for _ in range(rng.randrange(1, 20))))
    return texts


FILES = [(s, n) for s, n in TOKENIZERS if n != "tokenizer.model" or s.endswith(".v1")]  # each file once


@pytest.mark.parametrize("source,name", FILES, ids=[s for s, _ in FILES])
def test_text_ids_and_decoding_identical_to_mistral_common(tmp_path, source, name):
    ours, reference = tokenizer_pair(tmp_path, source, name)
    text_tokenizer = reference.instruct_tokenizer.tokenizer
    for text in random_texts(seed=len(source)):
        ids = text_tokenizer.encode(text, bos=False, eos=False)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == text_tokenizer.decode(ids), text
    chat = ours.encode_chat([{"role": "user", "content": "hi"}])
    assert ours.decode(chat) == text_tokenizer.decode(chat)  # control tokens left out


def test_a_later_tokenizer_version_is_one_line(tmp_path):
    data = json.loads((MC_DATA / "tekken_240911.json").read_text())
    data["config"]["version"] = "v16"
    (tmp_path / "tekken.json").write_text(json.dumps(data))
    with pytest.raises(LilmistralError, match="tokenizer version v16 is not supported"):
        load_tokenizer(tmp_path)


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "description": "naïve, 日本"}},
          "required": ["city"]}


@pytest.mark.parametrize("builder", [SETTINGS_BUILDER, {"reasoning_effort": SETTINGS_BUILDER["reasoning_effort"]},
                                     {"json_schema": SETTINGS_BUILDER["json_schema"]}, None],
                         ids=["effort+schema", "effort", "schema", "no builder"])
def test_v15_model_settings_identical_to_mistral_common(tmp_path, builder):
    """Mistral v15's [MODEL_SETTINGS] (reasoning effort, given or the file's default, and the answer's JSON schema:
    json_object's, a json_schema's) after the tools at the first user message, as mistral_common builds and
    encodes them from a request, for each builder a tekken file may carry; a reasoning effort the file does not
    take is one line."""
    from mistral_common.protocol.instruct.request import ResponseFormat

    path = tekken_of_version(tmp_path, "v15", builder)
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Where?"}, {"role": "user", "content": "Paris"}]
    if builder is None:
        with pytest.raises(Exception, match="model_settings_builder must not be None"):
            Reference.from_file(str(path)).encode_chat_completion(reference_request(messages, []))
        with pytest.raises(LilmistralError, match="a v15 file .and only one. has a model_settings_builder"):
            load_tokenizer(tmp_path)
        return
    ours, reference = load_tokenizer(tmp_path), Reference.from_file(str(path))
    formats = {None: {}, "json": {"type": "json_object"},
               "schema": {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}}}
    efforts = [None, "none", "high"] if builder and "reasoning_effort" in builder else [None]
    for tools in (None, [WEATHER]):
        for effort in efforts:
            for name, response_format in formats.items():
                request = reference_request(messages, tools or [])
                request.reasoning_effort = effort
                request.response_format = ResponseFormat(**response_format) if response_format else ResponseFormat()
                expected = reference.encode_chat_completion(request).tokens
                settings = ours.model_settings(SCHEMA if name == "schema" else name, effort)
                assert ours.encode_chat(messages, tools, settings) == expected, (tools, effort, name)
    with pytest.raises(LilmistralError, match="reasoning_effort 'max': this model takes "):
        ours.model_settings(None, "max")


def test_chat_puts_the_reasoning_effort_and_the_format_into_a_v15_models_settings(tmp_path, monkeypatch):
    """A model with a v15 tekken file: `chat(reasoning_effort=..., format=...)` prompts it as mistral_common does
    with that request (the schema in its settings, and the answer held to it), `lilmistral serve`'s OpenAI route
    passes `reasoning_effort` on; a model without such settings refuses one in one line."""
    import lilmistral
    from lilmistral.grammar import Grammar
    from mistral_common.protocol.instruct.request import ResponseFormat

    make_hf_model(tmp_path, vocab_size=131072)
    (tmp_path / "tokenizer.model.v3").unlink()
    reference = Reference.from_file(str(tekken_of_version(tmp_path, "v15")))
    llm = lilmistral.load(tmp_path)
    prompts = []
    generate = llm._generate
    monkeypatch.setattr(llm, "_generate", lambda ids, params: prompts.append(ids) or generate(ids, params))
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    answer = "".join(llm.chat(messages, reasoning_effort="high", format=SCHEMA, temperature=0, max_tokens=20))
    request = reference_request(messages, [])
    request.reasoning_effort = "high"
    request.response_format = ResponseFormat(type="json_schema", json_schema={"name": "w", "schema": SCHEMA})
    assert prompts[-1] == reference.encode_chat_completion(request).tokens
    grammar = Grammar(SCHEMA)
    assert answer and grammar.steps(grammar.start, answer)  # held to the schema too
    list(llm.chat(messages, max_tokens=1))
    assert prompts[-1] == reference.encode_chat_completion(reference_request(messages, [])).tokens  # the default
    with pytest.raises(LilmistralError, match="reasoning_effort 'low': this model takes none, high"):
        list(llm.chat(messages, reasoning_effort="low"))

    import threading
    import urllib.request

    from lilmistral.serve import Models, make_server

    models = Models(lilmistral.load, ("tiny", str(tmp_path), llm))
    httpd = make_server("127.0.0.1", 0, models)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    threading.Thread(target=models.work, daemon=True).start()
    body = {"model": "tiny", "messages": messages, "reasoning_effort": "high", "max_tokens": 1}
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{httpd.server_address[1]}/v1/chat/completions",
                                                  data=json.dumps(body).encode()), timeout=60).read()
    request.response_format = ResponseFormat()
    assert prompts[-1] == reference.encode_chat_completion(request).tokens
    httpd.shutdown()
    models.stop()
    (tmp_path / "v3").mkdir()
    shutil.copy(MC_DATA / "tekken_240911.json", tmp_path / "v3" / "tekken.json")
    with pytest.raises(LilmistralError, match="this model takes none .its tokenizer has no such setting"):
        load_tokenizer(tmp_path / "v3").model_settings(None, "high")


def test_a_reasoning_models_thinking_comes_apart_from_its_answer(tmp_path, monkeypatch):
    """A v13+ model's answer "[THINK]...[/THINK]answer" (scripted: the tiny model's weights are random): `chat`
    yields the thinking as `Thinking` pieces (stop strings do not end it) and the answer as text; joined, they are
    the text as before; the REPL's conversation keeps the answer and shows the thinking between Ollama's lines;
    serve gives Ollama's `thinking` (streamed, whole, and to the ollama client) and OpenAI's `reasoning_content`."""
    import threading
    import urllib.request

    import ollama

    import lilmistral
    from lilmistral.llm import Thinking
    from lilmistral.repl import Chat, thinking_marked
    from lilmistral.serve import Models, make_server

    make_hf_model(tmp_path, vocab_size=131072)
    (tmp_path / "tokenizer.model.v3").unlink()
    tekken_of_version(tmp_path, "v13")
    llm = lilmistral.load(tmp_path)
    tok = llm.tokenizer
    answer = [tok.control("[THINK]"), *tok.encode("Paris? STOP, check: yes."), tok.control("[/THINK]"),
              *tok.encode("It is Paris.")]
    monkeypatch.setattr(llm, "_generate", lambda ids, params: iter(answer))
    question = [{"role": "user", "content": "Capital of France?"}]
    pieces = list(llm.chat(question, stop=["STOP"]))
    assert "".join(p for p in pieces if isinstance(p, Thinking)) == "Paris? STOP, check: yes."
    assert "".join(p for p in pieces if not isinstance(p, Thinking)) == "It is Paris."
    assert "".join(pieces) == tok.decode(answer)
    chat = Chat(llm)
    shown = "".join(thinking_marked(chat.ask("Capital of France?")))
    assert shown == "Thinking...\nParis? STOP, check: yes.\n...done thinking.\n\nIt is Paris."
    assert chat.messages[-1] == {"role": "assistant", "content": "It is Paris."}

    models = Models(lilmistral.load, ("tiny", str(tmp_path), llm))
    httpd = make_server("127.0.0.1", 0, models)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    threading.Thread(target=models.work, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"

    def post(path, body):
        request = urllib.request.Request(url + path, data=json.dumps(body).encode())
        return urllib.request.urlopen(request, timeout=60).read().decode()

    lines = [json.loads(line) for line in post("/api/chat", {"model": "tiny", "messages": question}).splitlines()]
    assert "".join(line["message"].get("thinking", "") for line in lines) == "Paris? STOP, check: yes."
    assert "".join(line["message"]["content"] for line in lines) == "It is Paris."
    whole = json.loads(post("/api/chat", {"model": "tiny", "messages": question, "stream": False}))["message"]
    assert whole["thinking"] == "Paris? STOP, check: yes." and whole["content"] == "It is Paris."
    reply = ollama.Client(host=url).chat(model="tiny", messages=question)
    assert reply.message.thinking == "Paris? STOP, check: yes." and reply.message.content == "It is Paris."
    message = json.loads(post("/v1/chat/completions", {"model": "tiny", "messages": question}))["choices"][0][
        "message"]
    assert message["reasoning_content"] == "Paris? STOP, check: yes." and message["content"] == "It is Paris."
    httpd.shutdown()
    models.stop()


@pytest.mark.parametrize("source", ["tokenizer.model.v1", "mistral_instruct_tokenizer_241114.model.v7",
                                    "tekken_240911.json"])
def test_stream_decoder_keeps_utf8_whole(tmp_path, source):
    shutil.copy(MC_DATA / source, tmp_path / ("tekken.json" if source.endswith(".json") else "tokenizer.model"))
    tok = load_tokenizer(tmp_path)
    text = "Hello wörld 😀 日本語 👨‍👩‍👧 ok"
    ids = tok.encode(text)
    decoder = StreamDecoder(tok.decode)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) < len(ids)  # some characters did span several tokens


def test_bad_role_is_a_user_error(tmp_path):
    shutil.copy(MC_DATA / "tekken_240911.json", tmp_path / "tekken.json")
    with pytest.raises(LilmistralError, match="role"):
        load_tokenizer(tmp_path).encode_chat([{"role": "robot", "content": "hi"}])


def test_mistral_common_is_not_needed_to_run(tmp_path):
    """It is the tests' reference only: with it impossible to import, both kinds of Mistral tokenizer work."""
    conversation = [(S, "Be brief."), (U, "Hi")]
    expected = {}
    for source, name in (("mistral_instruct_tokenizer_241114.model.v7", "tokenizer.model"),
                         ("tekken_240911.json", "tekken.json")):
        (tmp_path / source).mkdir()
        shutil.copy(MC_DATA / source, tmp_path / source / name)
        expected[str(tmp_path / source)] = reference_ids(Reference.from_file(str(MC_DATA / source)), conversation)
    code = ("import json, pathlib, sys; sys.modules['mistral_common'] = None\n"
            "from lilmistral.tokenizer import load_tokenizer\n"
            f"messages = {[{'role': r, 'content': c} for r, c in conversation]!r}\n"
            f"print(json.dumps({{f: load_tokenizer(pathlib.Path(f)).encode_chat(messages) "
            f"for f in {list(expected)!r}}}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == expected


# Mistral's templates for v2/v3 and v7 vocabularies, as Hugging Face repos (and the GGUFs made from them) carry
# them in spirit: the same markers, whitespace of their own
V3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
               "'[/INST]' }}{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}"
               "{% endfor %}")
V7_TEMPLATE = "{% if messages[0]['role'] == 'system' %}[SYSTEM_PROMPT]{% endif %}" + V3_TEMPLATE
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}<|im_start|>assistant\\n")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model's tensors, to write GGUFs around a vocabulary."""
    import lilmistral

    folder = tmp_path_factory.mktemp("tiny") / "m"
    make_hf_model(folder, "mistral")
    llm = lilmistral.load(folder)
    return llm.model.state_dict(), llm.args


def byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte, the alphabet of a byte-level BPE's tokens in a GGUF."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)}
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def add_tekken_vocab(w, data: dict) -> None:
    """A tekken vocabulary's GGUF metadata as llama.cpp's converter writes Nemo's: control tokens, then the ranks as
    byte-level strings, with their merges."""
    offset = data["config"]["default_num_special_tokens"]
    size = data["config"]["default_vocab_size"] - offset
    tokens = [base64.b64decode(t["token_bytes"]) for t in data["vocab"][:size]]
    chars = byte_chars()
    names = ["".join(chars[b] for b in token) for token in tokens]
    controls = [*TEKKEN_CONTROLS, *(f"<SPECIAL_{i}>" for i in range(len(TEKKEN_CONTROLS), offset))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("tekken")
    w.add_token_list(controls + names)
    w.add_token_types([3] * offset + [1] * size)
    w.add_token_merges([f"{names[a]} {names[b]}" for a, b in bpe_merges(tokens, list(range(size)))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


GGUF_VOCABULARIES = [("mistral_instruct_tokenizer_240323.model.v3", V3_TEMPLATE, "v3"),
                     ("mistral_instruct_tokenizer_241114.model.v7", V7_TEMPLATE, "v7"),
                     ("tekken_240911.json", V3_TEMPLATE, "v3"), ("tekken_240911.json", V7_TEMPLATE, "v7")]


@pytest.mark.parametrize("source,template,version", GGUF_VOCABULARIES,
                         ids=[f"{s}-{v}" for s, _, v in GGUF_VOCABULARIES])
def test_a_gguf_of_a_mistral_vocabulary_prompts_as_mistral_common(tiny, tmp_path, source, template, version):
    """A GGUF of a Mistral model (Mistral 7B v0.3, Nemo, Small 3) takes Mistral's own format, not its template,
    whose whitespace and system messages are its converter's; its version from the vocabulary's
    control tokens (SentencePiece) or the template's use of [SYSTEM_PROMPT] (tekken, whose every version has it).
    Its template stays where it is not Mistral's (a fine-tune's ChatML), and a v1 vocabulary has no control
    tokens to tell it by."""
    state, args = tiny
    if source.endswith(".json"):
        data = json.loads((MC_DATA / source).read_text())
        vocab = lambda w: add_tekken_vocab(w, data)  # noqa: E731
        reference = Reference.from_file(str(tekken_of_version(tmp_path, version)))
    else:
        vocab = lambda w: add_spm_vocab(w, MC_DATA / source)  # noqa: E731
        reference = Reference.from_file(str(MC_DATA / source))
    write_gguf(tmp_path / "m.gguf", state, args, vocab=vocab, template=template)
    ours = gguf_tokenizer(open_source(tmp_path / "m.gguf"))
    assert ours.instruct_version == int(version[1:])
    for conversation in CONVERSATIONS:
        messages = [{"role": r, "content": c} for r, c in conversation]
        assert ours.encode_chat(messages) == reference_ids(reference, conversation), conversation
    text_tokenizer = reference.instruct_tokenizer.tokenizer
    for text in random_texts(seed=3) + [" " * n + "x" for n in range(1, 40)]:  # runs of spaces: see bpe_merges
        assert ours.encode(text) == text_tokenizer.encode(text, bos=False, eos=False), text
    write_gguf(tmp_path / "chatml.gguf", state, args, vocab=vocab, template=CHATML)
    assert gguf_tokenizer(open_source(tmp_path / "chatml.gguf")).instruct_version is None


def test_a_gguf_of_mistrals_v1_vocabulary_is_known_by_its_digest(tiny, tmp_path, capsys):
    """v1 writes [INST] as text: its GGUFs (Mistral 7B v0.1/v0.2, Mixtral 8x7B) are told by their vocabulary,
    whose digest is that of mistral_common's v1 file; another vocabulary (Llama 2's, say) keeps its template."""
    write_gguf(tmp_path / "m.gguf", *tiny, template=MISTRAL_TEMPLATE)  # Mistral's v1 vocabulary
    ours = gguf_tokenizer(open_source(tmp_path / "m.gguf"))
    assert ours.instruct_version == 1
    reference = Reference.from_file(str(MC_DATA / "tokenizer.model.v1"))
    for conversation in CONVERSATIONS:
        messages = [{"role": r, "content": c} for r, c in conversation]
        assert ours.encode_chat(messages) == reference_ids(reference, conversation), conversation
    converted = convert(tmp_path / "m.gguf", tmp_path / "converted", "int8")  # it keeps to the format
    assert load_tokenizer(converted).instruct_version == 1
    assert main(["show", str(converted)]) == 0 and "chat format   Mistral instruct" in capsys.readouterr().out

    def another_vocabulary(w):  # one piece other than Mistral's
        add_token_list = w.add_token_list
        w.add_token_list = lambda tokens: add_token_list([*tokens[:-1], "\u2581lilmistral"])
        add_spm_vocab(w)

    write_gguf(tmp_path / "other.gguf", *tiny, vocab=another_vocabulary, template=MISTRAL_TEMPLATE)
    other = gguf_tokenizer(open_source(tmp_path / "other.gguf"))
    assert other.instruct_version is None and other.chat_template == MISTRAL_TEMPLATE


def test_a_tokenizer_config_with_named_chat_templates_uses_the_default_one(tmp_path):
    """transformers writes several templates as a list of {name, template}; one that is not text is one line."""
    from conftest import smollm2_gguf

    gguf_tokenizer(open_source(smollm2_gguf())).save(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ 'D' }}"}]
    config_path.write_text(json.dumps(config))
    assert load_tokenizer(tmp_path).chat_template == "{{ 'D' }}"
    config["chat_template"] = 5
    config_path.write_text(json.dumps(config))
    with pytest.raises(LilmistralError, match="chat_template is not text"):
        load_tokenizer(tmp_path)


TOOLS_TEMPLATE = ("{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
                  "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                  "{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}<|im_end|>\n{% endfor %}"
                  "<|im_start|>assistant\n")


def test_a_chat_template_gets_the_tools_as_transformers_gives_them(tmp_path):
    import transformers
    from conftest import smollm2_gguf

    gguf_tokenizer(open_source(smollm2_gguf())).save(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"chat_template": TOOLS_TEMPLATE, "eos_token": config["eos_token"][0]}))
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    conversation = [user("Paris?"), asks(PARIS, content=""), result("abcDEF123", "21")]
    for tools in (None, [WEATHER, CLOCK]):
        expected = reference.apply_chat_template(conversation, tools=tools, add_generation_prompt=True,
                                                 return_dict=False)
        assert ours.encode_chat(conversation, tools) == list(expected)
    assert "Tools: [{" in ours.decode(ours.encode_chat(conversation, [WEATHER]))
    with pytest.raises(LilmistralError, match="tools must be a list"):
        ours.encode_chat(conversation, {"get_weather": WEATHER})


def test_a_folder_answer_ends_at_the_ids_generation_config_names_too(tmp_path):
    """transformers' generate() stops at generation_config.json's eos_token_id (one or a list), which may name a
    chat model's end of turn where tokenizer_config's eos does not (Llama 3's <|eot_id|>): so does lilmistral,
    in the folder and once converted. Ids out of the vocabulary, or not numbers, are left out; a damaged file
    gives none."""
    from conftest import smollm2_gguf

    folder = tmp_path / "hf"
    make_hf_model(folder, "llama", vocab_size=49152)
    (folder / "tokenizer.model.v3").unlink()  # SmolLM2's tokenizer.json instead
    gguf_tokenizer(open_source(smollm2_gguf())).save(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"eos_token": "<|endoftext|>"}))
    (folder / "generation_config.json").unlink()  # transformers wrote one, with the config's eos
    assert load_tokenizer(folder).eos_ids == {0}
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2, 10**9, True, "x"]}))
    assert load_tokenizer(folder).eos_ids == {0, 2}
    converted = convert(folder, tmp_path / "converted", "int8")
    assert load_tokenizer(converted).eos_ids == {0, 2}
    (folder / "generation_config.json").write_text("{")
    with pytest.warns(UserWarning, match="generation_config.json: cannot read JSON"):
        assert load_tokenizer(folder).eos_ids == {0}
