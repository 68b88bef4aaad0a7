"""Read Hugging Face and Mistral-consolidated safetensors folders, tensor by tensor, memory-mapped."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..config import generation_config, load_args
from ..errors import ModelFormatError
from .safetensors_io import CODES, SafetensorsFile

# HF name -> lilmistral name (the names of Mistral's consolidated checkpoints). {i} layer, {e} expert.
HF_TO_LILMISTRAL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.block_sparse_moe.gate.weight": "layers.{i}.feed_forward.gate.weight",
    "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight": "layers.{i}.feed_forward.experts.{e}.w1.weight",
    "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight": "layers.{i}.feed_forward.experts.{e}.w2.weight",
    "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight": "layers.{i}.feed_forward.experts.{e}.w3.weight",
}
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def name_mapper(table: dict[str, str]):
    """A function mapping a source tensor name to lilmistral's via a table with {i}/{e} placeholders."""
    rules = []
    for src, dst in table.items():
        pattern = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
        rules.append((re.compile(pattern + "$"), dst))

    def map_name(name: str) -> str | None:
        for pattern, dst in rules:
            if m := pattern.match(name):
                return dst.format(**m.groupdict())
        return None

    return map_name


map_hf_name = name_mapper(HF_TO_LILMISTRAL)


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair RoPE rows (Mistral consolidated, GGUF) -> HF's half-split rows."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def weight_files(folder: Path) -> tuple[list[Path], bool]:
    """The safetensors files holding the weights, and whether they use HF names (else consolidated)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise ModelFormatError(f"{index}: not a safetensors index ({e})") from None
        files = [folder / s for s in shards]
        for f in files:
            if not f.is_file():
                raise ModelFormatError(f"{f}: shard listed in {index.name} is missing")
        return files, True
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"], True
    consolidated = sorted(folder.glob("consolidated*.safetensors"))
    if consolidated:
        return consolidated, False
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise ModelFormatError(f"{folder}: only pickle weights (.bin/.pt); lilmistral reads safetensors only")
    raise ModelFormatError(f"{folder}: no safetensors weights found")


@dataclass(frozen=True)
class TensorEntry:
    name: str  # lilmistral's name
    shape: tuple[int, ...]
    source_type: str  # e.g. "BF16", "Q4_1"
    file: Path
    key: str  # the name inside the file


class HFSource:
    """A Hugging Face (or Mistral consolidated) folder: config, tensor list, tensors on demand."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.args = load_args(folder)
        files, self.hf_names = weight_files(folder)
        self.entries: list[TensorEntry] = []
        for path in files:
            st = SafetensorsFile(path)
            for key, (dtype, shape, _, _) in st.entries.items():
                if IGNORED.match(key):
                    continue
                name = map_hf_name(key) if self.hf_names else key
                if name is None:
                    raise ModelFormatError(f"{path}: unexpected tensor {key!r}")
                self.entries.append(TensorEntry(name, shape, CODES[dtype], path, key))
        self._files = {p: SafetensorsFile(p) for p in files}

    @property
    def sampling(self) -> dict[str, Any]:
        """The sampling options generation_config.json recommends (those llama.cpp's converter takes), unchecked."""
        config = generation_config(self.folder)
        return {k: config[k] for k in ("temperature", "top_k", "top_p") if k in config}

    def read(self, entry: TensorEntry, mmap: bool = False) -> torch.Tensor:
        """The tensor in lilmistral's layout; memory-mapped (for loading) or read into memory (for converting)."""
        if mmap:
            with safe_open(str(entry.file), framework="pt") as f:
                tensor = f.get_tensor(entry.key)
        else:
            tensor = self._files[entry.file].read(entry.key)
        if not self.hf_names and entry.name.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = self.args.n_heads if ".wq." in entry.name else self.args.n_kv_heads
            tensor = unpermute_rope(tensor, heads)
        return tensor

    def tensors(self, mmap: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        for entry in self.entries:
            yield entry.name, self.read(entry, mmap)
