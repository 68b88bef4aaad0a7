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


def find_mistral_tokenizer_file(folder: Path) -> Path | None:
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


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer (built from GGUF metadata or a tokenizer.json) with a Jinja chat template."""

    def __init__(self, tk: Any, bos_id: int | None, eos_ids: set[int], chat_template: str | None,
                 add_bos: bool, kind: str) -> None:
        self._tk = tk
        self.bos_id = -1 if bos_id is None else bos_id
        self.eos_ids = frozenset(eos_ids)
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self.add_bos = add_bos and bos_id is not None
        self.kind = kind

    def token(self, token_id: int) -> str:
        return self._tk.id_to_token(token_id) or ""

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self._tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos and self.bos_id >= 0 else ids

    def decode(self, ids: list[int]) -> str:
        return self._tk.decode(ids, skip_special_tokens=True)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        from .chat import render_chat_template

        if not self.chat_template:
            raise LilmistralError("this model has no chat template")
        bos = self.token(self.bos_id) if self.bos_id >= 0 else ""
        eos = self.token(min(self.eos_ids)) if self.eos_ids else ""
        text = render_chat_template(self.chat_template, messages, bos_token=bos, eos_token=eos)
        return self.encode(text, bos=self.add_bos and not (bos and text.startswith(bos)))

    def to_config(self) -> dict[str, Any]:
        """What tokenizer_config.json records beside tokenizer.json in a converted model."""
        return {"bos_token": self.token(self.bos_id) if self.bos_id >= 0 else None,
                "eos_token": [self.token(i) for i in sorted(self.eos_ids)],
                "add_bos_token": self.add_bos, "chat_template": self.chat_template, "lilmistral_kind": self.kind}

    def save(self, folder: Path) -> None:
        import json

        self._tk.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(self.to_config(), indent=1, ensure_ascii=False))

    @classmethod
    def from_folder(cls, folder: Path) -> HFTokenizer:
        import json

        import tokenizers

        try:
            tk = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
            cfg = json.loads((folder / "tokenizer_config.json").read_text()) \
                if (folder / "tokenizer_config.json").is_file() else {}
        except Exception as e:  # tokenizers raises its own exception type for malformed files
            raise ModelFormatError(f"{folder}/tokenizer.json: cannot load ({e})") from None
        template = cfg.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()

        def token_id(tok: Any) -> int | None:
            if isinstance(tok, dict):
                tok = tok.get("content")
            return tk.token_to_id(tok) if isinstance(tok, str) else None

        eos = cfg.get("eos_token")
        eos_ids = {i for t in (eos if isinstance(eos, list) else [eos]) if (i := token_id(t)) is not None}
        return cls(tk, token_id(cfg.get("bos_token")), eos_ids, template, bool(cfg.get("add_bos_token", False)),
                   cfg.get("lilmistral_kind", "huggingface tokenizer.json"))


def load_tokenizer(folder: Path) -> Tokenizer:
    """A Mistral tokenizer file (tekken.json, tokenizer.model[.vN]) when there is one, else tokenizer.json."""
    path = find_mistral_tokenizer_file(folder)
    if path is not None:
        return MistralTokenizer(path)
    if (folder / "tokenizer.json").is_file():
        return HFTokenizer.from_folder(folder)
    raise ModelFormatError(f"{folder}: no tokenizer (tekken.json, tokenizer.model or tokenizer.json)")


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
