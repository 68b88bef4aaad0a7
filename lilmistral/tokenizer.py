"""Tokenizers and chat formats: Mistral's own (through mistral_common), and streaming detokenization."""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import LilmistralError, ModelFormatError

Message = dict[str, Any]


class Tokenizer:
    """What the rest of lilmistral needs of a tokenizer and its chat format."""

    bos_id: int
    eos_ids: frozenset[int]
    vocab_size: int
    kind: str  # shown by `show`, e.g. "sentencepiece v3", "tekken"

    def encode(self, text: str, bos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode_chat(self, messages: list[Message]) -> list[int]:
        """The exact prompt ids for a conversation, ending where the assistant's answer begins."""
        raise NotImplementedError


def _spm_version(path: Path) -> str:
    """mistral_common reads the version from the file name; a bare tokenizer.model gets it from its vocabulary."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    controls = {sp.id_to_piece(i) for i in range(min(sp.vocab_size(), 1000)) if sp.is_control(i)}
    if "[SYSTEM_PROMPT]" in controls:
        return "v7"
    if "[IMG]" in controls:
        return "v3"
    if "[TOOL_CALLS]" in controls:
        return "v2"
    return "v1"


def _find_mistral_tokenizer_file(folder: Path) -> Path | None:
    tekken = sorted(folder.glob("tekken*.json"))
    if tekken:
        return tekken[-1]
    versioned = sorted(folder.glob("*.model.v*"), key=lambda p: p.name)
    if versioned:
        return versioned[-1]
    bare = folder / "tokenizer.model"
    return bare if bare.is_file() else None


class MistralTokenizer(Tokenizer):
    """Mistral's SentencePiece (v1, v2, v3, v7) and tekken tokenizers, with prompts built by mistral_common."""

    def __init__(self, path: Path) -> None:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MT

        try:
            if path.name == "tokenizer.model":
                with tempfile.TemporaryDirectory() as tmp:
                    versioned = Path(tmp) / f"tokenizer.model.{_spm_version(path)}"
                    versioned.symlink_to(path.resolve())
                    self._mt = MT.from_file(str(versioned))
            else:
                self._mt = MT.from_file(str(path))
        except Exception as e:  # mistral_common raises several kinds for unreadable files
            raise ModelFormatError(f"{path}: cannot load tokenizer ({e})") from None
        self._tok = self._mt.instruct_tokenizer.tokenizer
        self.bos_id = self._tok.bos_id
        self.eos_ids = frozenset({self._tok.eos_id})
        self.vocab_size = self._tok.n_words
        version = getattr(self._tok.version, "value", str(self._tok.version))
        self.kind = f"tekken {version}" if path.suffix == ".json" else f"sentencepiece {version}"

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return self._tok.encode(text, bos=bos, eos=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        try:
            request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
            return self._mt.encode_chat_completion(request).tokens
        except KeyError as e:
            raise LilmistralError(f"unknown message role {e} (use system, user, assistant)") from None
        except Exception as e:  # pydantic/mistral_common validation of the conversation's structure
            raise LilmistralError(f"invalid conversation: {str(e).splitlines()[0]}") from None


def load_tokenizer(folder: Path) -> Tokenizer:
    path = _find_mistral_tokenizer_file(folder)
    if path is None:
        raise ModelFormatError(f"{folder}: no tokenizer (tekken.json or tokenizer.model)")
    return MistralTokenizer(path)


class StreamDecoder:
    """Turns token ids into text pieces as they arrive, holding back incomplete UTF-8 characters.

    Decoding the last few tokens together (rather than one by one) keeps SentencePiece's
    leading-space handling and multi-token characters right.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the tokens decoded for context
        self._read = 0  # end of the tokens whose text was already emitted

    def push(self, token: int) -> str:
        self._ids.append(token)
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(done):]
        return ""
