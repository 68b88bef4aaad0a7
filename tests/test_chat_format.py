"""Prompt ids must be identical to mistral_common's for every tokenizer it ships (lilmistral encodes them
itself: mistral_common is the reference, a test dependency only)."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as Reference

from conftest import MC_DATA
from lilmistral import LilmistralError
from lilmistral.tokenizer import TEKKEN_CONTROLS, StreamDecoder, load_tokenizer

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
INVALID = [[], [(A, "x")], [(U, "x"), (A, "y")], [(U, "x"), (A, "y"), (S, "z"), (U, "w")], [(U, "x"), (A, ""), (U, "y")]]


def tekken_of_version(folder: Path, version: str) -> Path:
    """tekken_240911.json (a v3 file) as a file of a later version: v7 reads its control tokens from the defaults,
    v11 and later from the file's own list, as Mistral's later files carry it (with tokens beyond the defaults')."""
    data = json.loads((MC_DATA / "tekken_240911.json").read_text())
    data["config"]["version"] = version
    if version != "v7":
        data["special_tokens"] = [{"rank": i, "token_str": t, "is_control": True}
                                  for i, t in enumerate([*TEKKEN_CONTROLS, "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]"])]
    path = folder / "tekken.json"
    path.write_text(json.dumps(data))
    return path


def tokenizer_pair(tmp_path: Path, source: str, name: str):
    """lilmistral's tokenizer for the file under `name` (as a model folder holds it), and mistral_common's."""
    if source.startswith("tekken v"):
        path = tekken_of_version(tmp_path, source.removeprefix("tekken "))
    else:
        path = tmp_path / name
        shutil.copy(MC_DATA / source, path)
    return load_tokenizer(tmp_path), Reference.from_file(str(path if source.startswith("tekken v") else MC_DATA / source))


ALL = [*TOKENIZERS, ("tekken v7", "tekken.json"), ("tekken v11", "tekken.json"), ("tekken v13", "tekken.json")]


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
    data["config"]["version"] = "v15"
    (tmp_path / "tekken.json").write_text(json.dumps(data))
    with pytest.raises(LilmistralError, match="tokenizer version v15 is not supported"):
        load_tokenizer(tmp_path)


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
            f"print(json.dumps({{f: load_tokenizer(pathlib.Path(f)).encode_chat(messages) for f in {list(expected)!r}}}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == expected
