"""Real trained weights: SmolLM2-135M-Instruct (Q4_1 GGUF) against transformers, answers, perplexity."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lilmistral
from conftest import smollm2_gguf
from lilmistral.perplexity import perplexity, reference_text

QUESTIONS = {"What is the capital of Japan?": "Tokyo", "What is the chemical symbol for water?": "H2O"}


@pytest.fixture(scope="module")
def gguf_path():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def float_llm(gguf_path):
    return lilmistral.load(gguf_path, quant="f32")


def test_gguf_header_reader_matches_the_gguf_package(gguf_path, tmp_path):
    import gguf

    from lilmistral.convert.gguf import GGUFSource, read_gguf_header

    metadata, tensors = read_gguf_header(gguf_path)
    reader = gguf.GGUFReader(str(gguf_path))
    assert metadata == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert [(t.name, t.shape, t.type_name, t.data_offset, t.n_bytes) for t in tensors] == \
        [(t.name, tuple(int(d) for d in t.shape), t.tensor_type.name, t.data_offset, int(t.n_bytes))
         for t in reader.tensors]
    header_end = tensors[0].data_offset
    for cut in (7, 100, 5000, header_end - 64):  # cut anywhere in the header: one clear error
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(gguf_path.read_bytes()[:cut])
        with pytest.raises(lilmistral.ModelFormatError, match="not a readable GGUF file"):
            GGUFSource(bad)


def test_loading_a_gguf_imports_neither_the_gguf_package_nor_mistral_common(gguf_path):
    """The header reader takes the gguf package's constants module alone: the package imports mistral_common
    (0.5 s or more of every GGUF load), and a GGUF's tokenizer does not use it."""
    code = (f"import sys, lilmistral; lilmistral.load({str(gguf_path)!r}); "
            "print(sorted({'gguf', 'mistral_common'} & set(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_logits_match_transformers(gguf_path, float_llm):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    ids = float_llm.tokenize_chat([{"role": "user", "content": "What is the capital of France?"}])
    ids += float_llm.tokenizer.encode(reference_text()[:3000])[:300]
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    got = float_llm.forward(ids)
    assert len(ids) > 300
    assert (got - expected).abs().max().item() <= 1e-3
    # and transformers' own greedy answer
    with torch.no_grad():
        prompt = float_llm.tokenize_chat([{"role": "user", "content": "What is the capital of France?"}])
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert float_llm.tokenizer.decode(out[0, len(prompt):].tolist()).startswith("The capital of France is Paris.")


def test_float_answers_paris(float_llm):
    answer = "".join(float_llm.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0,
                                    max_tokens=20))
    assert "Paris" in answer


def test_json_mode_answers_one_json_object(float_llm):
    """Real weights asked for JSON, greedy and sampled: the answer is one object that json.loads reads, ended
    where it closes (unconstrained, this model fences its JSON in Markdown: json.loads refuses that)."""
    import json

    question = [{"role": "user", "content": "Describe Japan as a JSON object with keys name and capital."}]
    free = "".join(float_llm.chat(question, temperature=0, max_tokens=60))
    held = "".join(float_llm.chat(question, temperature=0, max_tokens=60, format="json"))
    assert isinstance(json.loads(held), dict) and float_llm.stats.done_reason == "stop"
    with pytest.raises(ValueError):
        json.loads(free)
    for seed in range(3):
        held = "".join(float_llm.chat(question, seed=seed, temperature=1.0, max_tokens=200, format="json"))
        assert float_llm.stats.done_reason == "length" or isinstance(json.loads(held), dict), held


def test_an_answer_held_to_a_json_schema_is_a_value_of_it(float_llm):
    """Real weights held to a schema (Ollama's structured outputs), greedy and sampled: the answer is one the schema
    accepts (jsonschema), with the properties it asks for in its order, and it is about Japan."""
    import json

    import jsonschema

    languages = {"type": "array", "items": {"type": "string"}, "maxItems": 3}
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "capital": {"type": "string"},
                                               "population": {"type": "integer"}, "languages": languages},
              "required": ["name", "capital", "population", "languages"]}
    question = [{"role": "user", "content": "Tell me about Japan as JSON."}]
    held = json.loads("".join(float_llm.chat(question, temperature=0, max_tokens=100, format=schema)))
    assert float_llm.stats.done_reason == "stop" and list(held) == list(schema["properties"])
    jsonschema.validate(held, schema)
    assert held["name"] == "Japan"
    for seed in range(2):
        held = "".join(float_llm.chat(question, seed=seed, temperature=1.0, max_tokens=150, format=schema))
        assert float_llm.stats.done_reason == "length" or jsonschema.validate(json.loads(held), schema) is None


@pytest.mark.parametrize("quant", ["f32", "int8", "int4"])
def test_answers_every_path(gguf_path, float_llm, quant):
    llm = float_llm if quant == "f32" else lilmistral.load(gguf_path, quant=quant)
    for question, expected in QUESTIONS.items():
        answer = "".join(llm.chat([{"role": "user", "content": question}], temperature=0, max_tokens=24))
        assert expected in answer, (quant, answer)


@pytest.mark.parametrize("quant,question", [("int4", "What is the capital of Japan?"),
                                            ("int8", "What is the chemical symbol for water?"),
                                            ("f32", "What is the capital of Japan?")])
def test_cli_run_on_the_gguf(gguf_path, quant, question):
    expected = QUESTIONS[question]
    r = subprocess.run([sys.executable, "-m", "lilmistral", "run", str(gguf_path), question, "--temperature", "0",
                        "--max-tokens", "24", "--quant", quant], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert expected in r.stdout


@pytest.mark.parametrize("quant", ["int8", "int6", "int5", "int4"])
def test_kernels_follow_the_dequantized_model(gguf_path, quant, monkeypatch):
    """The packed CPU kernels (bfloat16 activations) against the same weights dequantized and run in float32:
    the same greedy tokens, or a first divergence that the reference itself calls a near tie."""
    from lilmistral.quant.cpu import DequantKernel
    from lilmistral.quant.pack import dequantize

    weights = {}  # the reference's weights dequantized once, not at every call: the same products, 5x sooner

    def dequantized_once(kernel: DequantKernel, x: torch.Tensor) -> torch.Tensor:
        if kernel not in weights:
            weights[kernel] = dequantize(kernel.parts, kernel.spec, x.dtype)
        return torch.nn.functional.linear(x, weights[kernel])

    monkeypatch.setattr(DequantKernel, "__call__", dequantized_once)
    fast = lilmistral.load(gguf_path, quant=quant)
    exact = lilmistral.load(gguf_path, quant=quant, dtype="float32")
    ids = fast.tokenize_chat([{"role": "user", "content": "Tell me about the Moon."}])
    got = list(fast.generate(ids, temperature=0, repeat_penalty=1.0, max_tokens=32))
    want = list(exact.generate(ids, temperature=0, repeat_penalty=1.0, max_tokens=32))
    if got != want:
        i = next(k for k, (a, b) in enumerate(zip(got, want)) if a != b)
        logits = exact.forward(ids + want[:i])[-1]
        top2 = torch.topk(logits, 2).values
        margin = (top2[0] - top2[1]).item()
        print(f"{quant}: first divergence at token {i}, reference margin {margin:.3f}")
        assert margin < 0.5 and i >= 8, f"diverged at token {i} with a reference margin of {margin:.3f}"


def quality_table(gguf_path, n_tokens: int, full: bool = True) -> dict[str, float]:
    """Perplexity of the float weights and of each 4/8-bit scheme made from them (all run in float32, so
    only the weights differ). The GGUF's float weights lie on a Q4_1 grid, so int4 g32 with a min is
    exact; lilmistral keeps such tensors bit for bit when it reads the file (the product path)."""
    import gguf

    from lilmistral.quant import QUANTIZED_SUFFIXES, QuantSpec, dequantize, quantize, spec_for
    from lilmistral.quant.pack import group_size_for

    llm = lilmistral.load(gguf_path, quant="f32")
    ids = llm.tokenizer.encode(reference_text())[:n_tokens]
    state = llm.model.state_dict()
    original = {n: w.clone() for n, w in state.items() if n.endswith(QUANTIZED_SUFFIXES)}

    def ppl_with(transform) -> float:
        for name, w in original.items():
            state[name].copy_(transform(w))
        return perplexity(llm, ids)

    def ours(scheme: str, g: int = 0, symmetric: bool = False, super_blocked: bool = False):
        def transform(w):
            if super_blocked or scheme == "int6":  # as spec_for makes Hugging Face weights' int4 (int5, int6)
                spec = spec_for("x.w1.weight", tuple(w.shape), scheme)
                assert spec.super_block  # 256 where it divides K, else 192 (K = 576)
            else:
                spec = QuantSpec(scheme, group_size_for(w.shape[1], g) if g else 0, symmetric)
            return dequantize(quantize(w, spec), spec)
        return transform

    def llama_cpp(kind: str):
        qtype = gguf.GGMLQuantizationType[kind]
        return lambda w: torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype))

    table = {"float (the file, dequantized)": ppl_with(lambda w: w)}
    table["int8"] = ppl_with(ours("int8"))
    table["int6"] = ppl_with(ours("int6"))
    table["int4 g32"] = ppl_with(ours("int4", 32))
    table["int4 g32 super-blocked"] = ppl_with(ours("int4", 32, super_blocked=True))
    if not full:
        return table
    for g in (64, 128):
        table[f"int4 g{g}"] = ppl_with(ours("int4", g))
    table["int4-sym g32"] = ppl_with(ours("int4", 32, symmetric=True))
    table["llama.cpp Q4_0 (g32 sym)"] = ppl_with(llama_cpp("Q4_0"))
    table["llama.cpp Q4_1 (g32 min)"] = ppl_with(llama_cpp("Q4_1"))
    table["int5 g32 super-blocked"] = ppl_with(ours("int5", 32, super_blocked=True))
    table["int5-sym g32 (Q5_0's layout)"] = ppl_with(ours("int5", 32, symmetric=True))
    table["llama.cpp Q5_0 (g32 sym)"] = ppl_with(llama_cpp("Q5_0"))
    table["llama.cpp Q5_1 (g32 min)"] = ppl_with(llama_cpp("Q5_1"))
    return table


def test_int8_and_int4_keep_the_float_perplexity(gguf_path):
    table = quality_table(gguf_path, 1024, full=False)
    base = table["float (the file, dequantized)"]
    assert table["int8"] <= base * 1.01
    assert table["int6"] <= base * 1.02
    assert table["int4 g32"] <= base * 1.10
    assert table["int4 g32 super-blocked"] <= table["int4 g32"] * 1.01  # 8-bit codes of its scales lose ~nothing


@pytest.mark.slow
def test_quantization_quality_table(gguf_path):
    """The README's table: every scheme, lilmistral's and llama.cpp's (LILMISTRAL_PPL_TOKENS=20000 for it)."""
    n = int(os.environ.get("LILMISTRAL_PPL_TOKENS", "2048"))
    table = quality_table(gguf_path, n)
    print(f"\nperplexity, SmolLM2-135M-Instruct, pydoc topics, first {n} tokens, windows of 512:")
    for name, ppl in table.items():
        print(f"  {name:32s} {ppl:8.3f}")
    base = table["float (the file, dequantized)"]
    assert table["int8"] <= base * 1.01
    assert table["int4 g32"] <= base * 1.10
    assert table["int4-sym g32"] <= table["int4 g64"]  # at equal bits, smaller groups win


def test_bench_reads_one_embedding_row_and_the_int8_head(gguf_path):
    """SmolLM2 ties its head to the embeddings; quantized, the head is an int8 copy of the table. A decoded
    token reads that head and one row of the table, counted alike from the loaded model and from the sizes
    the loader plans (what `bench --pp` counts)."""
    from lilmistral.bench import held_weights, weight_bytes_per_token
    from lilmistral.loader import tensor_bytes

    llm = lilmistral.load(gguf_path, quant="int4")
    held = held_weights(llm.model)
    assert any(name.startswith("output.") for name, _ in held)
    table = dict(held)["tok_embeddings.weight"]
    read = weight_bytes_per_token(llm.args, held)
    assert read == round(sum(n for _, n in held) - table + table / llm.args.vocab_size)
    planned = weight_bytes_per_token(llm.args, tensor_bytes(gguf_path, "int4").items())
    assert abs(planned - read) <= 0.01 * read
