"""One MoE layer of Mixtral-8x7B's shape (hidden 4096, FFN 14336, 8 experts, 2 per token), int4 g32, at decode
on the CPU (or a GPU): the expert-batched kernels (one call per projection for the routed experts) against
running the routed experts one by one. Random weights; routing chosen at random per step. With --layers N,
also the whole decode loop (lilmistral.bench: tok/s, bytes a token, GB/s, bandwidth fraction) on an N-layer
model of that shape, its decode step as the device runs it by default (traced on the CPU, CUDA graphs on a
GPU) and eager.

    python -m benchmarks.moe_decode [--steps 20] [--quant int4|int8] [--device cpu|cuda] [--layers 4]
"""
from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch
from torch import nn

from benchmarks.random_model import MISTRAL_7B, random_model
from lilmistral.bench import bench
from lilmistral.config import ModelArgs
from lilmistral.generate import DecodeStep
from lilmistral.llm import LLM
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


def model_bench(layers: int, scheme: str, device: str, rounds: int = 3) -> dict[str, dict]:
    """Each step's bench with the median decode speed of `rounds`, the two steps alternating (the machine's
    load changes while they run)."""
    args = ModelArgs(n_layers=layers, **MISTRAL_7B, n_experts=EXPERTS, n_experts_per_tok=TOP_K)
    llm = LLM(random_model(args, scheme, device), SimpleNamespace(eos_ids=[]), num_ctx=512)  # no tokenizer: ids
    steps = {name: DecodeStep(llm.model, trace=default, graphs=default)
             for name, default in (("default", True), ("eager", False))}
    rows: dict[str, list[dict]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            llm.decode_step = step
            rows[name].append(bench(llm, prompt_tokens=64, gen_tokens=32).to_dict())
    return {name: sorted(runs, key=lambda r: r["decode_tps"])[rounds // 2] for name, runs in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quant", default="int4", choices=["int4", "int8"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, default=0, help="also bench the decode loop of an N-layer model")
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
    if ns.layers:
        for name, row in model_bench(ns.layers, ns.quant, ns.device).items():
            print(json.dumps({"layers": ns.layers, "step": name, **row}))


if __name__ == "__main__":
    main()
