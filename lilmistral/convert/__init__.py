"""Checkpoint sources (Hugging Face folders, GGUF files) and the converter to lilmistral's packed format.

The converter streams: it reads, packs and writes one tensor at a time, so its memory stays near the
size of the largest tensor, and it writes into a temporary folder renamed into place at the end.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import ModelArgs
from ..errors import LilmistralError, ModelFormatError
from ..generate import recommended_sampling
from ..model import Transformer
from ..quant import DEFAULT_GROUP_SIZE, GROUP_SIZES, SCHEMES, QuantSpec, quantize, spec_for
from ..quant.pack import packed_shapes
from ..store import require_space, sync
from .gguf import WIDE_TYPES, GGUFSource, gguf_tokenizer
from .hf import HFSource, TensorEntry

FORMAT_VERSION = 4  # the newest this version reads; 2: super-blocked int4; 3: int6; 4: int5 (docs/format.md)
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
FLOAT_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
TOKENIZER_GLOBS = ("tekken*.json", "*.model.v*", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                           "chat_template.jinja")

Source = HFSource | GGUFSource


def open_source(path: Path) -> Source:
    """A Hugging Face folder or a GGUF file to convert (or load, converting in memory)."""
    if path.is_file() and path.suffix == ".gguf":
        src: Source = GGUFSource(path)
    elif is_converted(path):
        raise LilmistralError(f"{path} is already a converted model: convert its source (a Hugging Face folder or "
                              "a .gguf) again instead")
    elif path.is_dir():
        src = HFSource(path)
    else:
        raise LilmistralError(f"{path}: not a model folder or a .gguf file")
    check_shapes(src, path)
    return src


def check_counts(args: ModelArgs, names: list[str], path: Path) -> None:
    """The config's layers and experts are the weights' (checked before a module is made for each)."""
    layers = {m[1] for name in names if (m := re.match(r"layers\.(\d+)\.", name))}
    experts = {m[1] for name in names if (m := re.match(r"layers\.0\.feed_forward\.experts\.(\d+)\.", name))}
    for what, said, found in (("layers", args.n_layers, layers), ("experts", args.n_experts, experts)):
        if said != len(found):
            raise ModelFormatError(f"{path}: the config says {said} {what}, the weights have {len(found)}")


def check_shapes(src: Source, path: Path) -> None:
    """Every tensor of the shape its config implies, before any is read: a damaged config (or another model's)
    is one line here, not a failed reshape while reading (RoPE's rows) or an allocation of its sizes."""
    a = src.args
    check_counts(a, [e.name for e in src.entries], path)

    def check(expected: dict[str, tuple[int, ...]]) -> None:  # every layer's tensors against layer 0's
        for e in src.entries:
            name = re.sub(r"^layers\.\d+\.", "layers.0.", e.name)
            if name in expected and tuple(e.shape) != expected[name]:
                raise ModelFormatError(f"{e.file}: tensor {e.name} has shape {tuple(e.shape)}, the config implies "
                                       f"{expected[name]}")

    # first the sizes the others are made of, before a model of them is made (RoPE's tables take memory); then
    # a model of one layer (the layers are alike; a source is opened several times a load)
    check({"tok_embeddings.weight": (a.vocab_size, a.dim),
           "layers.0.attention.wq.weight": (a.n_heads * a.head_dim, a.dim)})
    with torch.device("meta"):
        check({name: tuple(t.shape) for name, t in Transformer(replace(a, n_layers=1)).state_dict().items()})


def default_scheme(src: Source) -> str:
    """The lilmistral scheme closest to how the source is stored: each GGUF block type's own layout."""
    kinds = [e.source_type for e in src.entries if e.name.endswith(".w1.weight")] or [src.entries[0].source_type]
    kind = max(set(kinds), key=kinds.count)
    if kind in ("Q4_0", "Q4_1", "Q4_K"):
        return "int4"
    if kind in ("Q5_0", "Q5_1", "Q5_K"):
        return "int5"
    if kind == "Q6_K":
        return "int6"
    if kind == "Q8_0":
        return "int8"
    return "f32" if kind == "F32" else "bf16"


@dataclass(frozen=True)
class Planned:
    entry: TensorEntry
    spec: QuantSpec | None
    direct: bool  # made by src.read_packed: GGUF blocks re-laid (gguf.DIRECT_INT4), or to int8 a few rows at a time
    outputs: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]  # (name, dtype, shape) written


def plan(src: Source, scheme: str, group_size: int = DEFAULT_GROUP_SIZE,
         float_dtype: torch.dtype = torch.bfloat16) -> list[Planned]:
    """What every source tensor becomes, decided before anything is read."""
    if scheme not in SCHEMES:
        raise LilmistralError(f"unknown quantization {scheme!r} (choose from {', '.join(SCHEMES)})")
    if group_size not in GROUP_SIZES:
        raise LilmistralError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}")
    gguf = isinstance(src, GGUFSource)
    keep_wide = gguf and scheme == default_scheme(src) in ("int4", "int5")  # a 4- or 5-bit file's wider tensors
    planned = []
    for e in src.entries:
        spec = spec_for(e.name, e.shape, scheme, group_size, tied=src.args.tie_embeddings)
        # WIDE_TYPES keep their width: in a 4-bit file, and where int8 was not asked for but given (a head)
        if spec is not None and e.source_type in WIDE_TYPES and (keep_wide or spec.scheme == "int8" != scheme):
            spec = WIDE_TYPES[e.source_type]
        direct = src.direct_spec(e, spec) if gguf else None
        spec = direct or spec
        if spec is None:  # norms (1-D, tiny) keep float32 so the file loses nothing there
            outputs = ((e.name, torch.float32 if len(e.shape) == 1 else float_dtype, e.shape),)
        else:
            base = e.name.removesuffix(".weight")
            outputs = tuple((f"{base}.{part}", dtype, shape)
                            for part, (shape, dtype) in packed_shapes(e.shape[0], e.shape[1], spec).items())
        planned.append(Planned(e, spec, direct is not None, outputs))
    return planned


def produce(src: Source, planned: list[Planned]) -> Iterator[tuple[str, torch.Tensor]]:
    """The output tensors, one source tensor at a time."""
    for p in planned:
        if p.direct:
            parts = src.read_packed(p.entry, p.spec)  # type: ignore[union-attr]
        elif p.spec is not None:
            parts = quantize(src.read(p.entry), p.spec)
        else:
            yield p.outputs[0][0], src.read(p.entry).to(p.outputs[0][1])
            continue
        for name, _, _ in p.outputs:
            yield name, parts[name.rsplit(".", 1)[1]]


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _source_files(src: Source) -> list[Path]:
    return sorted({e.file for e in src.entries})


def tokenizer_files(folder: Path) -> list[Path]:
    return [p for g in TOKENIZER_GLOBS for p in folder.glob(g) if p.is_file()]


def _save_tokenizer(src: Source, folder: Path) -> str:
    if isinstance(src, GGUFSource):
        tok = gguf_tokenizer(src)
        tok.save(folder)
        return tok.kind
    copied = tokenizer_files(src.folder)
    if not copied:
        raise ModelFormatError(f"{src.folder}: no tokenizer files")
    for p in [*copied, *src.folder.glob("generation_config.json")]:  # the latter: ids that end an answer
        shutil.copy(p, folder / p.name)
    return ", ".join(sorted(p.name for p in copied))


def format_version(planned: list[Planned]) -> int:
    """The oldest format that holds these tensors, so that older lilmistral versions read what they can."""
    specs = [p.spec for p in planned if p.spec is not None]
    schemes = {s.scheme for s in specs}
    return 4 if "int5" in schemes else 3 if "int6" in schemes else 2 if any(s.super_block for s in specs) else 1


def convert(source: Path, out: Path, scheme: str, group_size: int = DEFAULT_GROUP_SIZE, overwrite: bool = False,
            on_write: Callable[[int], Callable[[int], None]] | None = None, extra: dict | None = None) -> Path:
    """Convert `source` into a lilmistral model folder at `out`, atomically. on_write(the bytes it will write)
    returns the callback that receives each tensor's bytes as they are written."""
    src = open_source(source)
    float_dtype = FLOAT_DTYPES.get(scheme, torch.bfloat16)
    planned = plan(src, scheme, group_size, float_dtype)
    if out.exists() and not overwrite:
        raise LilmistralError(f"{out} already exists")
    from .safetensors_io import SafetensorsWriter

    out.parent.mkdir(parents=True, exist_ok=True)
    outputs = [o for p in planned for o in p.outputs]
    total = sum(dtype.itemsize * math.prod(shape) for _, dtype, shape in outputs)
    require_space(out.parent, total, f"converting to {scheme}")
    written = on_write(total) if on_write else lambda n: None
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        version = format_version(planned)
        writer = SafetensorsWriter(tmp / WEIGHTS, outputs,
                                   metadata={"format": "pt", "lilmistral": str(version)})
        for name, tensor in produce(src, planned):
            writer.write(name, tensor)
            written(tensor.numel() * tensor.element_size())
        writer.close()
        manifest = {
            "format": "lilmistral", "format_version": version,
            "args": src.args.to_dict(),
            "quant": {"scheme": scheme, "group_size": group_size if scheme.startswith(("int4", "int5")) else None},
            "float_dtype": str(float_dtype).removeprefix("torch."),
            "tensors": {p.entry.name: p.spec.to_dict() for p in planned if p.spec is not None},
            "direct_tensors": sum(p.direct for p in planned),
            "tokenizer": _save_tokenizer(src, tmp),
            "source": {"path": str(source.resolve()), "kind": "gguf" if isinstance(src, GGUFSource) else "huggingface",
                       "sha256": sha256_files(_source_files(src))},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
            "sampling": {**recommended_sampling(src.sampling, str(source)),  # a registry entry's over the file's
                         **recommended_sampling((extra or {}).get("sampling"), "models.toml")},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for path in (*tmp.iterdir(), tmp):  # on the disk before the folder is renamed (and a pull's source removed)
            sync(path)
        _replace_dir(tmp, out)
        sync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing target is swapped out first and removed after."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(new, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def is_converted(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


__all__ = ["convert", "open_source", "tokenizer_files", "plan", "produce", "default_scheme", "is_converted"]
