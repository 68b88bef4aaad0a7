"""GPU decode benchmark: the Triton GEMV kernels and a Mistral-7B-width model, against the memory bandwidth.

    python benchmarks/gpu_bench.py [--layers 8] [--tokens 64]

Prints, for int4 / int8 / bf16: the GEMV kernels' GB/s on Mistral-7B's layer shapes, and the decode
tokens/s of a Mistral-7B-width model (random weights, `--layers` layers, int8 head) with the weight bytes
read per token and that as a fraction of the GPU's measured read bandwidth.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from lilmistral.cache import RollingKVCache
from lilmistral.config import ModelArgs
from lilmistral.generate import SamplingParams, generate_tokens
from lilmistral.model import Transformer
from lilmistral.quant import QuantLinear, spec_for, swap_in_quant_linears
from lilmistral.quant.pack import packed_shapes
from lilmistral.bench import measure_bandwidth, weight_bytes_per_token

MISTRAL_7B = dict(dim=4096, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32000, max_seq_len=32768,
                  rope_theta=1e6)


def timed(fn, repeat: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat / 1e3


def random_parts(n: int, k: int, spec) -> dict[str, torch.Tensor]:
    parts = {}
    for name, (shape, dtype) in packed_shapes(n, k, spec).items():
        if dtype.is_floating_point:
            parts[name] = (torch.rand(shape, device="cuda") * 0.01).to(dtype)
        else:
            info = torch.iinfo(dtype)
            parts[name] = torch.randint(info.min, info.max, shape, device="cuda", dtype=dtype)
    return parts


def kernel_table(bw: float) -> list[dict]:
    from lilmistral.quant.triton_kernels import TritonKernel

    rows = []
    for scheme in ("int4", "int8", "bf16"):
        for n, k in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            if scheme == "bf16":
                w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                seconds, nbytes = timed(lambda: x @ w.t()), w.nbytes
            else:
                spec = spec_for("layers.0.attention.wq.weight", (n, k), scheme)
                parts = random_parts(n, k, spec)
                kernel = TritonKernel(parts, spec)
                seconds = timed(lambda: kernel(x))
                nbytes = sum(t.nbytes for t in parts.values())
            rows.append({"scheme": scheme, "shape": f"{n}x{k}", "us": round(seconds * 1e6, 1),
                         "gbps": round(nbytes / seconds / 1e9, 1), "fraction": round(nbytes / seconds / 1e9 / bw, 3)})
    return rows


def build(args: ModelArgs, scheme: str) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    specs = {}
    for name, p in model.named_parameters():
        spec = spec_for(name, tuple(p.shape), scheme) if scheme != "bf16" else None
        if spec:
            specs[name] = spec
    swap_in_quant_linears(model, specs)
    state = {}
    for name, t in model.state_dict().items():
        base = name.rsplit(".", 1)[0] + ".weight"
        if base in specs:
            continue
        state[name] = (torch.randn(t.shape, device="cuda") * 0.02).to(torch.bfloat16)
    for name, spec in specs.items():
        n, k = model.get_submodule(name.removesuffix(".weight")).out_features, \
            model.get_submodule(name.removesuffix(".weight")).in_features
        for part, tensor in random_parts(n, k, spec).items():
            state[f"{name.removesuffix('.weight')}.{part}"] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = model.inv_freq.cuda()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.prepare()
    return model.eval()


def decode_table(layers: int, tokens: int, bw: float) -> list[dict]:
    args = ModelArgs(n_layers=layers, **MISTRAL_7B)
    rows = []
    for scheme in ("int4", "int8", "bf16"):
        model = build(args, scheme)
        cache = RollingKVCache(layers, args.n_kv_heads, args.head_dim, 4096, None, torch.bfloat16, "cuda")
        params = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=tokens)
        prompt = list(range(1, 129))
        with torch.inference_mode():
            list(generate_tokens(model, cache, prompt, params, []))  # warm-up (Triton compiles)
            cache.reset()
            torch.cuda.synchronize()
            t = time.perf_counter()
            stream = generate_tokens(model, cache, prompt, params, [])
            next(stream)
            torch.cuda.synchronize()
            t_first = time.perf_counter()
            n = 1 + sum(1 for _ in stream)
            torch.cuda.synchronize()
            t_end = time.perf_counter()
        per_token = (t_end - t_first) / (n - 1)
        nbytes = weight_bytes_per_token(model)
        rows.append({"scheme": scheme, "layers": layers, "decode_tps": round(1 / per_token, 1),
                     "ms_per_token": round(per_token * 1e3, 3), "ttft_s": round(t_first - t, 4),
                     "weight_mb_per_token": round(nbytes / 1e6, 1),
                     "achieved_gbps": round(nbytes / per_token / 1e9, 1),
                     "bandwidth_fraction": round(nbytes / per_token / 1e9 / bw, 3)})
        del model, cache
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    ns = p.parse_args()
    bw = measure_bandwidth(torch.device("cuda"), gib=4.0)
    print(json.dumps({"device": torch.cuda.get_device_name(), "read_bandwidth_gbps": round(bw, 1)}))
    for row in kernel_table(bw):
        print(json.dumps(row))
    for row in decode_table(ns.layers, ns.tokens, bw):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
