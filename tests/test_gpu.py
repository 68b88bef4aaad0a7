"""The GPU path on a GPU (skipped without one): whole models through the Triton kernels against the float32
dequantized reference on the CPU, and the CUDA-graph decode step against the eager one. Random models built by
the loader's own build_model, so no tokenizer is needed: the device machine's image has no mistral_common, so
run `python3 -m pytest --noconftest tests/test_gpu.py tests/test_triton.py` there."""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from reference import assert_within_bfloat16, blockwise_int8, relative_error

from benchmarks.random_model import random_weights
from lilmistral.cache import RollingKVCache
from lilmistral.config import ModelArgs
from lilmistral.generate import DecodeStep, prefill
from lilmistral.loader import build_model
from lilmistral.quant import QuantExperts, QuantLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

# heads x head_dim (512) is not dim (256), as in Mistral Nemo and Small 3
DENSE = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, hidden_dim=512, vocab_size=1000, max_seq_len=4096,
                  head_dim=64)
MOE = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, hidden_dim=512, vocab_size=1000, max_seq_len=4096,
                n_experts=4, n_experts_per_tok=2)
WINDOWED = dataclasses.replace(DENSE, sliding_window=16)  # a rolling buffer of 16 slots, wrapping as Mistral v0.1's


def models(args: ModelArgs, scheme: str):
    """The model on the GPU (bfloat16, Triton kernels), its float32 dequantized reference on the CPU, and the
    model on the CPU in bfloat16 (the CPU kernels: bfloat16's own error, to compare)."""
    tensors, specs = random_weights(args, scheme)
    tensors = [(name, t * 25 if name.endswith("feed_forward.gate.weight") else t)  # decisive routers
               for name, t in tensors]
    return (build_model(args, tensors, specs, "cuda", torch.bfloat16),
            build_model(args, tensors, specs, "cpu", torch.float32),
            build_model(args, tensors, specs, "cpu", torch.bfloat16))


@contextlib.contextmanager
def rounding_inputs(model):
    """The model's QuantLinears round their inputs' blocks of 32 to int8, as a GPU's kernels do."""
    hooks = [m.register_forward_pre_hook(lambda m, args: (blockwise_int8(args[0]), *args[1:]))
             for m in model.modules() if isinstance(m, QuantLinear)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def cache_for(model, args: ModelArgs, size: int = 512) -> RollingKVCache:
    """size slots, or a windowed model's window."""
    return RollingKVCache(args.n_layers, args.n_kv_heads, args.head_dim, args.sliding_window or size,
                          args.sliding_window, model.norm.weight.dtype, model.norm.weight.device)


@pytest.mark.parametrize("args", [DENSE, MOE, WINDOWED], ids=["dense", "moe", "windowed"])
@pytest.mark.parametrize("scheme", ["int4", "int5", "int8"])
def test_gpu_model_matches_the_dequantized_reference(args, scheme):
    """Prefill (the weights dequantized for PyTorch's matmul) and decode (the GEMVs, fused projections, gated
    w1/w3, residuals added in the output projections, expert-batched MoE, the decode attention; a sliding
    window's prompt in chunks and its slots reused) within bfloat16's rounding of the float32 reference, whose
    projections round their inputs to int8 as the kernels do; every packed weight runs a Triton kernel on its
    own repacked copy."""
    from lilmistral.quant.triton_kernels import TritonKernel

    gpu, reference, cpu = models(args, scheme)
    linears = [m for m in gpu.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.qweight is None for m in linears)  # the canonical parts were let go of
    assert gpu.layers[0].attention.wqkv is not None and isinstance(gpu.layers[0].attention.wqkv.kernel, TritonKernel)
    if args.is_moe:
        assert all(m.batched for m in gpu.modules() if isinstance(m, QuantExperts))
    else:  # w1 and w3 in one kernel that writes silu(w1 x) * w3 x
        assert gpu.layers[0].feed_forward.gated is not None and gpu.layers[0].feed_forward.w13 is None
    ids = torch.randint(1, args.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), rounding_inputs(reference):
        caches = cache_for(gpu, args), cache_for(reference, args), cache_for(cpu, args)
        got, expected, cpu_got = (prefill(model, cache, ids.tolist(), all_logits=True)
                                  for model, cache in zip((gpu, reference, cpu), caches))
        assert_within_bfloat16(got, cpu_got, expected)
        eager = DecodeStep(gpu, graphs=False)
        for token in (5, 17, 993):
            expected = reference(torch.tensor([token]), caches[1])[-1]
            assert_within_bfloat16(eager(token, caches[0]), cpu(torch.tensor([token]), caches[2])[-1], expected)


@pytest.mark.parametrize("args", [DENSE, MOE, WINDOWED], ids=["dense", "moe", "windowed"])
def test_graphed_decode_gives_the_eager_logits(args):
    """The CUDA-graph decode step replays what the eager step computes, across a 256-slot bucket (a second
    graph) and in a resized cache (graphs made anew over it); windowed, over slots written again and again."""
    gpu, *_ = models(args, "int4")
    graphed, eager = DecodeStep(gpu), DecodeStep(gpu, graphs=False)
    ids = torch.randint(1, args.vocab_size, (260,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        for size in (512, 384):
            caches = cache_for(gpu, args, size), cache_for(gpu, args, size)
            for cache in caches:
                prefill(gpu, cache, ids[:250])
            for token in ids[250:]:  # positions 250..259: slots 0..255, then 0..511
                assert relative_error(graphed(token, caches[0]), eager(token, caches[1])) < 1e-2
    assert graphed.mode == "graphed" and eager.mode == "eager"
    # the last cache's graphs: its two buckets, or a window's one
    assert sorted(graphed._graphed.graphs) == ([args.sliding_window] if args.sliding_window else [256, 384])


def test_programmatic_dependent_launch_changes_no_logits(monkeypatch):
    """Graphed decode as by default (on Hopper the kernels launched programmatically dependent: each starts
    while the one before finishes, and waits for it before reading its output) and without (LILMISTRAL_PDL=0)
    give the same logits, within the atomic sums' rounding."""
    gpu, *_ = models(DENSE, "int4")
    ids = torch.randint(1, DENSE.vocab_size, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    logits = []
    with torch.inference_mode():
        for pdl in ("1", "0"):
            monkeypatch.setenv("LILMISTRAL_PDL", pdl)
            cache, step = cache_for(gpu, DENSE), DecodeStep(gpu)
            prefill(gpu, cache, ids[:30])
            logits.append([step(token, cache).clone() for token in ids[30:]])
    assert all(relative_error(a, b) < 1e-2 for a, b in zip(*logits))


def test_decoding_ahead_gives_the_step_by_step_tokens():
    """Graphed decoding with each step and the next draw queued before the host reads the token they follow
    (the default on a GPU: tokens drawn on the device, their ids read back through pinned memory) gives the
    tokens and cache length of decoding a step at a time, greedy and sampled (the same seed), and stops alike
    at an end-of-sequence token."""
    from lilmistral.generate import SamplingParams, generate_tokens

    gpu, *_ = models(DENSE, "int4")
    step = DecodeStep(gpu)

    def run(params: SamplingParams, eos: tuple[int, ...], ahead: bool) -> tuple[list[int], int]:
        cache = cache_for(gpu, DENSE)
        return list(generate_tokens(gpu, cache, list(range(3, 40)), params, eos, step, ahead)), cache.length

    with torch.inference_mode():
        for params in (SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=30),
                       SamplingParams(seed=1, max_tokens=30)):
            tokens, length = run(params, (), False)
            assert run(params, (), True) == (tokens, length) and step.mode == "graphed"
            eos = (tokens[10],)
            assert run(params, eos, True) == run(params, eos, False)
