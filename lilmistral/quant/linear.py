"""QuantLinear: a drop-in for nn.Linear whose weight stays packed; the math is the backend's."""
from __future__ import annotations

import torch
from torch import nn

from .pack import QuantSpec, packed_shapes


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, spec: QuantSpec) -> None:
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        for name, (shape, dtype) in packed_shapes(out_features, in_features, spec).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype))
        self.kernel = None

    def parts(self) -> dict[str, torch.Tensor]:
        return {name: buf for name, buf in self.named_buffers()}

    def prepare(self) -> None:
        """Repack the canonical parts into the device's kernel layout (once, after loading)."""
        if self.qweight.device.type == "cuda":
            from . import cuda as backend
        else:
            from . import cpu as backend  # type: ignore[no-redef]
        self.kernel = backend.make_kernel(self.parts(), self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            self.prepare()
        return self.kernel(x)

    def extra_repr(self) -> str:
        s = self.spec
        return f"{self.in_features}, {self.out_features}, {s.scheme}" + (f", g{s.group_size}" if s.group_size else "")
