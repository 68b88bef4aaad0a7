"""Prompt ids must be identical to mistral_common's for every tokenizer it ships."""
from __future__ import annotations

import shutil

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as Reference

from conftest import MC_DATA
from lilmistral.tokenizer import StreamDecoder, load_tokenizer

# (file shipped by mistral_common, name it gets in the model folder). Bare tokenizer.model is how
# Mistral-7B-Instruct-v0.1/v0.2 and some v0.3 repos ship it: its version must be detected.
TOKENIZERS = [
    ("tokenizer.model.v1", "tokenizer.model"),
    ("mistral_instruct_tokenizer_240216.model.v2", "tokenizer.model.v2"),
    ("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3"),
    ("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model"),
    ("mistral_instruct_tokenizer_241114.model.v7", "tokenizer.model.v7"),
    ("mistral_instruct_tokenizer_241114.model.v7", "tokenizer.model"),
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
]


@pytest.mark.parametrize("source,name", TOKENIZERS, ids=[f"{s}->{n}" for s, n in TOKENIZERS])
def test_prompt_ids_identical_to_mistral_common(tmp_path, source, name):
    shutil.copy(MC_DATA / source, tmp_path / name)
    ours = load_tokenizer(tmp_path)
    reference = Reference.from_file(str(MC_DATA / source))
    kinds = {S: SystemMessage, U: UserMessage, A: AssistantMessage}
    for conversation in CONVERSATIONS:
        messages = [{"role": r, "content": c} for r, c in conversation]
        request = ChatCompletionRequest(messages=[kinds[r](content=c) for r, c in conversation])
        expected = reference.encode_chat_completion(request).tokens
        assert ours.encode_chat(messages) == expected, conversation


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
    from lilmistral import LilmistralError

    shutil.copy(MC_DATA / "tekken_240911.json", tmp_path / "tekken.json")
    with pytest.raises(LilmistralError, match="role"):
        load_tokenizer(tmp_path).encode_chat([{"role": "robot", "content": "hi"}])
