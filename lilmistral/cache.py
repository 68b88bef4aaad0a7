"""The KV cache: a rolling buffer for sliding-window models, a fixed context for the others."""
from __future__ import annotations

import math
import mmap

import torch

from .errors import ContextLengthError


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeros. On the CPU, in an anonymous memory mapping, whose pages the OS supplies (zeroed) when first
    written: a long context costs memory only as it fills, as llama.cpp's cache does."""
    if torch.device(device).type != "cpu" or not hasattr(mmap, "MAP_PRIVATE"):  # a GPU; Windows
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    pages = mmap.mmap(-1, max(count * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE)
    return torch.frombuffer(pages, dtype=dtype, count=count).view(shape)


def cache_window(args, num_ctx: int) -> int | None:
    """The rolling buffer's window for num_ctx tokens: the model's sliding window, where it takes effect."""
    return args.sliding_window if args.sliding_window is not None and args.sliding_window < num_ctx else None


def cache_bytes(args, n_layers: int, num_ctx: int, dtype: torch.dtype) -> int:
    """What RollingKVCache.for_context allocates: keys and values of every layer in every slot."""
    slots = cache_window(args, num_ctx) or num_ctx
    return 2 * n_layers * args.n_kv_heads * slots * args.head_dim * dtype.itemsize


class RollingKVCache:
    """Keys and values of every layer in `size` slots; position p lives in slot p % size.

    Sliding-window models get size == window, so memory is fixed however long the
    conversation runs. Other models get size == num_ctx (window None) and stop there.

    Worked example, window = size = 4, after positions 0..5 were written:

        slot:      0  1  2  3
        position:  4  5  2  3

    Decoding position 6 writes slot 2, dropping position 2, which position 6 no longer
    sees (it attends to 3, 4, 5, 6). A prefill chunk attends to the cached slots and to
    itself (concatenated) before it is written, because writing first would overwrite
    positions its own earlier tokens still need.

    Each forward calls `begin(n)`, then `update(layer, k, v)` per layer, then `end()`. A one-token
    decode step (`Transformer.decode_step`) calls `begin_step()`, writes the layers' tensors itself, then `end()`.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, size: int, window: int | None,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        assert window is None or size == window
        # one tensor per layer, so that a compiled decode step updates each in place without copying the rest
        shape = (n_kv_heads, size, head_dim)
        self.k = [lazy_zeros(shape, dtype, device) for _ in range(n_layers)]
        self.v = [lazy_zeros(shape, dtype, device) for _ in range(n_layers)]
        self.slots = torch.arange(size, device=device)
        # a decode step's position and mask, written in place: a CUDA graph reads them at fixed addresses
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.step_mask = torch.zeros(size, dtype=torch.bool, device=device)
        self.size = size
        self.window = window
        self.length = 0  # positions written so far; the next token's position
        self._n_new = 0
        self._write_first = True

    @classmethod
    def for_context(cls, args, n_layers: int, num_ctx: int, dtype: torch.dtype,
                    device: torch.device | str) -> RollingKVCache:
        """The cache a model (or a pipeline stage's `n_layers`) needs for num_ctx tokens: a rolling buffer
        of `window` slots, or num_ctx slots when the window never takes effect within num_ctx tokens."""
        window = cache_window(args, num_ctx)
        return cls(n_layers, args.n_kv_heads, args.head_dim, window or num_ctx, window, dtype, device)

    def reset(self) -> None:
        self.length = 0

    def rewind(self, length: int) -> bool:
        """Forget positions >= length. False when the buffer no longer holds what that needs: writing the m
        positions from `length` on overwrote positions length - size ... length - size + m - 1, and the next
        position, `length`, attends to those after length - window."""
        if length > self.length:
            return False
        if self.window is not None and self.length - length > self.size - self.window + 1:
            return False
        self.length = length
        return True

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)

    @property
    def device(self) -> torch.device:
        return self.slots.device

    def _slot_positions(self, length: int) -> torch.Tensor:
        """Positions held by slots 0 .. min(length, size)-1 once `length` positions are written."""
        slots = self.slots[:min(length, self.size)]
        return length - 1 - (length - 1 - slots) % self.size

    def fits(self, n_new: int = 1) -> bool:
        """Whether n_new more positions fit: always in a rolling buffer; else up to size."""
        return self.window is not None or self.length + n_new <= self.size

    def _check_fits(self, n_new: int) -> None:
        if not self.fits(n_new):
            raise ContextLengthError(
                f"context is full: {self.length} + {n_new} tokens do not fit num_ctx={self.size}")

    def begin(self, n_new: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions of the n_new tokens and the boolean attention mask [n_new, keys] (None: attend to all)."""
        self._check_fits(n_new)
        self._n_new = n_new
        self._write_first = n_new == 1 or self.window is None
        q_pos = torch.arange(self.length, self.length + n_new, device=self.device)
        end = self.length + n_new
        if self._write_first:
            if n_new == 1 and (self.window is None or min(end, self.size) <= self.window):
                return q_pos, None
            k_pos = self._slot_positions(end)
        else:
            k_pos = torch.cat([self._slot_positions(self.length), q_pos])
        mask = k_pos[None, :] <= q_pos[:, None]
        if self.window is not None:
            mask &= q_pos[:, None] - k_pos[None, :] < self.window
        return q_pos, mask

    def begin_step(self, bucket: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """For a one-token decode step: its position [1] and the mask [n] of the slots it attends to, n
        rounded up to a multiple of `bucket` so that a captured CUDA graph serves many positions.
        Slot s holds a position it may see exactly when s <= position: before the buffer wraps, slots
        above the position are empty; after, every slot holds one of the last `size` == window positions."""
        self._check_fits(1)
        self._n_new = 1
        n = min(self.size, -(-(self.length + 1) // bucket) * bucket)
        self.position.fill_(self.length)
        return self.position, torch.le(self.slots[:n], self.length, out=self.step_mask[:n])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [n_kv_heads, n_new, head_dim]; return the keys and values to attend to."""
        if self._write_first:
            self._write(layer, k, v)
            n = min(self.length + self._n_new, self.size)
            return self.k[layer][:, :n], self.v[layer][:, :n]
        n = min(self.length, self.size)
        keys = torch.cat([self.k[layer][:, :n], k], dim=1)
        values = torch.cat([self.v[layer][:, :n], v], dim=1)
        self._write(layer, k, v)
        return keys, values

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[1]
        keep = min(n, self.size)  # of a chunk longer than the buffer only the tail survives
        start = (self.length + n - keep) % self.size
        first = min(keep, self.size - start)  # up to the end of the buffer, then wrap to slot 0
        for dst, src in ((self.k[layer], k), (self.v[layer], v)):
            dst[:, start:start + first] = src[:, n - keep:n - keep + first]
            if first < keep:
                dst[:, :keep - first] = src[:, n - keep + first:]

    def end(self) -> None:
        self.length += self._n_new
        self._n_new = 0
