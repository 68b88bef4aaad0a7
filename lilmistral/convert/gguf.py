"""Read GGUF files (`general.architecture = llama`: Mistral 7B, Mixtral): config, tensors, tokenizer.

A GGUF file is untrusted input: metadata is type-checked, tensor extents are checked against the
file, and its chat template is only ever rendered in a sandbox (see chat.py).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..config import ModelArgs, RopeScaling
from ..errors import ModelFormatError
from ..quant import vnni
from ..quant.pack import QuantSpec, pack_int6, quantize_int8
from ..tokenizer import HFTokenizer, bpe_merges, spm_version
from .hf import TensorEntry, name_mapper, unpermute_rope

GGUF_TO_LILMISTRAL = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
    "blk.{i}.ffn_gate_inp.weight": "layers.{i}.feed_forward.gate.weight",
    "blk.{i}.ffn_gate.{e}.weight": "layers.{i}.feed_forward.experts.{e}.w1.weight",  # older Mixtral files
    "blk.{i}.ffn_down.{e}.weight": "layers.{i}.feed_forward.experts.{e}.w2.weight",
    "blk.{i}.ffn_up.{e}.weight": "layers.{i}.feed_forward.experts.{e}.w3.weight",
}
# Experts stacked in one 3-D tensor [E, out, in]: one entry per expert, {e} filled in.
GGUF_STACKED = {
    "blk.{i}.ffn_gate_exps.weight": "layers.{i}.feed_forward.experts.{e}.w1.weight",
    "blk.{i}.ffn_down_exps.weight": "layers.{i}.feed_forward.experts.{e}.w2.weight",
    "blk.{i}.ffn_up_exps.weight": "layers.{i}.feed_forward.experts.{e}.w3.weight",
}
map_gguf_name = name_mapper(GGUF_TO_LILMISTRAL)
map_stacked_name = name_mapper({k: v.replace("{e}", "{{e}}") for k, v in GGUF_STACKED.items()})

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Tokens that end an answer whatever the file's eos and eot ids say, by their text: llama.cpp's list (a
# ChatML fine-tune whose eos is <|endoftext|> ends its turns with <|im_end|>)
END_OF_GENERATION = frozenset({"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
                               "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>"})
GGUF_SAMPLING = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",  # llama.cpp's keys
                 "general.sampling.top_p": "top_p", "general.sampling.penalty_repeat": "repeat_penalty",
                 "general.sampling.penalty_last_n": "repeat_last_n"}
BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED = (*FLOAT_TYPES, *BLOCK_TYPES)
# Block formats that are one of lilmistral's int4 layouts (group 32), re-laid without requantizing, every value
# the same: type -> its spec. Q4_0, Q4_1 bit for bit; Q4_K's super-blocks of 256 with their 6-bit codes of
# each sub-block's scale and min
DIRECT_INT4 = {"Q4_0": QuantSpec("int4", 32, True), "Q4_1": QuantSpec("int4", 32, False),
               "Q4_K": QuantSpec("int4", 32, False, super_block=256)}
# Block formats that are one of lilmistral's int5 layouts (int4's plus a plane of fifth bits), re-laid likewise
DIRECT_INT5 = {"Q5_0": QuantSpec("int5", 32, True), "Q5_1": QuantSpec("int5", 32, False),
               "Q5_K": QuantSpec("int5", 32, False, super_block=256)}
# Q6_K super-blocks are int6 (pack.py), every value the same
Q6_K_SPEC = QuantSpec("int6", 16, True, super_block=256)
# Block types of 6 bits or more, which a mostly 4-bit file (llama.cpp's Q4_K_M: its output head, attn_v and
# ffn_down of half the layers in Q6_K) keeps for its sensitive tensors, and what they become there: Q6_K int6
# exactly (requantized to int4 they had 6.4% relative error; to int8, 0.85%), Q8_0 int8
WIDE_TYPES = {"Q6_K": Q6_K_SPEC, "Q8_0": QuantSpec("int8")}
INT8_CHUNK_BYTES = 2**22  # about the float32 bytes of rows read_packed decodes at a time on their way to int8


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # as GGUF lists it: innermost dimension first
    type_name: str  # a GGMLQuantizationType name ("Q4_0", "F32", ...)
    data_offset: int  # absolute, in `file`
    n_bytes: int
    file: Path  # the part of a split GGUF that holds it (else the file)


# GGUF metadata value types: id -> format of a scalar, the same in struct and numpy (8: string, 9: array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_LENGTH = struct.Struct("<Q")
SPLIT_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


class _HeaderParser:
    """The GGUF header (metadata and tensor table) straight from the bytes; about 100x faster than
    gguf.GGUFReader on a 50k-token vocabulary, and every length is checked against the file."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError("the header runs past the end of the file")
        view = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.strings(1)[0]

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind != 9:
            raise ValueError(f"unknown metadata value type {kind}")
        item_kind, count = self.scalar("<I"), self.scalar("<Q")
        if item_kind in _SCALARS:
            dtype = np.dtype(_SCALARS[item_kind])
            return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
        if count > len(self.buf):
            raise ValueError("an array longer than the file")
        if item_kind == 8:
            return self.strings(count)
        return [self.value(item_kind) for _ in range(count)]

    def strings(self, count: int) -> list[str]:
        """count strings in one tight loop: a vocabulary and its merges are 50k-300k of them."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        length = _LENGTH.unpack_from
        for _ in range(count):
            if pos + 8 > end:
                raise ValueError("the header runs past the end of the file")
            n = length(buf, pos)[0]
            pos += 8 + n
            if pos > end:
                raise ValueError("the header runs past the end of the file")
            out.append(str(buf[pos - n:pos], "utf-8", "replace"))
        self.pos = pos
        return out


def read_gguf_header(path: Path) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """Metadata and tensor table of a GGUF file (v2 or v3). Read once per version of the file: a load opens
    it thrice (its size, its tensors, its tokenizer), and a 50k-token vocabulary's header takes 0.05-0.07 s to parse."""
    stat = path.stat()
    return _read_gguf_header(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.cache
def ggml() -> ModuleType:
    """The gguf package's constants module (GGMLQuantizationType, GGML_QUANT_SIZES, GGUF_MAGIC, LlamaFileType)
    without the package: its __init__ imports its vocabulary module, which imports mistral_common, 0.4-0.9 s
    of every GGUF load. The whole package where the module does not stand alone."""
    spec = importlib.util.find_spec("gguf")
    location = importlib.util.spec_from_file_location(
        "lilmistral.convert._ggml_constants", Path(spec.submodule_search_locations[0]) / "constants.py")
    module = importlib.util.module_from_spec(location)
    try:
        location.loader.exec_module(module)
    except ImportError:
        import gguf

        return gguf
    return module


@functools.lru_cache(maxsize=2)
def _read_gguf_header(path: Path, mtime_ns: int, size: int) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    constants = ggml()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        p = _HeaderParser(buf)
        if p.scalar("<I") != constants.GGUF_MAGIC or p.scalar("<I") not in (2, 3):
            raise ValueError("not GGUF version 2 or 3")
        n_tensors, n_kv = p.scalar("<Q"), p.scalar("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = p.string()
            metadata[key] = p.value(p.scalar("<I"))
        table = []
        for _ in range(n_tensors):
            name = p.string()
            shape = tuple(p.scalar("<Q") for _ in range(p.scalar("<I")))
            table.append((name, shape, constants.GGMLQuantizationType(p.scalar("<I")), p.scalar("<Q")))
        alignment = metadata.get("general.alignment", constants.GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise ValueError("bad general.alignment")
        data_start = -(-p.pos // alignment) * alignment
    tensors = []
    for name, shape, kind, offset in table:
        block, block_bytes = constants.GGML_QUANT_SIZES[kind]
        elements = int(np.prod(shape, dtype=np.uint64)) if shape else 1
        tensors.append(GGUFTensorInfo(name, shape, kind.name, data_start + offset, elements // block * block_bytes,
                                      path))
    return metadata, tensors


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks [n, 34] (a float16 scale, 32 int8 values) -> float32 [n, 32]."""
    return blocks[:, 2:].view(torch.int8) * blocks[:, :2].view(torch.float16).float()


_SHIFTS_4, _SHIFTS_2 = torch.tensor([0, 4], dtype=torch.uint8), torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def q6k_quants(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K super-blocks [n, 210] -> their 6-bit quants uint8 [n, 256] in order: per 128 values, 64 bytes of low
    nibbles (values 0-63, then 64-127) and 32 of 2-bit highs (four a byte)."""
    n = blocks.shape[0]
    low = (blocks[:, :128].reshape(n, 2, 1, 64) >> _SHIFTS_4.view(1, 1, 2, 1)) & 0x0F  # [n, 2, 2, 64]
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> _SHIFTS_2.view(1, 1, 4, 1)) & 0x03  # [n, 2, 4, 32]
    return (low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << 4)).reshape(n, 256)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K super-blocks [n, 210] -> float32 [n, 256]: the quants less 32, times the float16 scale times an int8
    one per 16 values. The gguf package's Q6_K.dequantize_blocks, step for step (the same bits)."""
    n = blocks.shape[0]
    q = q6k_quants(blocks).view(torch.int8) - 32
    scales = blocks[:, 208:210].contiguous().view(torch.float16).float() * blocks[:, 192:208].view(torch.int8).float()
    return (scales.reshape(n, 16, 1) * q.reshape(n, 16, 16).float()).reshape(n, 256)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K super-blocks [n, 144] -> float32 [n, 256] (q4k_parts has the layout), as the gguf package computes
    them."""
    n = blocks.shape[0]
    d, dmin = (factor.float().view(n, 1, 1) for factor in q4k_factors(blocks))
    scale_codes, min_codes = q4k_codes(blocks.view(n, 1, 144))
    scales, mins = d * scale_codes.float(), dmin * min_codes.float()
    q = (blocks[:, 16:].reshape(n, 4, 1, 32) >> _SHIFTS_4.view(1, 1, 2, 1)) & 0x0F  # [n, 4, 2, 32]
    return (scales.reshape(n, 8, 1) * q.reshape(n, 8, 32).float() - mins.reshape(n, 8, 1)).reshape(n, 256)


BLOCK_DECODERS = {"Q8_0": (34, _q8_0), "Q4_K": (144, _q4_k), "Q6_K": (210, _q6_k)}  # (bytes a block, decoder)


def dequantize_blocks(raw: torch.Tensor, kind: str) -> torch.Tensor:
    """Rows of GGML blocks of type `kind` -> float32 values, the gguf package's bits: in C++ where lilmistral's
    CPU kernels are built (every block type; a large table's time is then the float32 output's fresh pages);
    else Q8_0 (the embeddings and output head of many Q4_0 files), Q4_K and Q6_K (Q4_K_M's embeddings and wider
    tensors) in PyTorch, 2-7x faster than the gguf package's numpy, and other types by it."""
    if vnni.available():
        return torch.ops.lilmistral.gguf_dequantize(raw, kind)
    if kind not in BLOCK_DECODERS:
        import gguf

        return torch.from_numpy(gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[kind]))
    block_bytes, decode = BLOCK_DECODERS[kind]
    blocks = raw.view(raw.shape[0], -1, block_bytes)
    out = torch.empty(raw.shape[0], raw.shape[1] // block_bytes * ggml().GGML_QUANT_SIZES[
        ggml().GGMLQuantizationType[kind]][0])
    step = max(1, 2**20 // blocks[0].nbytes)  # rows a MB at a time: small temporaries (see read_packed)
    for start in range(0, raw.shape[0], step):
        chunk = blocks[start:start + step]
        out[start:start + step] = decode(chunk.reshape(-1, block_bytes)).view(chunk.shape[0], -1)
    return out


def gguf_parts(path: Path) -> list[Path]:
    """The files of the GGUF that `path` is part of: llama.cpp's gguf-split names them `NAME-00001-of-00003.gguf`,
    the first holding the metadata, each its share of the tensors; a file that is not split, alone."""
    match = SPLIT_NAME.search(path.name)
    if match is None:
        return [path]
    count = int(match.group(2))
    parts = [path.with_name(f"{path.name[:match.start()]}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    if missing := [p.name for p in parts if not p.is_file()]:
        raise ModelFormatError(f"{path}: part of a GGUF split in {count} files; missing {', '.join(missing)}")
    return parts


@dataclass(frozen=True)
class GGUFEntry(TensorEntry):
    offset: int = 0  # absolute byte offset of this (expert's) data in the file
    nbytes: int = 0


class GGUFSource:
    def __init__(self, path: Path) -> None:
        self.parts = gguf_parts(path)
        self.path = self.parts[0]
        self._maps: dict[Path, mmap.mmap] = {}  # each file, mapped when its tensors are first read
        self.tensors: list[GGUFTensorInfo] = []
        for part in self.parts:
            try:
                metadata, tensors = read_gguf_header(part)
            except (ValueError, KeyError, OverflowError, struct.error) as e:  # bad lengths, unknown types, truncation
                raise ModelFormatError(f"{part}: not a readable GGUF file "
                                       f"({str(e).splitlines()[0] or type(e).__name__})") from None
            if part == self.path:
                self.metadata = metadata
            elif metadata.get("split.count") != len(self.parts):
                raise ModelFormatError(f"{part}: not part of a GGUF split in {len(self.parts)} files")
            self.tensors += tensors
        arch = self.metadata.get("general.architecture")
        if arch != "llama":
            raise ModelFormatError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
        self.args = self._args()
        self.entries = self._entries()

    @property
    def sampling(self) -> dict[str, Any]:
        """The sampling options the file recommends, by SamplingParams' names, unchecked (llama.cpp reads them)."""
        values = {ours: self.metadata[key] for key, ours in GGUF_SAMPLING.items() if key in self.metadata}
        if isinstance(values.get("top_k"), int) and values["top_k"] < 0:
            values["top_k"] = 0  # llama.cpp's "off"
        return values

    def meta(self, key: str, kind: type, default: Any = None) -> Any:
        value = self.metadata.get(key, default)
        if value is default:
            return default
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind):
            raise ModelFormatError(f"{self.path}: metadata {key} should be {kind.__name__}, is {type(value).__name__}")
        return value

    def _args(self) -> ModelArgs:
        a = "llama."
        try:
            dim = self.meta(a + "embedding_length", int)
            heads = self.meta(a + "attention.head_count", int)
            scaling = None
            kind = self.meta(a + "rope.scaling.type", str)
            if kind in ("linear", "yarn"):
                scaling = RopeScaling(kind=kind, factor=self.meta(a + "rope.scaling.factor", float),
                                      original_max_position=self.meta(a + "rope.scaling.original_context_length", int))
            has_output = any(t.name == "output.weight" for t in self.tensors)
            embd = next((t for t in self.tensors if t.name == "token_embd.weight"), None)
            if embd is None:
                raise ModelFormatError(f"{self.path}: no token_embd.weight tensor")
            return ModelArgs(
                dim=dim, n_layers=self.meta(a + "block_count", int), n_heads=heads,
                n_kv_heads=self.meta(a + "attention.head_count_kv", int, heads),
                hidden_dim=self.meta(a + "feed_forward_length", int),
                vocab_size=int(embd.shape[-1]),
                head_dim=self.meta(a + "attention.key_length", int, 0),
                norm_eps=self.meta(a + "attention.layer_norm_rms_epsilon", float, 1e-5),
                rope_theta=self.meta(a + "rope.freq_base", float, 10000.0),
                rope_scaling=scaling, sliding_window=None,
                max_seq_len=self.meta(a + "context_length", int, 4096),
                tie_embeddings=not has_output,
                n_experts=self.meta(a + "expert_count", int, 0), n_experts_per_tok=self.meta(a + "expert_used_count", int, 0),
                architecture="MixtralForCausalLM" if self.meta(a + "expert_count", int, 0) else "LlamaForCausalLM",
            )
        except (TypeError, ValueError) as e:
            raise ModelFormatError(f"{self.path}: incomplete or invalid llama metadata ({e})") from None

    def _entries(self) -> list[GGUFEntry]:
        sizes = {file: file.stat().st_size for file in {t.file for t in self.tensors}}
        entries = []
        for t in self.tensors:
            kind = t.type_name
            if kind not in SUPPORTED:
                raise ModelFormatError(f"{self.path}: tensor {t.name} has type {kind}, which lilmistral cannot read "
                                       f"(supported: {', '.join(SUPPORTED)})")
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
            if t.data_offset + t.n_bytes > sizes[t.file]:
                raise ModelFormatError(f"{t.file}: truncated (tensor {t.name} runs past the end)")
            if (stacked := map_stacked_name(t.name)) is not None:
                per_expert = t.n_bytes // shape[0]
                for e in range(shape[0]):
                    entries.append(GGUFEntry(stacked.format(e=e), shape[1:], kind, t.file, t.name,
                                             t.data_offset + e * per_expert, per_expert))
                continue
            name = map_gguf_name(t.name)
            if name is None:
                raise ModelFormatError(f"{t.file}: unexpected tensor {t.name!r}")
            entries.append(GGUFEntry(name, shape, kind, t.file, t.name, t.data_offset, int(t.n_bytes)))
        return entries

    def _raw(self, entry: GGUFEntry) -> torch.Tensor:
        """The entry's bytes, a row per output row, where the file is mapped (copy-on-write, never written: the
        readers copy what they keep). No copy."""
        if entry.file not in self._maps:
            with open(entry.file, "rb") as f:
                self._maps[entry.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        raw = np.frombuffer(self._maps[entry.file], dtype=np.uint8, count=entry.nbytes, offset=entry.offset)
        return torch.from_numpy(raw).view(entry.shape[0], -1)

    def _done_with(self, entry: GGUFEntry) -> None:
        """Unmap the pages of an entry that was read into memory of its own (its mapped bytes were touched
        once): they leave the process's resident memory, and stay in the page cache. Whole pages of its own
        only: a neighbour's may be being read."""
        start, end = -(-entry.offset // mmap.PAGESIZE) * mmap.PAGESIZE, entry.offset + entry.nbytes
        if end - start >= mmap.PAGESIZE and hasattr(mmap, "MADV_DONTNEED"):
            self._maps[entry.file].madvise(mmap.MADV_DONTNEED, start, (end - start) // mmap.PAGESIZE * mmap.PAGESIZE)

    def _rope_rows(self, entry: GGUFEntry) -> torch.Tensor | None:
        """llama.cpp stores q/k rows in interleaved-pair RoPE order: the row order that undoes it."""
        if entry.name.endswith("attention.wq.weight"):
            heads = self.args.n_heads
        elif entry.name.endswith("attention.wk.weight"):
            heads = self.args.n_kv_heads
        else:
            return None
        return unpermute_rope(torch.arange(entry.shape[0])[:, None], heads)[:, 0]

    def read(self, entry: GGUFEntry) -> torch.Tensor:
        """The tensor dequantized to float32 (float types keep their dtype), in lilmistral's layout, in memory
        of its own."""
        raw = self._raw(entry)
        if entry.source_type in FLOAT_TYPES:
            tensor = raw.view(FLOAT_TYPES[entry.source_type]).clone()
        else:
            tensor = dequantize_blocks(raw, entry.source_type)
        self._done_with(entry)
        tensor = tensor.reshape(entry.shape)
        rows = self._rope_rows(entry)
        return tensor if rows is None else tensor[rows]

    def direct_spec(self, entry: GGUFEntry, spec: QuantSpec | None) -> QuantSpec | None:
        """The spec read_packed makes this tensor's blocks into for `spec`: for int4 (int5) groups of 32, the int4
        (int5) layout that holds Q4 (Q5) blocks as they are; for int6, Q6_K's as they are; for int8, int8 (blocks
        decoded a few rows at a time); else None."""
        direct = {"int4": DIRECT_INT4, "int5": DIRECT_INT5}.get(spec.scheme, {}) if spec else {}
        if entry.source_type in direct and spec.group_size == 32:
            return direct[entry.source_type]
        if spec and spec.scheme == "int6" and entry.source_type == "Q6_K":
            return Q6_K_SPEC
        if spec and spec.scheme == "int8" and entry.source_type not in FLOAT_TYPES:
            return spec
        return None

    def read_packed(self, entry: GGUFEntry, spec: QuantSpec) -> dict[str, torch.Tensor]:
        """The parts of direct_spec's `spec`: Q4_0 / Q4_1 / Q4_K (Q5_0 / Q5_1 / Q5_K) blocks re-laid into
        lilmistral's int4 (int5) parts (see DIRECT_INT4, DIRECT_INT5), Q6_K's into int6 parts (q6k_parts), or
        blocks decoded and quantized to int8 by int8_parts:
        quantize(read(entry)) without the float32 copy of the whole tensor, whose fresh pages cost more than the
        decoding (int8 scales are per row: the same bits)."""
        raw = self._raw(entry)
        rows = self._rope_rows(entry)
        if rows is not None:
            raw = raw[rows]
        if spec.scheme in ("int4", "int5"):
            parts = q4k_parts(raw, entry.source_type) if entry.source_type.endswith("_K") else \
                q4_parts(raw, entry.source_type)
        elif spec.scheme == "int6":
            parts = q6k_parts(raw)
        else:
            parts = int8_parts(raw, entry.source_type)
        self._done_with(entry)
        return parts


def int8_parts(raw: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """Rows of GGML blocks of type `kind` -> quantize_int8's parts of their values (dequantize_blocks'), a row at
    a time in C++ (gguf_blocks.cpp) or INT8_CHUNK_BYTES of float32 rows at a time."""
    if vnni.available():
        return dict(zip(("qweight", "scales"), torch.ops.lilmistral.gguf_int8(raw, kind)))
    step = max(1, INT8_CHUNK_BYTES // (raw.shape[1] * 4))
    chunks = [quantize_int8(dequantize_blocks(raw[i:i + step], kind)) for i in range(0, raw.shape[0], step)]
    return {name: torch.cat([c[name] for c in chunks]) for name in ("qweight", "scales")}


def q4_parts(raw: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """Rows of Q4_0 / Q4_1 / Q5_0 / Q5_1 blocks [N, bytes]: a float16 scale (and min: _1), (Q5: 4 bytes of fifth
    bits, value i's in bit i: int5's qhigh as they are,) 16 bytes of quants."""
    n, head, fifths = raw.shape[0], 4 if kind.endswith("_1") else 2, 4 if kind.startswith("Q5") else 0
    blocks = raw.view(n, -1, head + fifths + 16)
    parts = {"qweight": q4_canonical(blocks, head + fifths),
             "scales": blocks[..., :2].view(torch.float16)[..., 0].clone()}
    if head == 4:
        parts["mins"] = blocks[..., 2:4].view(torch.float16)[..., 0].clone()
    if fifths:
        parts["qhigh"] = blocks[..., head:head + 4].reshape(n, -1)
    return parts


def q4k_factors(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K super-blocks [..., 144] -> their float16 d and dmin [...]."""
    return tuple(blocks[..., at:at + 2].contiguous().view(torch.float16)[..., 0] for at in (0, 2))


def q4k_codes(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K super-blocks [N, B, 144] -> the 6-bit codes uint8 [N, B, 8] of their sub-blocks' scales and mins:
    12 bytes after d and dmin (the gguf package's Q4_K.get_scale_min)."""
    n = blocks.shape[0]
    packed = blocks[..., 4:16].reshape(n, -1, 3, 4)
    low_scales, low_mins, high = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]  # sub-blocks 0..3: 6 bits
    scales = torch.cat((low_scales & 0x3F, (high & 0x0F) | ((low_scales >> 2) & 0x30)), dim=-1)  # [N, B, 8]
    mins = torch.cat((low_mins & 0x3F, (high >> 4) | ((low_mins >> 2) & 0x30)), dim=-1)
    return scales, mins


def q4k_parts(raw: torch.Tensor, kind: str = "Q4_K") -> dict[str, torch.Tensor]:
    """Rows of Q4_K super-blocks [N, bytes], each 256 values in 8 sub-blocks of 32 (sub-block j: d * scale[j] * q
    - dmin * min[j]; q4k_codes), then 4 chunks of 32 bytes, chunk c's low nibbles sub-block 2c, its high ones
    2c + 1: the super-blocked int4 parts (pack.py) of the gguf package's Q4_K.dequantize_blocks, its bits. Q5_K's
    are Q4_K's with 32 bytes of fifth bits before the quants (q5k_highs): int5's parts."""
    n, fifths = raw.shape[0], 32 if kind == "Q5_K" else 0
    blocks = raw.view(n, -1, 144 + fifths)
    scales, mins = torch.ops.lilmistral.q4k_codes(blocks) if vnni.available() else q4k_codes(blocks)
    d, dmin = q4k_factors(blocks)
    parts = {"qweight": q4_canonical(blocks, 16 + fifths, k_quants=True), "scales": scales.view(n, -1),
             "mins": mins.view(n, -1), "super_scales": d, "super_mins": -dmin}
    if fifths:
        parts["qhigh"] = torch.ops.lilmistral.q5k_highs(blocks) if vnni.available() else q5k_highs(blocks)
    return parts


def q5k_highs(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_K super-blocks [N, B, 176] -> int5's qhigh [N, B * 32] of their fifth bits: 32 bytes after the codes,
    bit j of byte i for value i of sub-block j (in C++ where lilmistral's CPU kernels are built)."""
    n, b = blocks.shape[:2]
    bits = (blocks[..., 16:48, None] >> torch.arange(8, dtype=torch.uint8)) & 1  # [N, B, i, j]
    values = bits.transpose(-1, -2).reshape(n, b, 32, 8)  # value 32j + i, eight a byte
    return (values << torch.arange(8, dtype=torch.uint8)).sum(dim=-1, dtype=torch.uint8).view(n, -1)


def q6k_parts(raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows of Q6_K super-blocks [N, bytes] (see _q6_k) -> int6 parts (pack.py) of the same values: the 6-bit
    quants re-laid (q6k_canonical), the int8 scales of each 16 values and the float16 d as they are."""
    n = raw.shape[0]
    blocks = raw.view(n, -1, 210)
    qweight, qhigh = torch.ops.lilmistral.q6k_canonical(blocks) if vnni.available() else q6k_canonical(blocks)
    scales = blocks[..., 192:208].contiguous().view(torch.int8).view(n, -1)
    return {"qweight": qweight, "qhigh": qhigh, "scales": scales,
            "super_scales": blocks[..., 208:210].contiguous().view(torch.float16).view(n, -1)}


def q6k_canonical(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K super-blocks [N, B, 210] -> the int6 parts qweight [N, B * 128] and qhigh [N, B * 64] of their quants
    (in C++, one pass, where lilmistral's CPU kernels are built)."""
    parts = pack_int6(q6k_quants(blocks.reshape(-1, 210)).view(blocks.shape[0], -1))
    return parts["qweight"], parts["qhigh"]


def q4_canonical(blocks: torch.Tensor, head: int, k_quants: bool = False) -> torch.Tensor:
    """The quants of Q4_0 / Q4_1 blocks [N, B, head + 16] (byte j: value j in its low nibble, j + 16 in its high
    one), or of Q4_K super-blocks [N, B, 144] (k_quants; see q4k_parts), or the low 4 bits of Q5 blocks' (head:
    up to their quants), as pack.py's bytes [N, K/2] (byte b:
    values 2b, 2b + 1). In one pass of gguf_blocks.cpp's where lilmistral's CPU kernels are built (~5x faster than
    PyTorch's operators on strided bytes)."""
    if vnni.available():
        return torch.ops.lilmistral.q4_canonical(blocks, head, k_quants)
    n, qs = blocks.shape[0], blocks[..., head:]
    if k_quants:
        qs = qs.view(n, -1, 4, 1, 32)
        values = torch.cat((qs & 0x0F, qs >> 4), dim=3).view(n, -1)  # [N, K] in order
        return values[:, 0::2] | (values[:, 1::2] << 4)
    even, odd = qs[..., 0::2], qs[..., 1::2]
    out = torch.empty(*blocks.shape[:2], 16, dtype=torch.uint8)
    torch.bitwise_or(even & 0x0F, odd << 4, out=out[..., :8])  # values 0..15: the low nibbles
    torch.bitwise_or(even >> 4, odd & 0xF0, out=out[..., 8:])
    return out.view(n, -1)


# How byte-level BPE vocabularies split text before merging, by `tokenizer.ggml.pre` (llama.cpp's names).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "tekken": _TEKKEN_SPLIT}
CONTROL, USER_DEFINED = 3, 4


def _byte_level_pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    if pre in PRE_SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRE_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # GPT-2's split, with every digit on its own
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


# sha256 of Mistral's v1 SentencePiece pieces joined by NUL (Mistral 7B v0.1/v0.2, Mixtral 8x7B): v1 writes
# [INST] as text, so only the vocabulary itself tells a GGUF of one from, say, Llama 2's
MISTRAL_V1_VOCABULARY = "10dfbba944925c7eabd5534c13217433c6d73e61b8a9ba3ba736f9541b4a78c7"


def mistral_instruct_version(src: GGUFSource) -> int | None:
    """The version of Mistral's instruct format for a GGUF of a Mistral vocabulary whose template is Mistral's
    (a fine-tune's ChatML keeps its template). From v2, [INST] and [/INST] are control tokens: a SentencePiece
    vocabulary's version shows in its control tokens; every tekken vocabulary has [SYSTEM_PROMPT], which only the
    templates of v7 and later use. v1's vocabulary is known by its digest."""
    template = src.meta("tokenizer.chat_template", str) or ""
    tokens = src.meta("tokenizer.ggml.tokens", list, [])
    controls = {t for t, kind in zip(tokens, src.meta("tokenizer.ggml.token_type", list, [])) if kind == CONTROL}
    spm = src.meta("tokenizer.ggml.model", str) == "llama"
    if "[INST]" not in template:
        return None
    if not {"[INST]", "[/INST]"} <= controls:
        digest = hashlib.sha256("\0".join(map(str, tokens)).encode()).hexdigest()
        return 1 if spm and digest == MISTRAL_V1_VOCABULARY else None
    if spm:
        return spm_version(controls)
    return 7 if "[SYSTEM_PROMPT]" in template else 3


def _bpe(src: GGUFSource, vocab: dict[str, int], merges: list[tuple[str, str]], **options: Any) -> Any:
    """The file's BPE model; merges of tokens its vocabulary lacks (a damaged file) are one line."""
    from tokenizers import models

    try:
        return models.BPE(vocab=vocab, merges=merges, **options)
    except Exception as e:  # tokenizers raises a bare Exception
        raise ModelFormatError(f"{src.path}: its tokenizer's merges do not fit its vocabulary ({e})") from None


def gguf_tokenizer(src: GGUFSource):
    """A `tokenizers` tokenizer rebuilt from the GGUF vocabulary, with the file's chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers

    kind = src.meta("tokenizer.ggml.model", str)
    tokens = src.meta("tokenizer.ggml.tokens", list, [])
    types = src.meta("tokenizer.ggml.token_type", list, [1] * len(tokens))
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise ModelFormatError(f"{src.path}: no tokenizer vocabulary in the metadata")
    if len(types) != len(tokens) or not all(isinstance(t, int) for t in types):
        raise ModelFormatError(f"{src.path}: tokenizer.ggml.token_type does not give each token an integer type")
    vocab = {t: i for i, t in enumerate(tokens)}

    def token_id(role: str, default: int | None = None) -> int | None:
        i = src.meta(f"tokenizer.ggml.{role}_token_id", int, default)
        if i is not None and not 0 <= i < len(tokens):
            raise ModelFormatError(f"{src.path}: tokenizer.ggml.{role}_token_id {i} is not a token of its vocabulary")
        return i

    if kind == "gpt2":
        listed = src.meta("tokenizer.ggml.merges", list, [])
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else () for m in listed]
        if not all(len(m) == 2 for m in merges):
            raise ModelFormatError(f"{src.path}: tokenizer.ggml.merges has entries that are not two tokens")
        tk = Tokenizer(_bpe(src, vocab, merges, fuse_unk=False))
        tk.pre_tokenizer = _byte_level_pre_tokenizer(src.meta("tokenizer.ggml.pre", str))
        tk.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = src.meta("tokenizer.ggml.scores", list, [0.0] * len(tokens))
        if len(scores) != len(tokens) or not all(isinstance(x, (int, float)) for x in scores):
            raise ModelFormatError(f"{src.path}: tokenizer.ggml.scores does not give each token a number")
        unk_id = token_id("unknown", 0)
        merges = [(tokens[a], tokens[b]) for a, b in bpe_merges(tokens, [-score for score in scores])]
        tk = Tokenizer(_bpe(src, vocab, merges, unk_token=tokens[unk_id], fuse_unk=True, byte_fallback=True))
        # SentencePiece's dummy prefix, always added (Metaspace skips it before a leading space); as in
        # llama.cpp, every stretch of text after a special token gets one
        spaces = [normalizers.Replace(" ", "\u2581")]
        if src.meta("tokenizer.ggml.add_space_prefix", bool, True):
            spaces.insert(0, normalizers.Prepend("\u2581"))
        tk.normalizer = normalizers.Sequence(spaces)
        tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
    else:
        raise ModelFormatError(f"{src.path}: tokenizer model {kind!r} is not supported (gpt2, llama)")
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    bos = token_id("bos")
    eos_ids = {i for i in (token_id("eos"), token_id("eot"), token_id("eom")) if i is not None}
    eos_ids |= {i for i, t in enumerate(tokens) if t in END_OF_GENERATION}
    return HFTokenizer(tk, bos, eos_ids, src.meta("tokenizer.chat_template", str),
                       src.meta("tokenizer.ggml.add_bos_token", bool, kind == "llama"), f"gguf {kind}",
                       mistral_instruct_version(src))
