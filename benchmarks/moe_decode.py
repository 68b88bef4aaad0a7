"""One MoE layer of Mixtral-8x7B's shape (hidden 4096, FFN 14336, 8 experts, 2 per token), int4 g32, at decode
on the CPU (or a GPU): the expert-batched kernels (one call per projection for the routed experts) against
running the routed experts one by one. Random weights; routing chosen at random per step.

    python benchmarks/moe_decode.py [--steps 20] [--quant int4|int8] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from lilmistral.model import Experts, FeedForward
from lilmistral.quant import QuantExperts, QuantLinear, spec_for, swap_in_quant_linears
from lilmistral.quant.pack import packed_shapes

DIM, HIDDEN, EXPERTS, TOP_K = 4096, 14336, 8, 2


def random_experts(scheme: str, device: str) -> QuantExperts:
    with torch.device("meta"):
        holder = nn.Module()
        holder.experts = Experts(FeedForward(DIM, HIDDEN) for _ in range(EXPERTS))
    specs = {name: spec_for(f"layers.0.feed_forward.{name}", tuple(p.shape), scheme)
             for name, p in holder.named_parameters()}
    swap_in_quant_linears(holder, specs)
    for module in holder.modules():
        if isinstance(module, QuantLinear):
            for part, (shape, dtype) in packed_shapes(module.out_features, module.in_features, module.spec).items():
                if dtype == torch.float16:
                    value = (torch.rand(shape) * 0.01).half()
                else:
                    value = torch.randint(-127 if dtype == torch.int8 else 0, 127, shape, dtype=dtype)
                setattr(module, part, value.to(device))
            module.prepare()
    holder.experts.prepare()
    return holder.experts


def seconds_per_step(experts: QuantExperts, steps: int, device: str) -> float:
    g = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    times = []
    with torch.inference_mode():
        for _ in range(steps):
            x = torch.randn(1, DIM, generator=g).bfloat16().to(device)
            chosen = torch.randperm(EXPERTS, generator=g)[:TOP_K][None].to(device)
            weights = torch.full((1, TOP_K), 1 / TOP_K, device=device)
            sync()
            start = time.perf_counter()
            experts(x, chosen, weights)
            sync()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quant", default="int4", choices=["int4", "int8"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ns = parser.parse_args()
    experts = random_experts(ns.quant, ns.device)
    assert experts.batched, "no expert-batched kernels here (CPU: AVX-512 VNNI and a C++ compiler; GPU: Triton)"
    routed_bytes = TOP_K * sum(buffer.nbytes for buffer in experts[0].buffers())  # packed w1, w2, w3
    batched = seconds_per_step(experts, ns.steps, ns.device)
    kernels, experts.batched = experts.batched, None
    loop = seconds_per_step(experts, ns.steps, ns.device)
    experts.batched = kernels
    print(json.dumps({"quant": ns.quant, "device": ns.device, "routed_weight_mb": round(routed_bytes / 1e6, 1),
                      "batched_ms": round(batched * 1e3, 2), "loop_ms": round(loop * 1e3, 2),
                      "speedup": round(loop / batched, 2), "batched_gbps": round(routed_bytes / batched / 1e9, 1)}))


if __name__ == "__main__":
    main()
