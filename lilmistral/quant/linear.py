"""QuantLinear: a drop-in for nn.Linear whose weight stays packed; the math is the backend's. FusedQuantLinear:
QuantLinears that read the same input as one. QuantExperts: the experts of a MoE layer, made of QuantLinears,
with expert-batched decode where the backend has it."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..errors import ModelFormatError
from ..model import Experts, FeedForward, RMSNorm, add_norm
from . import DEFAULT_GROUP_SIZE, FLOAT_SCHEMES, QUANTIZED_SUFFIXES, SUPER_BLOCKS, cpu, cuda
from .cpu import DequantKernel, kernel_type
from .pack import INT6_GROUP, QuantSpec, group_size_for, packed_shapes
from .vnni import MAX_ROWS


def make_kernel(parts: cpu.Parts, spec: QuantSpec, dtype: torch.dtype = torch.bfloat16):
    """The kernel of the parts' device for activations of `dtype` (parts: tensors, or blocks of rows)."""
    q = parts["qweight"]
    if (q[0] if isinstance(q, list) else q).device.type == "cuda":
        return cuda.make_kernel(parts, spec)
    return cpu.make_kernel(parts, spec, dtype)


def fusable(n: int, k: int, spec: QuantSpec, device: torch.device) -> bool:
    """Whether projections of [n, k] together, packed as spec, gain from one kernel: where it does more than
    dequantize (lilmistral's or PyTorch's CPU kernels; Triton's)."""
    if device.type == "cuda":
        return cuda.has_triton()
    return device.type == "cpu" and kernel_type(n, k, spec) is not DequantKernel


def gated_fusion(device: torch.device) -> bool:
    """Whether w1 and w3 fuse into one kernel that writes silu(w1 x) * w3 x (Triton's, on a GPU), where fusable."""
    return device.type == "cuda"


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, spec: QuantSpec) -> None:
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        for name, (shape, dtype) in packed_shapes(out_features, in_features, spec).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype))
        self.kernel = None

    def parts(self) -> dict[str, torch.Tensor]:
        return {name: buf for name, buf in self.named_buffers()}

    def prepare(self, dtype: torch.dtype = torch.bfloat16) -> None:
        """Make the device's kernel for activations of `dtype`, repacking the canonical parts into its layout
        where it has one (once, after loading)."""
        self.kernel = make_kernel(self.parts(), self.spec, dtype)

    def release_parts(self) -> list[torch.Tensor]:
        """Let go of the canonical parts where the kernel reads none (it repacked them, or the projection is
        fused into another's): returns them, which the module no longer holds (the loader unmaps a file's)."""
        if not getattr(self.kernel, "repacked", False):
            return []
        parts = list(self.parts().values())
        for name in self._buffers:
            self._buffers[name] = None
        return parts

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, norm: RMSNorm | None = None):
        """x's product with the weight, plus residual given one, and normalized by norm given one (model.Linear):
        the residual added in the kernel where it does so as it writes its output (Triton's), else after it."""
        if self.kernel is None:
            self.prepare(x.dtype)
        if residual is None or not getattr(self.kernel, "adds_residual", False):
            return add_norm(self.kernel(x), residual, norm)
        return add_norm(self.kernel(x, residual), None, norm)

    def extra_repr(self) -> str:
        s = self.spec
        return f"{self.in_features}, {self.out_features}, {s.scheme}" + (f", g{s.group_size}" if s.group_size else "")


class FusedQuantLinear(nn.Module):
    """QuantLinears that read the same input (wq, wk, wv; w1, w3) as one kernel call, their outputs side by
    side, each column computed as in its own (with lilmistral's kernels; PyTorch's int4 kernel may round one
    differently): fewer calls a token, activations quantized once. The kernel is made from the canonical
    parts as blocks of rows (the VNNI kernels repack them without concatenating them first), the only
    repacking of those weights; each member's kernel becomes its columns of the fused one, so the members'
    parts may go (QuantLinear.release_parts). Holds no tensors in the state dict.
    gated (w1 and w3 on a GPU): their columns interleaved in one Triton kernel, whose output is
    silu(w1 x) * w3 x (FeedForward.gated), computed as it is written."""

    def __init__(self, linears: list[QuantLinear], gated: bool = False) -> None:
        super().__init__()
        self.gated = gated
        parts = {name: [linear.parts()[name] for linear in linears] for name in linears[0].parts()}
        self.kernel = cuda.gated_kernel(parts, linears[0].spec) if gated else make_kernel(parts, linears[0].spec)
        self.linears = tuple(linears)  # not submodules: the model holds them already
        start = 0
        for i, linear in enumerate(linears):
            columns = slice(i, None, 2) if gated else slice(start, start + linear.out_features)
            linear.kernel = Columns(self.kernel, columns)
            start += linear.out_features
        self.out_features = linears[0].out_features if gated else start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.gated(x) if self.gated else self.kernel(x)


class Columns:
    """Some columns of a fused kernel's output: a fused projection's member called alone."""

    repacked = True  # into the fused kernel

    def __init__(self, kernel, columns: slice) -> None:
        self.kernel, self.columns = kernel, columns

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)[..., self.columns]


def projection_groups(layers: Iterable[nn.Module]) -> list[tuple[nn.Module, str, list[nn.Module]]]:
    """(module, name of the fused projection, the projections it fuses): each layer's wq, wk, wv and, in dense
    layers, w1, w3."""
    groups = []
    for layer in layers:
        groups.append((layer.attention, "wqkv", [layer.attention.wq, layer.attention.wk, layer.attention.wv]))
        if isinstance(layer.feed_forward, FeedForward):
            groups.append((layer.feed_forward, "w13", [layer.feed_forward.w1, layer.feed_forward.w3]))
    return groups


def fuse_projections(layers: Iterable[nn.Module]) -> Iterator[FusedQuantLinear]:
    """Fuse the layers' projection groups where they are loaded QuantLinears packed alike (a GGUF may store
    them in different types) and `fusable`; yields each FusedQuantLinear as it is made (and put in place).
    On a GPU, w1 and w3 are fused gated (FeedForward.gated)."""
    for module, name, linears in projection_groups(layers):
        if not all(isinstance(linear, QuantLinear) for linear in linears) or len({l.spec for l in linears}) > 1:
            continue
        n, device = sum(linear.out_features for linear in linears), linears[0].qweight.device
        if fusable(n, linears[0].in_features, linears[0].spec, device):
            gated = name == "w13" and gated_fusion(device)
            fused = FusedQuantLinear(linears, gated)
            setattr(module, "gated" if gated else name, fused)
            yield fused


class QuantExperts(Experts):
    """Experts whose projections are QuantLinears (the same children, so the same tensor names). Where the
    backend has expert-batched kernels (the CPU's VNNI kernels; Triton's on a GPU), a decode step runs every
    token's routed experts in one call per projection: no host sync, no loop."""

    def __init__(self, experts: Experts) -> None:
        super().__init__(experts)
        self.batched: dict | None = None  # projection name -> (x [R, K], expert [R]) -> [R, N]

    def prepare(self, dtype: torch.dtype = torch.bfloat16) -> None:
        """After the experts' QuantLinears are prepared (the loader's order): the batched kernels over theirs
        (dtype: the one theirs were made for; the backend: theirs)."""
        kernels = {name: [getattr(expert, name).kernel for expert in self] for name in ("w1", "w2", "w3")}
        batched = {name: cpu.expert_gemv(ks) or cuda.expert_gemv(ks) for name, ks in kernels.items()}
        self.batched = batched if all(batched.values()) else None

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        cpu_reference = x.device.type == "cpu" and x.dtype != torch.bfloat16  # float32: the exact dequantized path
        # a traced step (generate.trace_step) is a one-token decode step, within MAX_ROWS; reading the row
        # count there would make the tracer warn (and refuse the trace)
        few_rows = torch.jit.is_tracing() or chosen.numel() <= MAX_ROWS
        if self.batched is None or cpu_reference or not few_rows:
            return super().forward(x, chosen, weights)
        experts = chosen.reshape(-1)  # [T * k]
        rows = x.repeat_interleave(chosen.shape[1], dim=0)
        w1, w2, w3 = self.batched["w1"], self.batched["w2"], self.batched["w3"]
        y = w2(self[0].activate(w1(rows, experts), w3(rows, experts)), experts)  # as FeedForward, per (token, expert)
        return (y.view(*chosen.shape, -1) * weights[..., None]).sum(dim=1).to(x.dtype)


def spec_for(name: str, shape: tuple[int, ...], scheme: str, group_size: int = DEFAULT_GROUP_SIZE,
             tied: bool = False) -> QuantSpec | None:
    """How tensor `name` is stored under `scheme`; None: kept in floating point.

    Attention and FFN (and expert) projections take the scheme; int4 (int5) g32 with mins in super-blocks where
    one of SUPER_BLOCKS divides the input size (4.625 bits a weight for 5.0, perplexity alike: README); int6 in
    super-blocks too (else int8: it has no plain layout). An untied output head takes int8 (it is read every
    token but is sensitive to 4-bit error). Embeddings, norms and router gates stay in floating point: they are
    small, or (embeddings) only one row is read per token.
    """
    if scheme in FLOAT_SCHEMES or len(shape) != 2:
        return None
    if name.endswith(QUANTIZED_SUFFIXES):
        super_block = next((s for s in SUPER_BLOCKS if shape[1] % s == 0), 0)
        if scheme == "int8" or scheme == "int6" and not super_block:
            return QuantSpec("int8")
        if scheme == "int6":
            return QuantSpec("int6", INT6_GROUP, symmetric=True, super_block=super_block)
        g = group_size_for(shape[1], group_size)
        if scheme == "int4-sym":
            return QuantSpec("int4", g, symmetric=True)
        return QuantSpec(scheme, g, symmetric=False, super_block=super_block if g == 32 else 0)
    if name == "output.weight" and not tied:
        return QuantSpec("int8")
    return None


def swap_in_quant_linears(model: nn.Module, specs: dict[str, QuantSpec]) -> None:
    """Replace each nn.Linear whose weight name is in `specs` with an (empty) QuantLinear, and the experts of
    each MoE layer so made with QuantExperts."""
    for weight_name, spec in specs.items():
        module_name = weight_name.removesuffix(".weight")
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        assert isinstance(linear, nn.Linear), weight_name
        try:
            setattr(parent, child, QuantLinear(linear.in_features, linear.out_features, spec))
        except ModelFormatError as e:  # a converted folder's layout that does not fit the weight
            raise ModelFormatError(f"tensor {weight_name!r}: {e}") from None
    for name, module in list(model.named_modules()):
        quantized = isinstance(module, Experts) and isinstance(module[0].w1, QuantLinear)
        if quantized and not isinstance(module, QuantExperts):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, QuantExperts(module))
