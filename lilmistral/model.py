"""The Mistral / Mixtral / Llama architecture, and nothing else.

Shapes: T tokens of one sequence (no batch dimension: a chat app decodes one stream),
D = dim, H = n_heads, K = n_kv_heads, hd = head_dim.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .cache import RollingKVCache
from .config import ModelArgs

# stores a layer's new keys and values [K, T, hd] and returns the keys and values [K, S, hd] to attend to
KVUpdate = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def add_norm(out: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm | None):
    """residual + out (out without a residual) and, given norm, the pair (that, norm(that))."""
    if norm is None:
        return out if residual is None else residual + out
    return (out, norm(out)) if residual is None else norm(out, residual)


class Linear(nn.Linear):
    """A projection (no bias) whose call may add a residual and normalize the sum (`add_norm`), which a
    backend's kernel may do as it writes its output (QuantLinear on a GPU), in one launch instead of three."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, norm: RMSNorm | None = None):
        return add_norm(super().forward(x), residual, norm)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)  # in float32, as the reference does
    return weight * normed.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.normalize = rms_norm  # a backend's kernel with rms_norm's signature may take its place
        # and one that adds and normalizes in one call: (x, residual, weight, eps) -> (residual + x, normalized)
        self.add_normalize: Callable | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x normalized; given residual, the pair (residual + x, that normalized)."""
        if residual is None:
            return self.normalize(x, self.weight, self.eps)
        if self.add_normalize is not None:
            return self.add_normalize(x, residual, self.weight, self.eps)
        h = residual + x
        return h, self.normalize(h, self.weight, self.eps)


def rope_frequencies(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [hd/2] and the cos/sin scale, for plain, linear and YaRN RoPE (as HF computes them)."""
    dim, base = args.head_dim, args.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    inv_freq = 1.0 / pos_freqs
    s = args.rope_scaling
    if s is None:
        return inv_freq, 1.0
    if s.kind == "linear":
        return inv_freq / s.factor, 1.0

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
        else:
            attention_factor = mscale(s.factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / s.factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, T, hd] rotated by cos, sin [T, hd], dimensions i and i + hd/2 paired (HF's layout)."""
    return x * cos + rotate_half(x) * sin


def store_kv(keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """A decode step's key and value k, v [K, 1, hd] into slot `slot` [1] of a layer's keys, values [K, size, hd]."""
    keys.index_copy_(1, slot, k)
    values.index_copy_(1, slot, v)


@dataclass
class SlotWrite:
    """A decode step's KVUpdate: its key and value into slot `slot` [1] of a layer's keys, values [K, size, hd]
    (by `store`: store_kv or a backend's kernel), then the first n slots to attend to."""

    keys: torch.Tensor
    values: torch.Tensor
    slot: torch.Tensor
    n: int
    store: Callable

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.store(self.keys, self.values, self.slot, k, v)
        return self.attended()

    def attended(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[:, :self.n], self.values[:, :self.n]


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of q [K, R, hd] (the R query rows of each kv head) to keys and values [K, S, hd]; mask
    [R or 1, S] boolean, True where a row may attend (None: everywhere). Returns [K, R, hd]."""
    # 4-D inputs take PyTorch's flash-attention CPU kernel (3-D ones fall back to the slower math path)
    return F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask)[0]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)
        self.attend = sdpa  # a backend's kernel with sdpa's signature may take its place
        self.rotate = rope  # and rope's
        self.wqkv: nn.Module | None = None  # wq, wk and wv as one, where a backend fuses them: outputs side by side
        # and a backend's kernel that, in a decode step, rotates wqkv's q and k and stores k and v as it writes
        # them: (wqkv, x, cos, sin, SlotWrite) -> q [1, H * hd], or None where it cannot
        self.project_store: Callable | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                kv: KVUpdate, residual: torch.Tensor | None = None, norm: RMSNorm | None = None):
        """The attention's output (plus residual, given one; and normalized by norm: `add_norm`). mask:
        [H/K * T, S] (or broadcastable) boolean, True where a query may attend (None: everywhere)."""
        T = x.shape[0]
        q, keys, values = self.qkv(x, cos, sin, kv)
        # grouped-query attention without repeating keys: the H/K query heads sharing a kv head become rows
        out = self.attend(q.reshape(self.n_kv_heads, -1, self.head_dim), keys, values, mask)  # [K, H/K * T, hd]
        return self.wo(out.view(self.n_heads, T, self.head_dim).transpose(0, 1).reshape(T, -1), residual, norm)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            kv: KVUpdate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [H, T, hd] rotated, and the keys and values [K, S, hd] to attend to once kv has k (rotated) and v."""
        T = x.shape[0]

        def heads(t: torch.Tensor) -> torch.Tensor:  # [T, N * hd] -> [N, T, hd]
            return t.reshape(T, -1, self.head_dim).transpose(0, 1)

        if self.wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
            q, k = self.rotate(heads(q), cos, sin), self.rotate(heads(k), cos, sin)  # [H, T, hd], [K, T, hd]
            return q, *kv(k, heads(v))
        if self.project_store is not None and isinstance(kv, SlotWrite):
            q = self.project_store(self.wqkv, x, cos, sin, kv)
            if q is not None:
                return heads(q), *kv.attended()
        # q and k side by side in the fused output: rotated in one call
        qk, v = self.wqkv(x).split([self.wq.out_features + self.wk.out_features, self.wv.out_features], dim=-1)
        q, k = self.rotate(heads(qk), cos, sin).split([self.n_heads, self.n_kv_heads])
        return q, *kv(k, heads(v))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden_dim)  # gate
        self.w2 = Linear(hidden_dim, dim)  # down
        self.w3 = Linear(dim, hidden_dim)  # up
        self.w13: nn.Module | None = None  # w1 and w3 as one, where a backend fuses them: outputs side by side
        self.gated: nn.Module | None = None  # or silu(w1 x) * w3 x as one, where a backend computes that
        self.activate = silu_mul  # a backend's kernel with silu_mul's signature may take its place

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, norm: RMSNorm | None = None):
        """The output (plus residual, given one; and normalized by norm: `add_norm`)."""
        if self.gated is not None:
            return self.w2(self.gated(x), residual, norm)
        gate, up = (self.w1(x), self.w3(x)) if self.w13 is None else self.w13(x).chunk(2, dim=-1)
        return self.w2(self.activate(gate, up), residual, norm)


class Experts(nn.ModuleList):
    """The experts of a MoE layer: each token through the experts it was routed to, weighted."""

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():  # the trace would freeze this token's experts (the tracer does not warn of tolist())
            raise RuntimeError("a loop over the routed experts cannot be traced")
        out = torch.zeros_like(x, dtype=torch.float32)  # the weighted sum rounds once
        for e in chosen.unique().tolist():
            tokens, slot = (chosen == e).nonzero(as_tuple=True)
            out.index_add_(0, tokens, self[e](x[tokens]) * weights[tokens, slot, None])
        return out.to(x.dtype)


class MoE(nn.Module):
    """Sparse mixture of experts: softmax over the router, top-k, renormalise (as Mixtral)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.n_experts_per_tok
        self.gate = Linear(args.dim, args.n_experts)
        self.experts = Experts(FeedForward(args.dim, args.hidden_dim) for _ in range(args.n_experts))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, norm: RMSNorm | None = None):
        probs = F.softmax(self.gate(x).float(), dim=-1)  # [T, E]
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        return add_norm(self.experts(x, chosen, weights / weights.sum(dim=-1, keepdim=True)), residual, norm)


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward: nn.Module = MoE(args) if args.is_moe else FeedForward(args.dim, args.hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                kv: KVUpdate, normed: torch.Tensor | None = None, next_norm: RMSNorm | None = None):
        """The residual stream x after the block. normed: attention_norm(x), where the layer before computed it;
        given next_norm, the pair (stream, next_norm(stream)), which the last projection may compute at once."""
        normed = self.attention_norm(x) if normed is None else normed
        h, normed = self.attention(normed, cos, sin, mask, kv, residual=x, norm=self.ffn_norm)
        return self.feed_forward(normed, residual=h, norm=next_norm)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        # given a weight, not initialised: every weight is loaded, and normal_ on the meta device (where the
        # loader builds the model) imports torch._dynamo, ~1.5 s of every start
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        inv_freq, self.rope_scale = rope_frequencies(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.store_kv = store_kv  # a backend's kernel with store_kv's signature may take its place

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
        return (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)

    def forward(self, tokens: torch.Tensor, cache: RollingKVCache, last_only: bool = False) -> torch.Tensor:
        """Run tokens [T] at the cache's next positions; float32 logits [T, vocab] (or [1, vocab])."""
        return self.head(self.run_layers(self.tok_embeddings(tokens), cache), last_only)

    def run_layers(self, h: torch.Tensor, cache: RollingKVCache, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Hidden states [T, D] through layers start..end-1, whose keys and values are `cache`'s layers 0, 1, ..."""
        positions, mask = cache.begin(h.shape[0])
        if mask is not None:
            mask = mask.repeat(self.args.n_heads // self.args.n_kv_heads, 1)  # [H/K * T, S]: see Attention
        cos, sin = self.rope(positions, h.dtype)
        for i, layer in enumerate(self.layers[start:end]):
            h = layer(h, cos, sin, mask, partial(cache.update, i))
        cache.end()
        return h

    def decode_step(self, token: torch.Tensor, position: torch.Tensor, mask: torch.Tensor,
                    keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """float32 logits [1, vocab] of one token [1] at `position` [1], with static shapes and no Python
        state (what torch.compile and CUDA graphs need): layer i writes its key and value into slot
        position % size of keys[i] / values[i] [K, size, hd] and attends to slots 0..n-1 where mask [n] is True.
        `RollingKVCache.begin_step` makes position and mask."""
        h = self.tok_embeddings(token)
        cos, sin = self.rope(position, h.dtype)
        slot = position % keys[0].shape[1]
        normed = None  # each layer's output projection normalizes the stream for the next layer (or the head)
        next_norms = [layer.attention_norm for layer in self.layers[1:]] + [self.norm]
        for layer, next_norm, layer_keys, layer_values in zip(self.layers, next_norms, keys, values):
            write = SlotWrite(layer_keys, layer_values, slot, mask.shape[0], self.store_kv)
            h, normed = layer(h, cos, sin, mask[None], write, normed, next_norm)
        return self.output(normed).float()

    def head(self, h: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        if last_only:
            h = h[-1:]
        return self.output(self.norm(h)).float()
