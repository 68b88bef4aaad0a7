"""Streaming safetensors: read one tensor at a time with plain reads, write tensors as they come.

The converter uses these instead of memory-mapping so its resident memory stays near one tensor,
whatever the model's size (mapped pages of a 90 GB source would count as resident).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFormatError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """The header of a safetensors file, checked against the file's size; `read` loads one tensor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFormatError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER):
                raise ModelFormatError(f"{path}: truncated or corrupt safetensors header")
            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise ModelFormatError(f"{path}: corrupt safetensors header") from None
        self.data_start = 8 + n
        try:
            self.metadata, self.entries = _check_header(header, path, size - self.data_start)
        except (TypeError, ValueError) as e:
            raise ModelFormatError(f"{path}: corrupt safetensors header ({e})") from None

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(buf) != len(buf):
                raise ModelFormatError(f"{self.path}: truncated while reading {name!r}")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def _check_header(header: Any, path: Path, data_bytes: int
                  ) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]:
    """The metadata and each tensor's (dtype, shape, begin, end), checked as the safetensors package checks them
    (tensors back to back from the data's start to the file's end) so that what passes here also opens there;
    TypeError or ValueError on a malformed header."""
    if not isinstance(header, dict):
        raise TypeError("not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TypeError("__metadata__ is not an object of strings")
    entries = {}
    for name, info in header.items():
        if not isinstance(info, dict) or not {"data_offsets", "shape"} <= info.keys():
            raise ValueError(f"tensor {name!r} has no shape or data_offsets")
        if info.get("dtype") not in DTYPES:
            raise ModelFormatError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        (begin, end), shape = info["data_offsets"], tuple(info["shape"])
        if not all(isinstance(x, int) and x >= 0 for x in (begin, end, *shape)):
            raise ValueError(f"tensor {name!r}: offsets or shape not counts")
        dtype = DTYPES[info["dtype"]]
        if end - begin != _numel(shape) * dtype.itemsize or end > data_bytes:
            raise ModelFormatError(f"{path}: truncated safetensors file (tensor {name!r} runs past the end)")
        entries[name] = (dtype, shape, begin, end)
    ends = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != ends:
            raise ValueError(f"tensor {name!r} overlaps another or leaves a gap")
        ends = end
    if ends != data_bytes:
        raise ValueError(f"{data_bytes - ends} bytes after the last tensor")
    return metadata, entries


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class SafetensorsWriter:
    """Writes a header planned from (name, dtype, shape) first, then each tensor's bytes in that order."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, dtype, shape in plan:
            nbytes = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._plan = iter(plan)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self.total_bytes = offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, dtype, shape = next(self._plan)
        assert (name, dtype, tuple(shape)) == (want_name, tensor.dtype, tuple(tensor.shape)), (name, want_name)
        if tensor.numel():
            self._file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        assert next(self._plan, None) is None, "not every planned tensor was written"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

