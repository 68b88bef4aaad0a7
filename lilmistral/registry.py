"""Model names (`mistral`, `mixtral:8x22b-instruct`, `mistral:7b-instruct-v0.3-int8`, a repo id) -> what to fetch."""
from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import LilmistralError
from .quant import SCHEMES

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
TAG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
GGUF_TYPE = re.compile(r"^[a-z0-9][a-z0-9_]{0,31}$")  # lower-cased: q4_k_m, iq4_xs, q8_0
HUB_PREFIX = re.compile(r"^(?:https?://)?(?:hf\.co|huggingface\.co)/")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
QUANT_SUFFIXES = ("int4", "int5", "int6", "int8", "bf16")
DEFAULT_FILES = ["config.json", "params.json", "model-*.safetensors", "model.safetensors",
                 "model.safetensors.index.json", "consolidated*.safetensors", "tekken.json", "tokenizer.model*",
                 "tokenizer.json", "tokenizer_config.json", "generation_config.json"]


@dataclass(frozen=True)
class ModelRef:
    """A resolved name: where the model comes from and how it is stored."""

    name: str  # store folder name: "mistral", or "mistralai--Mistral-7B-Instruct-v0.3" for a repo id
    tag: str
    repo: str
    files: tuple[str, ...]
    quant: str  # the scheme converted to; for a GGUF file, "" until pull reads the file (as the file stores it)
    num_ctx: int | None
    description: str = ""
    license: str = ""
    revision: str = "main"
    gguf: str = ""  # a GGUF file's type ("q4_k_m"): the repo's one file of that type is pulled, not `files`
    sampling: dict[str, Any] = field(default_factory=dict, compare=False)  # recommended options (the model card's)

    @property
    def display(self) -> str:
        return f"{self.name}:{self.tag}"


class UnknownModelError(LilmistralError):
    """A name or tag the registry does not know (the message suggests the closest ones)."""


def _shipped() -> dict[str, Any]:
    return tomllib.loads(resources.files("lilmistral").joinpath("models.toml").read_text())


def load_registry(home: Path | None = None) -> dict[str, Any]:
    """The shipped models.toml, overridden name by name and tag by tag by the store's own."""
    registry = _shipped()
    user = home / "models.toml" if home else None
    if user and user.is_file():
        try:
            overrides = tomllib.loads(user.read_text())
        except tomllib.TOMLDecodeError as e:
            raise LilmistralError(f"{user}: {e}") from None
        for name, entry in overrides.items():
            merged = registry.setdefault(name, {})
            tags = {**merged.get("tags", {}), **entry.get("tags", {})}
            merged.update(entry)
            merged["tags"] = tags
    return registry


def _validate_quant(quant: str, where: str) -> str:
    if quant not in SCHEMES:
        raise LilmistralError(f"{where}: unknown quantization {quant!r} (choose from {', '.join(SCHEMES)})")
    return quant


def resolve(ref: str, home: Path | None = None) -> ModelRef:
    """`name[:tag]` from the registry, or a Hugging Face repo id: `owner/name[:quant]` converts its safetensors
    weights (on a repo of GGUF files only, pull takes its file of that type: `:f16`), `owner/name:Q4_K_M` its
    GGUF file of that type."""
    registry = load_registry(home)
    ref = ref.strip()
    bare = HUB_PREFIX.sub("", ref)  # Ollama's hf.co/owner/name:Q4_K_M, or a pasted address
    if "/" in bare or bare != ref:
        repo, _, kind = bare.partition(":")
        if not REPO_ID.match(repo) or ".." in repo:
            raise LilmistralError(f"{ref!r} is not a valid model name or Hugging Face repo id")
        name, kind = repo.replace("/", "--"), kind.lower() or "int4"
        if kind in SCHEMES:
            return ModelRef(name=name, tag=kind, repo=repo, files=tuple(DEFAULT_FILES), quant=kind, num_ctx=None)
        if not GGUF_TYPE.match(kind):
            raise LilmistralError(f"{ref!r}: after the repo id comes a quantization ({', '.join(SCHEMES)}) or the "
                                  "type of one of its GGUF files (Q4_K_M, Q8_0, ...)")
        return ModelRef(name=name, tag=kind, repo=repo, files=(), quant="", num_ctx=None, gguf=kind)
    name, _, tag = ref.partition(":")
    if not NAME.match(name) or (tag and not TAG.match(tag)):
        raise LilmistralError(f"{ref!r} is not a valid model name (letters, digits, '.', '_', '-'; name[:tag])")
    entry = registry.get(name)
    if entry is None:
        parts = [known for known in registry if name in known.split("-")]  # "nemo": mistral-nemo
        close = list(dict.fromkeys(parts + difflib.get_close_matches(name, list(registry), n=3, cutoff=0.6)))[:3]
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(registry))}"
        raise UnknownModelError(f"unknown model {name!r}{hint}")
    tags: dict[str, Any] = entry.get("tags", {})
    tag = tag or entry.get("default", "latest")
    quant = None
    base = tag
    if tag not in tags:
        head, _, suffix = tag.rpartition("-")
        if suffix in QUANT_SUFFIXES and head in tags:
            base, quant = head, suffix
        else:
            close = difflib.get_close_matches(tag, list(tags), n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(f'{name}:{c}' for c in close)}?" if close else \
                f"; tags: {', '.join(sorted(tags))}"
            raise UnknownModelError(f"unknown tag {name}:{tag}{hint}")
    t = tags[base]
    try:
        gguf = str(t.get("gguf", "")).lower()
        if gguf and not GGUF_TYPE.match(gguf):
            raise LilmistralError(f"models.toml: {name}:{base}: gguf = {gguf!r} is not a GGUF type (Q4_K_M, Q8_0, ...)")
        sampling = [entry.get("sampling", {}), t.get("sampling", {})]  # the model's, a tag's over them
        if not all(isinstance(table, dict) for table in sampling):
            raise LilmistralError(f"models.toml: {name}:{base}: sampling must be a table (sampling = {{ temperature = "
                                  "0.3 })")
        return ModelRef(name=name, tag=tag, repo=t["repo"], files=tuple(t.get("files", DEFAULT_FILES)),
                        quant=_validate_quant(quant or t.get("quant", "int4"), f"{name}:{tag}") if not gguf else "",
                        gguf=gguf,
                        num_ctx=t.get("num_ctx"), description=t.get("description", entry.get("description", "")),
                        license=t.get("license", entry.get("license", "")), revision=t.get("revision", "main"),
                        sampling=sampling[0] | sampling[1])
    except KeyError as e:
        raise LilmistralError(f"models.toml: {name}:{base} has no {e}") from None

