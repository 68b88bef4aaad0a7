"""Tokenizers: Mistral's own files (SentencePiece, tekken), `tokenizers` ones with a chat template, and streaming
detokenization."""
from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import generation_config
from .errors import LilmistralError, ModelFormatError

Message = dict[str, Any]


class Tokenizer:
    """What the rest of lilmistral needs of a tokenizer and its chat format."""

    # Mistral v15's model settings its file takes (`model_settings`): reasoning efforts and the default one, and
    # whether the answer's JSON schema goes into the prompt
    reasoning_efforts: tuple[str, ...] = ()
    default_reasoning_effort: str | None = None
    schema_setting = False

    bos_id: int
    eos_ids: frozenset[int]
    vocab_size: int
    kind: str  # shown by `show`, e.g. "sentencepiece v3", "tekken"
    instruct_version: int | None = None  # prompts in Mistral's instruct format of this version (chat.mistral_instruct)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def control_id(self, piece: str) -> int | None:
        """The id of a control token ("<s>", "[INST]"), or None where the vocabulary has none."""
        raise NotImplementedError

    def control(self, piece: str) -> int:
        token_id = self.control_id(piece)
        if token_id is None:
            raise ModelFormatError(f"this {self.kind} tokenizer has no {piece} token")
        return token_id

    def encode_chat(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
                    settings: dict[str, Any] | None = None) -> list[int]:
        """The exact prompt ids for a conversation (and the tools it may call), ending where the assistant's answer
        begins: here, in Mistral's instruct format of `instruct_version`, with `settings` (`model_settings()`'s;
        None: its defaults)."""
        from .chat import mistral_instruct

        return mistral_instruct(messages, self.instruct_version, self.encode, self.control, self.control("<s>"),
                                self.control("</s>"), tools, self.model_settings() if settings is None else settings)

    def model_settings(self, format: Any = None, reasoning_effort: str | None = None) -> dict[str, Any]:
        """Mistral v15's model settings, as mistral_common builds them from a request where the tokenizer file's
        `model_settings_builder` takes them: the reasoning effort (the file's default unless given) and the JSON
        schema an answer is held to (`format`; "json": an object or an array, as mistral_common's json_object)."""
        from .grammar import schema_of

        if reasoning_effort is not None and reasoning_effort not in self.reasoning_efforts:
            raise LilmistralError(f"reasoning_effort {reasoning_effort!r}: this model takes " + (
                ", ".join(self.reasoning_efforts) if self.reasoning_efforts else "none (its tokenizer has no such "
                                                                                  "setting; Mistral's v15 may)"))
        settings: dict[str, Any] = {}
        if self.reasoning_efforts:
            settings["reasoning_effort"] = reasoning_effort or self.default_reasoning_effort
        if self.schema_setting and format is not None:
            settings["json_schema"] = JSON_OBJECT_OR_ARRAY if format == "json" else schema_of(format)
        return settings

    def encode_fim(self, prefix: str, suffix: str) -> list[int]:
        """The prompt ids to fill in between `prefix` and `suffix`, in Mistral's format (Codestral's)."""
        from .chat import mistral_fim

        if not self.instruct_version or self.control_id("[SUFFIX]") is None or self.control_id("[PREFIX]") is None:
            raise LilmistralError("this model has no fill-in-the-middle format (Mistral's [SUFFIX] and [PREFIX] "
                                  "tokens: Codestral's)")
        return mistral_fim(prefix, suffix, self.encode, self.control, self.control("<s>"))

    def parse_tool_calls(self, ids: list[int]) -> list[dict[str, Any]] | None:
        """The tool calls in an answer's ids from its [TOOL_CALLS] token on (Mistral's formats only), None where
        they are not well formed."""
        from .chat import parse_tool_calls

        return parse_tool_calls(ids, self.instruct_version, self.decode, self.control_id)


def spm_version(controls: set[str]) -> int:
    """The instruct version of a Mistral SentencePiece vocabulary, told by its control tokens."""
    for piece, version in (("[SYSTEM_PROMPT]", 7), ("[IMG]", 3), ("[TOOL_CALLS]", 2)):
        if piece in controls:
            return version
    return 1


def bpe_merges(tokens: list[Any], priority: list[float]) -> list[tuple[int, int]]:
    """The merges of a vocabulary that lists none (SentencePiece's BPE, tiktoken's): every split of a token into
    two tokens, by the priority of the token it makes, as pairs of ids. Where priorities tie (SentencePiece's
    runs of spaces all score -1e9), the merge with the longer left part first: SentencePiece takes the leftmost
    of tied pairs, so a run grows from its left end (16 spaces, then the rest), which a ranked list of merges,
    one pair at a time, reproduces only this way."""
    index = {token: i for i, token in enumerate(tokens)}
    splits = [(priority[i], -j, index[token[:j]], index[token[j:]]) for i, token in enumerate(tokens)
              for j in range(1, len(token)) if token[:j] in index and token[j:] in index]
    return [(left, right) for _, _, left, right in sorted(splits)]


def find_mistral_tokenizer_file(folder: Path) -> Path | None:
    tekken = sorted(folder.glob("tekken*.json"))
    if tekken:
        return tekken[-1]
    versioned = sorted(folder.glob("*.model.v*"), key=lambda p: p.name)
    if versioned:
        return versioned[-1]
    bare = folder / "tokenizer.model"
    return bare if bare.is_file() else None


VERSIONS = (1, 2, 3, 7, 11, 13, 15)  # Mistral's instruct formats `chat.mistral_instruct` writes (text and tools)
JSON_OBJECT_OR_ARRAY = {"anyOf": [{"type": "object"}, {"type": "array"}]}  # mistral_common's json_object schema
# a tekken file's control tokens when it does not list them (files before v11)
TEKKEN_CONTROLS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                   "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")


def tekken_encoding(data: dict[str, Any]) -> Any:
    """A tekken file's byte-level BPE in tiktoken, whose algorithm it is (mistral_common's too): ids are the ranks,
    the control tokens below them are the caller's."""
    import tiktoken

    config = data["config"]
    size = config["default_vocab_size"] - config["default_num_special_tokens"]
    ranks = {base64.b64decode(t["token_bytes"]): rank for rank, t in enumerate(data["vocab"][:size])}
    return tiktoken.Encoding(name=f"tekken-{config['version']}", pat_str=config["pattern"], mergeable_ranks=ranks,
                             special_tokens={})


class MistralTokenizer(Tokenizer):
    """Mistral's SentencePiece (v1, v2, v3, v7) and tekken tokenizer files, with prompts in Mistral's instruct
    format of their version (`chat.mistral_instruct`)."""

    def __init__(self, path: Path) -> None:
        try:
            if path.suffix == ".json":
                self._load_tekken(path)
            else:
                self._load_sentencepiece(path)
        except Exception as e:  # sentencepiece, tiktoken and a malformed file raise several kinds
            raise ModelFormatError(f"{path}: cannot load tokenizer ({e})") from None
        if self.instruct_version not in VERSIONS:
            raise ModelFormatError(f"{path}: tokenizer version v{self.instruct_version} is not supported "
                                   f"({', '.join(f'v{v}' for v in VERSIONS)})")

    def _load_sentencepiece(self, path: Path) -> None:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.bos_id, self.eos_ids, self.vocab_size = sp.bos_id(), frozenset({sp.eos_id()}), sp.vocab_size()
        self.controls = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}
        # tokenizer.model.v3 (or .v7m1, a multimodal v7) names its version; Mistral's repos also ship v1, v3 and
        # v7 files as a bare tokenizer.model
        named = re.search(r"\.v(\d+)(?:m\d+)?$", path.name)
        self.instruct_version = int(named.group(1)) if named else spm_version(set(self.controls))
        self.kind = f"sentencepiece v{self.instruct_version}"
        self._encode, self._decode = sp.encode, sp.decode  # decode leaves control tokens out

    def _load_tekken(self, path: Path) -> None:
        data = json.loads(path.read_text(encoding="utf-8"))
        self.instruct_version = int(str(data["config"]["version"]).removeprefix("v"))
        self.kind = f"tekken v{self.instruct_version}"
        if self.instruct_version not in VERSIONS:
            return  # refused by __init__, in one line
        specials = data.get("special_tokens") or [{"rank": i, "token_str": t} for i, t in enumerate(TEKKEN_CONTROLS)]
        self.controls = {t["token_str"]: t["rank"] for t in specials}
        self.bos_id, self.eos_ids = self.controls["<s>"], frozenset({self.controls["</s>"]})
        self._read_settings_builder(data.get("model_settings_builder"))
        self.vocab_size = data["config"]["default_vocab_size"]
        offset = data["config"]["default_num_special_tokens"]  # ids below it are control tokens, ranks above
        bpe = tekken_encoding(data)
        self._encode = lambda text: [i + offset for i in bpe.encode_ordinary(text)]  # "[INST]" in a message is text
        self._decode = lambda ids: bpe.decode([i - offset for i in ids if i >= offset])  # bad UTF-8 as U+FFFD

    def _read_settings_builder(self, builder: Any) -> None:
        """A v15 file's model settings builder (mistral_common's ModelSettingsBuilder, as JSON), checked: a v15 file
        needs one (mistral_common encodes no prompt without), earlier files have none."""
        if builder is None and self.instruct_version < 15:
            return
        if (self.instruct_version >= 15) != isinstance(builder, dict):
            raise ValueError("a v15 file (and only one) has a model_settings_builder object")
        effort, schema = builder.get("reasoning_effort"), builder.get("json_schema")
        if effort is not None:
            values = effort.get("values") if isinstance(effort, dict) else None
            if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values) \
                    or effort.get("default") not in values:
                raise ValueError("model_settings_builder.reasoning_effort needs values and a default among them")
            self.reasoning_efforts, self.default_reasoning_effort = tuple(values), effort["default"]
        self.schema_setting = schema is not None

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return [self.bos_id, *self._encode(text)] if bos else self._encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)

    def control_id(self, piece: str) -> int | None:
        return self.controls.get(piece)


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer (built from GGUF metadata or a tokenizer.json) with a Jinja chat template."""

    def __init__(self, tk: Any, bos_id: int | None, eos_ids: set[int], chat_template: str | None,
                 add_bos: bool, kind: str, instruct_version: int | None = None) -> None:
        self._tk = tk
        self.bos_id = -1 if bos_id is None else bos_id
        self.eos_ids = frozenset(eos_ids)
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self.add_bos = add_bos and bos_id is not None
        self.kind = kind
        self.instruct_version = instruct_version  # a Mistral vocabulary's (a GGUF's: `gguf.mistral_instruct_version`)
        # in Mistral's format a message's "[INST]" is text, as Mistral's own tokenizers encode it
        tk.encode_special_tokens = instruct_version is not None

    def token(self, token_id: int) -> str:
        return self._tk.id_to_token(token_id) or ""

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self._tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos and self.bos_id >= 0 else ids

    def decode(self, ids: list[int]) -> str:
        return self._tk.decode(ids, skip_special_tokens=True)

    def control_id(self, piece: str) -> int | None:
        return self._tk.token_to_id(piece)

    def encode_chat(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
                    settings: dict[str, Any] | None = None) -> list[int]:
        """Mistral's instruct format for a Mistral vocabulary (`instruct_version`); else the chat template (given
        the tools as transformers gives them: `tools`; a template has no model settings)."""
        from .chat import check_tools, render_chat_template

        if self.instruct_version is not None:
            return super().encode_chat(messages, tools, settings)
        if not self.chat_template:
            raise LilmistralError("this model has no chat template")
        bos = self.token(self.bos_id) if self.bos_id >= 0 else ""
        eos = self.token(min(self.eos_ids)) if self.eos_ids else ""
        if tools is not None:
            check_tools(tools)
        text = render_chat_template(self.chat_template, messages, bos_token=bos, eos_token=eos,
                                    **({} if tools is None else {"tools": tools}))
        return self.encode(text, bos=self.add_bos and not (bos and text.startswith(bos)))

    def to_config(self) -> dict[str, Any]:
        """What tokenizer_config.json records beside tokenizer.json in a converted model."""
        return {"bos_token": self.token(self.bos_id) if self.bos_id >= 0 else None,
                "eos_token": [self.token(i) for i in sorted(self.eos_ids)],
                "add_bos_token": self.add_bos, "chat_template": self.chat_template, "lilmistral_kind": self.kind,
                "lilmistral_instruct_version": self.instruct_version}

    def save(self, folder: Path) -> None:
        self._tk.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(self.to_config(), indent=1, ensure_ascii=False))

    @classmethod
    def from_folder(cls, folder: Path) -> HFTokenizer:
        import tokenizers

        try:
            tk = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
            cfg = json.loads((folder / "tokenizer_config.json").read_text()) \
                if (folder / "tokenizer_config.json").is_file() else {}
        except Exception as e:  # tokenizers raises its own exception type for malformed files
            raise ModelFormatError(f"{folder}/tokenizer.json: cannot load ({e})") from None
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates (as transformers writes them): the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        if template is not None and not isinstance(template, str):
            raise ModelFormatError(f"{folder}/tokenizer_config.json: chat_template is not text")

        def token_id(tok: Any) -> int | None:
            if isinstance(tok, dict):
                tok = tok.get("content")
            return tk.token_to_id(tok) if isinstance(tok, str) else None

        eos = cfg.get("eos_token")
        eos_ids = {i for t in (eos if isinstance(eos, list) else [eos]) if (i := token_id(t)) is not None}
        eos_ids |= generation_end_ids(folder, tk.get_vocab_size())
        return cls(tk, token_id(cfg.get("bos_token")), eos_ids, template, bool(cfg.get("add_bos_token", False)),
                   cfg.get("lilmistral_kind", "huggingface tokenizer.json"), cfg.get("lilmistral_instruct_version"))


def generation_end_ids(folder: Path, vocab_size: int) -> set[int]:
    """The ids generation_config.json says end an answer (`eos_token_id`, one or a list), where transformers'
    generate() stops: a chat model's end of turn may not be its tokenizer's eos (Llama 3's <|eot_id|>)."""
    ids = generation_config(folder).get("eos_token_id")
    return {i for i in (ids if isinstance(ids, list) else [ids])
            if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size}


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
