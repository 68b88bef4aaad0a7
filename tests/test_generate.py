"""The cache, sampling, streaming text, context limits and `lilmistral run` on a tiny model."""
from __future__ import annotations

import ctypes
import gc
import io
import json
import mmap
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import save_file

import lilmistral
from conftest import make_hf_model
from lilmistral.cache import RollingKVCache
from lilmistral.generate import NO_IDS, DecodeStep, Sampler, SamplingParams, generate_tokens, prefill, trace_step
from lilmistral.llm import stream_text
from lilmistral.loader import page_out
from lilmistral.model import add_norm
from lilmistral.repl import Chat, stream_answer
from lilmistral.quant import QuantExperts, vnni
from lilmistral.quant.cpu import VnniInt4Kernel, VnniInt8Kernel, layer_kernels


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("windowed")
    make_hf_model(folder, "mistral", sliding_window=8)
    return folder


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full")
    make_hf_model(folder, "mistral", sliding_window=None)
    return folder


def test_rolling_cache_memory_is_fixed(windowed):
    llm = lilmistral.load(windowed)
    def addresses():
        return [t.data_ptr() for t in llm.cache.k + llm.cache.v]

    assert llm.cache.size == 8 and [t.shape for t in llm.cache.k] == [(2, 8, 16)] * 2
    before = (addresses(), llm.cache.nbytes)
    llm.forward(list(range(10, 110)))  # 100 tokens through an 8-slot buffer
    tokens = list(llm.generate(list(range(10, 50)), temperature=0, max_tokens=60))
    assert len(tokens) > 8
    assert (addresses(), llm.cache.nbytes) == before
    assert llm.cache.length > 8 * 5


LINUX = tuple(int(n) for n in os.uname().release.split("-")[0].split(".")[:2]) if hasattr(os, "uname") else (0, 0)


def resident_mb(kind: str = "RssAnon") -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(kind + ":")).split()[1]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_cpu_cache_takes_memory_as_it_fills():
    """A 512 MB cache (4 layers, 32k slots) holds zeros but takes memory only for the slots written."""
    before = resident_mb()
    cache = RollingKVCache(4, 8, 128, size=32768, window=None, dtype=torch.bfloat16)
    assert cache.nbytes == 512 * 2**20 and resident_mb() - before < 32
    assert not cache.k[3][:, -100:].any() and not cache.v[0][:, :100].any()
    cache.k[0].fill_(1.0)  # one layer's keys: 64 MB
    assert 56 < resident_mb() - before < 96


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_paged_out_weights_leave_resident_memory_and_keep_their_values(tmp_path):
    """What the loader does to canonical weights the kernels repacked: the file's pages leave the process's
    resident memory but stay in the page cache (the next load reads no disk), and read again they hold the
    same values; an anonymous tensor keeps its values."""
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randint(-127, 128, (64, 2**20), dtype=torch.int8)}, path)  # 64 MB
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # clean pages, as a model's are: MADV_PAGEOUT evicts those from the page cache
    with safe_open(path, "pt") as f:
        w = f.get_tensor("w")
    total = int(w.sum(dtype=torch.int64))  # touches every page
    before = resident_mb("RssFile")
    page_out([w])
    assert before - resident_mb("RssFile") > 48
    assert cached_fraction(path) > 0.9
    assert int(w.sum(dtype=torch.int64)) == total
    anonymous = w.clone()
    page_out([anonymous])
    assert torch.equal(anonymous, w)


@pytest.mark.skipif(not sys.platform.startswith("linux") or LINUX < (5, 14), reason="MADV_POPULATE_READ")
def test_loading_reads_the_embedding_table_in(full, tmp_path, monkeypatch):
    """The embedding table, read a row a token, is the one large tensor a converted CPU model leaves in its
    memory-mapped file (a HF folder loaded as stored leaves all): loading reads it in (loader.read_in), so that
    a token's first use does not wait on the disk when the file has left the page cache (after a reboot)."""
    from lilmistral import loader
    from lilmistral.convert import convert

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randint(-127, 128, (64, 2**20), dtype=torch.int8)}, path)  # 64 MB, past the readahead
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: out of the page cache
    with safe_open(path, "pt") as f:
        w = f.get_tensor("w")
    assert cached_fraction(path) < 0.2
    before = resident_mb("RssFile")
    loader.read_in([w])
    assert cached_fraction(path) > 0.95 and resident_mb("RssFile") - before > 60
    read = []
    monkeypatch.setattr(loader, "read_in", read.extend)
    for source in (convert(full, tmp_path / "int4", "int4"), full):  # converted; a HF folder, as stored
        read.clear()
        llm = lilmistral.load(source)
        assert read == [llm.model.tok_embeddings.weight]


def cached_fraction(path: Path) -> float:
    """The fraction of a file's pages in the page cache: mincore over a fresh mapping of it."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = path.stat().st_size
    pages = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
    with open(path, "rb") as f:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        assert libc.mincore(address, size, pages) == 0
        libc.munmap(address, size)
    return sum(byte & 1 for byte in pages.raw) / len(pages.raw)


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
def test_the_loader_lets_go_of_the_parts_the_kernels_repacked(full):
    """A bfloat16 model's QuantLinears hold no canonical parts once their kernels (or the fused projections')
    repacked them, and float32 activations through them get what the float32 model (which keeps its
    parts, for dequantizing kernels) computes, bit for bit."""
    bf16, f32 = (lilmistral.load(full, quant="int4", dtype=dtype).model for dtype in ("bfloat16", "float32"))
    assert not [name for name in bf16.state_dict() if name.endswith((".qweight", ".scales", ".mins"))]
    assert f32.layers[0].attention.wqkv is None and f32.layers[0].attention.wq.qweight is not None
    for name in ("layers.0.attention.wq", "layers.0.attention.wo", "layers.1.feed_forward.w2", "output"):
        x = torch.randn(3, f32.get_submodule(name).in_features)
        assert torch.equal(bf16.get_submodule(name)(x), f32.get_submodule(name)(x)), name


def test_rolling_cache_slots_follow_positions():
    cache = RollingKVCache(1, 1, 1, size=4, window=4, dtype=torch.float32)
    for p in range(6):
        cache.begin(1)
        cache.update(0, torch.full((1, 1, 1), float(p)), torch.zeros(1, 1, 1))
        cache.end()
    assert cache.k[0][0, :, 0].tolist() == [4.0, 5.0, 2.0, 3.0]  # the docstring's worked example


def test_prompt_longer_than_window_is_chunked(windowed):
    llm = lilmistral.load(windowed)
    ids = list(range(5, 5 + 50))
    whole = llm.forward(ids)
    llm.cache.reset()
    with torch.inference_mode():
        stepwise = torch.cat([llm.model(torch.tensor([t]), llm.cache) for t in ids])
    assert (whole - stepwise).abs().max().item() < 1e-4


def test_seed_reproducible_and_sampling_options(full):
    llm = lilmistral.load(full)
    ids = list(range(100, 120))
    a = list(llm.generate(ids, temperature=1.0, seed=3, max_tokens=20))
    b = list(llm.generate(ids, temperature=1.0, seed=3, max_tokens=20))
    c = list(llm.generate(ids, temperature=1.0, seed=4, max_tokens=20))
    assert a == b and a != c
    greedy = list(llm.generate(ids, temperature=0, repeat_penalty=1.0, max_tokens=20))
    assert list(llm.generate(ids, temperature=1.5, top_k=1, repeat_penalty=1.0, seed=9, max_tokens=20)) == greedy
    assert list(llm.generate(ids, temperature=1.5, top_p=1e-6, repeat_penalty=1.0, seed=9, max_tokens=20)) == greedy


def test_sample_filters():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    params = SamplingParams(temperature=1.0, top_k=2, top_p=1.0, repeat_penalty=1.0, seed=0)
    sampler = Sampler(params, [], torch.device("cpu"))
    draws = [sampler(logits) for _ in range(200)]
    assert {int(t) for t in draws} == {1, 2} and all(t.shape == (1,) for t in draws)
    # top_p keeps the smallest prefix reaching it: 3.0 alone holds ~66% of the probability
    nucleus = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.6, repeat_penalty=1.0, seed=0), [], "cpu")
    assert {int(nucleus(logits)) for _ in range(50)} == {1}
    # repetition penalty divides a positive logit: token 1 (3.0 -> 1.5) loses to token 2; over the last
    # repeat_last_n ids (the prompt's, then the drawn ones), none with 0
    def greedy(history: list[int], **options) -> int:
        return int(Sampler(SamplingParams(temperature=0, repeat_penalty=2.0, **options), history, "cpu")(logits))

    assert greedy([1]) == 2 and greedy([1, 0, 0], repeat_last_n=2) == 1 and greedy([1], repeat_last_n=0) == 1
    assert greedy([1, 0, 0], repeat_last_n=-1) == 2
    recent = Sampler(SamplingParams(temperature=0, repeat_penalty=2.0, repeat_last_n=2), [3, 0], "cpu")
    assert int(recent(logits)) == 1 and recent.recent.tolist() == [0, 1]  # the drawn id joins the recent ones
    with pytest.raises(lilmistral.LilmistralError):
        SamplingParams.from_kwargs(temperature=-1)
    with pytest.raises(lilmistral.LilmistralError):
        SamplingParams.from_kwargs(temprature=1)
    # numbers past what the sampler's int64 (or the generator's seed) holds were a traceback from inside it
    for option, value in (("top_k", 10**20), ("repeat_last_n", 10**20), ("seed", 2**64), ("seed", -2**63 - 1)):
        with pytest.raises(lilmistral.LilmistralError, match=option):
            SamplingParams.from_kwargs(**{option: value})
    for seed in (-2**63, 2**64 - 1):
        Sampler(SamplingParams.from_kwargs(seed=seed, top_k=2**31 - 1, repeat_last_n=2**31 - 1), [1], "cpu")(logits)


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
@pytest.mark.parametrize("vocab", [5, 1000, 49157])
def test_the_cpu_sampler_draws_from_pytorchs_candidates_and_probabilities(vocab):
    """The CPU's one-call sampler (sampling.cpp) against PyTorch's operators (Sampler.draw): greedy, the same
    token; sampled, for a draw u at the middle of each candidate's share of the probability, that candidate,
    where the candidates and their probabilities follow the penalty, temperature, top-k (ties: the lower id)
    and top-p as PyTorch's operators compute them. Ties among the logits and repeated recent ids included."""
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(vocab, generator=g) * 3).round(decimals=1)  # rounded: many ties
    history = torch.randint(0, vocab, (30,), generator=g).tolist() * 2
    for penalty in (1.0, 1.3):
        for temperature, top_k, top_p in ((0, 40, 0.9), (0.7, 40, 0.9), (1.3, 0, 0.5), (1.0, 1, 1.0), (0.5, 7, 1.0),
                                          (1.0, vocab + 5, 0.95)):
            params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repeat_penalty=penalty)
            sampler = Sampler(params, history, torch.device("cpu"))
            assert sampler.in_one_call
            recent = sampler.recent if sampler.recent is not None else NO_IDS

            def draw(u: float) -> int:
                return int(torch.ops.lilmistral.sample(logits, recent, penalty, temperature, top_k, top_p, u))

            if temperature == 0:
                assert draw(0.0) == int(sampler.draw(logits))
                continue
            penalized = logits.clone()
            picked = logits[recent]
            penalized[recent] = torch.where(picked > 0, picked / penalty, picked * penalty)
            values, ids = torch.sort(penalized, descending=True, stable=True)
            values, ids = values[:top_k or vocab], ids[:top_k or vocab]
            probs = torch.softmax(values.double() / temperature, dim=-1)
            probs = probs * (probs.cumsum(dim=-1) - probs < top_p)
            ends = probs.cumsum(dim=-1) / probs.sum()
            starts = ends - probs / probs.sum()
            shares = [(s, e, t) for s, e, t in zip(starts.tolist(), ends.tolist(), ids.tolist()) if e - s > 1e-4]
            for start, end, token in shares[::len(shares) // 50 + 1] + shares[-1:]:  # ~50: a draw over all k takes ms
                assert draw((start + end) / 2) == token
            assert draw(0.0) == ids[0] and draw(1 - 1e-12) == ids[probs.nonzero()[-1]]


THREADS_SCRIPT = """
import os, sys, threading, time, torch, lilmistral
before = len(os.listdir("/proc/self/task"))
def tasks(settle=False):  # an ended thread leaves the process a moment after join() returns; an idle worker stays
    for _ in range(100 if settle else 1):
        count = len(os.listdir("/proc/self/task"))
        if count <= before:
            break
        time.sleep(0.02)
    return count
x, w = torch.randn(1, 512), torch.randn(4096, 512)
llm = lilmistral.load(sys.argv[1], quant="int4")
loaded = tasks()
answer = []
thread = threading.Thread(target=lambda: answer.append(''.join(llm.chat([{"role": "user", "content": "Hi"}],
                                                                         temperature=0, max_tokens=4))))
thread.start(); thread.join()
answered = tasks(settle=True)
list(llm.chat([{"role": "user", "content": "Hi"}], temperature=0, max_tokens=4))
again = tasks()
x @ w.T  # an operator of PyTorch's own, on two threads: its pool stays
print(before, loaded, answered, again, tasks(), answer[0] != "")
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or torch.get_num_threads() < 2,
                    reason="needs Linux's /proc and two CPU threads")
def test_no_idle_cpu_threads_are_left_after_a_load_or_an_answer(full):
    """PyTorch's OpenMP workers of the thread that loaded, or answered, are let go once it is done (an idle pool
    slows another thread's operators ~2x: lilmistral.threads): the process holds as many threads after a load and
    after answers on another thread and on the main thread as before; a bare PyTorch operator leaves its pool."""
    script = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(full)], capture_output=True, text=True,
                            timeout=300)
    assert script.returncode == 0, script.stderr
    before, loaded, answered, again, after_operator, answered_text = script.stdout.split()
    assert before == loaded == answered == again and int(after_operator) > int(before) and answered_text == "True"


@pytest.mark.parametrize("fixture", ["full", "windowed"])
def test_embeddings_are_transformers_hidden_states_averaged(fixture, request):
    """llm.embed: each text's final hidden states (transformers' last_hidden_state, after the last norm) averaged
    and scaled to length 1, as Ollama's /api/embed; a text longer than a sliding window runs in chunks of it. A text
    longer than the context is cut to it, or refused with truncate=False; the cache is left empty."""
    import transformers

    folder = request.getfixturevalue(fixture)
    llm = lilmistral.load(folder, quant="f32")
    reference = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32)
    texts = ["Hello", "A longer text, about cats and dogs and the rain. " * 3, ""]
    expected = []
    for text in texts:
        ids = llm.tokenizer.encode(text, bos=True)
        with torch.no_grad():
            expected.append(F.normalize(reference(torch.tensor([ids])).last_hidden_state[0].mean(0), dim=-1))
    embedded = llm.embed(texts)
    assert embedded.shape == (3, llm.args.dim) and llm.stats.prompt_tokens == sum(
        len(llm.tokenizer.encode(t, bos=True)) for t in texts)
    torch.testing.assert_close(embedded, torch.stack(expected), atol=2e-6, rtol=0)
    assert llm.cache.length == 0 and llm.embed(texts[1])[0].equal(embedded[1])

    llm.resize_context(16)
    ids = llm.tokenizer.encode(texts[1], bos=True)[:16]
    with torch.no_grad():
        cut = F.normalize(reference(torch.tensor([ids])).last_hidden_state[0].mean(0), dim=-1)
    torch.testing.assert_close(llm.embed(texts[1])[0], cut, atol=2e-6, rtol=0)
    with pytest.raises(lilmistral.ContextLengthError, match="the context holds 16"):
        llm.embed(texts[1], truncate=False)


def test_second_turn_reuses_the_cached_prefix(full):
    llm = lilmistral.load(full)
    messages = [{"role": "user", "content": "Hello there"}]
    answer = "".join(llm.chat(messages, temperature=0, max_tokens=8))
    first_prompt = llm.stats.prompt_tokens
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    list(llm.chat(messages, temperature=0, max_tokens=4))
    assert llm.stats.prefill_tokens < llm.stats.prompt_tokens - first_prompt + 8


def test_stop_strings_end_the_text(full):
    llm = lilmistral.load(full)
    ids = llm.tokenizer.encode("alpha beta STOP gamma delta")
    pieces = list(stream_text(iter(ids), llm.tokenizer, ["STOP"]))
    assert "".join(pieces).rstrip() == "alpha beta"
    pieces = list(stream_text(iter(ids), llm.tokenizer, ["ST", "zzz"]))
    assert "".join(pieces).rstrip() == "alpha beta"
    assert "".join(stream_text(iter(ids), llm.tokenizer, ["STOPX"])) == "alpha beta STOP gamma delta"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_an_answer_that_calls_tools_leaves_its_calls_for_the_next_message(full, monkeypatch):
    """chat(tools=...): the answer's text ends at [TOOL_CALLS]; the calls (Mistral v3's JSON here) are in
    llm.tool_calls, ready to go back into the conversation with their results; a call cut short stays text."""
    llm = lilmistral.load(full, num_ctx=160)
    question = [{"role": "user", "content": "Weather in Paris?"}]
    written = '[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]'
    answer = [llm.tokenizer.control("[TOOL_CALLS]"), *llm.tokenizer.encode(written)]
    prompts = []

    def scripted(ids, params):  # the model's answer, as if it had written it
        prompts.append(ids)
        return iter(answer)

    monkeypatch.setattr(llm, "_generate", scripted)
    assert "".join(llm.chat(question, tools=[WEATHER])) == ""
    assert prompts[-1] == llm.tokenize_chat(question, [WEATHER]) != llm.tokenize_chat(question)
    assert llm.tool_calls == [{"id": "abcDEF123", "type": "function",
                               "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert "".join(llm.chat(question)) == written and llm.tool_calls == []  # no tools offered: text
    answer[:] = answer[:-3]
    assert "".join(llm.chat(question, tools=[WEATHER])) == llm.tokenizer.decode(answer) and llm.tool_calls == []
    monkeypatch.undo()

    calls = [{"id": "abcDEF123", "type": "function",
              "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    turn = [{"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temperature": 21}'}]
    list(llm.chat(question + turn, tools=[WEATHER], temperature=0, max_tokens=3))
    assert llm.stats.prompt_tokens == len(llm.tokenize_chat(question + turn, [WEATHER]))
    # the oldest turns go with their tool calls and results, leaving a conversation the format takes
    long = [{"role": "system", "content": "sys"}] + (question + turn + [{"role": "assistant", "content": "21 C"}]) * 3
    list(llm.chat(long + question, tools=[WEATHER], temperature=0, max_tokens=8))
    assert llm.stats.dropped_messages == 8 and llm.stats.prompt_tokens + 8 <= 160


def test_context_overflow_policy(full):
    llm = lilmistral.load(full, num_ctx=64)
    assert llm.cache.size == 64
    with pytest.raises(lilmistral.ContextLengthError):
        list(llm.generate(list(range(10, 80))))
    # generation stops at a full context instead of failing, and says so
    out = list(llm.generate(list(range(10, 60)), temperature=0, repeat_penalty=1.0))
    assert len(out) == 64 - 50 + 1 and llm.cache.length == 64 and llm.stats.done_reason == "context"
    list(llm.generate(list(range(10, 20)), temperature=0, repeat_penalty=1.0, max_tokens=3))
    assert llm.stats.done_reason == "length"
    chat, answer, notices = Chat(llm), io.StringIO(), io.StringIO()
    chat.set("temperature", "0")
    stream_answer(chat, "word " * 40, Console(file=answer), markdown=False, verbose=False,
                  notices=Console(file=notices))
    assert "(the answer filled the context, num_ctx=64" in notices.getvalue()
    assert chat.messages[-1] == {"role": "assistant", "content": answer.getvalue().rstrip("\n")}
    # chat drops the oldest turns, keeping the system prompt
    messages = [{"role": "system", "content": "sys"}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": "ok " * 3}]
    messages.append({"role": "user", "content": "last"})
    list(llm.chat(messages, temperature=0, max_tokens=4))
    assert llm.stats.dropped_messages > 0 and llm.stats.prompt_tokens + 4 <= 64
    with pytest.raises(lilmistral.ContextLengthError):
        list(llm.chat([{"role": "user", "content": "word " * 200}], max_tokens=4))


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lilmistral", *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_cli_run_prints_the_answer(full):
    llm = lilmistral.load(full)
    expected = "".join(llm.chat([{"role": "user", "content": "Hi"}], temperature=0, max_tokens=6))
    r = run_cli("run", str(full), "Hi", "--temperature", "0", "--max-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    r = run_cli("run", str(full), "--temperature", "0", "--max-tokens", "6", stdin="Hi\n")
    assert r.returncode == 0 and r.stdout == expected + "\n"
    r = run_cli("run", str(full), "Hi", "--temperature", "0", "--max-tokens", "6", "--verbose")
    assert r.stdout == expected + "\n" and "tokens/s (traced decode step)" in r.stderr
    load_s, total_s = (float(r.stderr.split(f"{name} duration:")[1].split("s\n")[0]) for name in ("load", "total"))
    assert 0 < load_s < total_s < 60  # as Ollama's: the total includes lilmistral.load()'s seconds


def test_cli_user_errors_are_one_line(tmp_path):
    r = run_cli("run", str(tmp_path / "nope"), "Hi")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no such model" in r.stderr
    (tmp_path / "config.json").write_text("{}")
    r = run_cli("run", str(tmp_path), "Hi")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_a_device_this_machine_lacks_is_one_line(full, capsys):
    """--device names a device PyTorch does not know, one lilmistral does not run on, or a GPU that is not
    here: one line before loading, not a traceback from the first tensor moved there."""
    from lilmistral.cli import main

    missing = torch.cuda.device_count()
    cases = {"tpu": "unknown device 'tpu' (cpu, cuda or cuda:N)",
             "mps": "device 'mps' is not supported (cpu, cuda or cuda:N)",
             f"cuda:{missing}": f"device 'cuda:{missing}': no such CUDA GPU here"}
    for device, message in cases.items():
        assert main(["bench", str(full), "--device", device]) == 1
        assert capsys.readouterr().err.startswith(f"Error: {message}")


def test_a_model_that_does_not_fit_in_memory_fails_before_loading(full, monkeypatch, capsys):
    """As Ollama: the weights and the KV cache at num_ctx against the memory available (here 1 MB), one line,
    before anything is read (not the OOM killer halfway through the load or a long conversation)."""
    from lilmistral import loader
    from lilmistral.cli import main

    monkeypatch.setenv("LILMISTRAL_MEMORY_LIMIT_MB", "1")
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("loaded"))
    assert main(["run", str(full), "Hi", "--num-ctx", "256"]) == 1
    weights, args = sum(loader.tensor_bytes(full).values()), loader.model_args(full)
    cache = 2 * args.n_layers * args.n_kv_heads * 256 * args.head_dim * 2  # bfloat16 keys and values
    assert capsys.readouterr().err == (
        f"Error: the model does not fit in memory: it needs {(weights + cache) / 1e9:.2f} GB ({weights / 1e9:.2f} GB "
        f"of weights, {cache / 1e9:.2f} GB of KV cache: a smaller --num-ctx needs less); 0.00 GB available\n")


def test_a_gpu_needs_room_for_the_weights_and_the_whole_cache(full, monkeypatch):
    """A GPU allocates the KV cache whole after the weights and works in GPU_WORKING_BYTES more (prefill's
    dequantized slice of a weight, a chunk's activations): the check counts all three (a simulated GPU with
    a byte less free fails before loading; one with that room passes the check)."""
    from lilmistral import loader
    from lilmistral.cache import cache_bytes

    weights = sum(loader.tensor_bytes(full).values())
    args = loader.model_args(full)
    cache = cache_bytes(args, args.n_layers, 64, torch.bfloat16)
    assert cache == 2 * args.n_layers * args.n_kv_heads * 64 * args.head_dim * 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("loaded"))
    needs = weights + cache + loader.GPU_WORKING_BYTES
    for free, fits in ((needs - 1, False), (needs, True)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index, free=free: (free, 2 * free))
        if fits:
            with pytest.raises(pytest.fail.Exception, match="loaded"):  # past the check, into the load
                lilmistral.load(full, device="cuda", num_ctx=64)
        else:
            with pytest.raises(lilmistral.LilmistralError, match=f"does not fit the GPU: it needs {needs / 1e9:.2f} "
                                                                 r"GB \(.* GB of weights, .* GB of KV cache, 0\.27 GB "
                                                                 "to work in"):
                lilmistral.load(full, device="cuda", num_ctx=64)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # pipeline stages, each on a GPU of its own
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (1, 2))
    with pytest.raises(lilmistral.LilmistralError, match="does not fit the GPUs: stage 0 needs .* stage 1 needs"):
        lilmistral.load(full, device="cuda", num_ctx=64, pp=2)


def test_a_model_on_a_gpu_makes_that_gpu_current_first(full, monkeypatch):
    """Triton launches its kernels, CUDA graphs capture and NCCL communicates on the process's current CUDA
    device, not their tensors': loading on cuda:1, and a pipeline stage's set-up on its GPU, make that device
    current before anything else; cpu and a bare cuda leave the current device as it is. GPU stages send their
    CPU headers by gloo and their activations by NCCL (which sends no CPU tensor)."""
    from lilmistral import loader, parallel

    made_current = []

    class Made(Exception):
        pass

    def set_device(device):
        made_current.append(torch.device(device))
        raise Made

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(parallel.dist, "init_process_group", lambda *a, **k: pytest.fail("NCCL before the device"))
    with pytest.raises(Made):
        loader.load_model(full, device="cuda:1")
    with pytest.raises(Made):
        parallel._init(2, 3, "cuda", "env://")  # stage 2 of 3: GPU 2
    loader.use_device("cpu")
    loader.use_device("cuda")
    assert made_current == [torch.device("cuda:1"), torch.device("cuda:2")]
    backends = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(parallel.dist, "init_process_group", lambda backend, **k: backends.append(backend))
    parallel._init(1, 2, "cuda", "env://")
    parallel._init(1, 2, "cpu", "env://")
    assert backends == ["cpu:gloo,cuda:nccl", "gloo"]


def test_cli_run_of_a_model_without_a_chat_format_fails_before_reading_the_weights(full, monkeypatch, capsys):
    """A model the chat cannot use fails as soon as its tokenizer is read, before its weights (a 7B's: seconds)."""
    from lilmistral import loader
    from lilmistral.cli import main

    real = loader.load_model_tokenizer

    def no_chat_format(messages):
        raise lilmistral.LilmistralError("this model has no chat template")

    def without_chat_format(path):
        tokenizer = real(path)
        tokenizer.encode_chat = no_chat_format
        return tokenizer

    monkeypatch.setattr(loader, "load_model_tokenizer", without_chat_format)
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("read the weights"))
    assert main(["run", str(full), "Hi"]) == 1
    assert capsys.readouterr().err == "Error: this model has no chat template\n"


def test_bench_reports_every_key(full, monkeypatch):
    monkeypatch.setenv("LILMISTRAL_HUGE_PAGES", "0")  # its int8 head (2 MB) in 4 KB pages, whatever they cost
    r = run_cli("bench", str(full), "--prompt-tokens", "32", "--gen-tokens", "8", "--quant", "int4", "--json",
                "--threads", "1")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("prefill_tps", "decode_tps", "ttft_s", "load_s", "peak_rss_mb", "weight_bytes_per_token",
                "achieved_gbps", "bandwidth_fraction"):
        assert result[key] > 0, key
    assert result["gen_tokens"] == 8 and result["decode_step"] == "traced"
    assert result["cpu_kernels"] == (vnni.isa() or "pytorch")
    assert result["huge_page_fraction"] == (0 if vnni.isa() else None)
    assert result["threads"] == 1
    llm = lilmistral.load(full)
    params = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    assert result["weight_bytes_per_token"] < params  # one embedding row, not the table


def test_decode_step_matches_the_prefill_path(windowed):
    """The one-token decode step (static shapes, mask over slots) gives the logits of the chunked
    prefill path, through the rolling buffer's wrap-around."""
    llm = lilmistral.load(windowed, dtype="float32")
    ids = torch.randint(10, 200, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    reference = llm.forward(ids)  # prefill in window-sized chunks
    llm.cache.reset()
    with torch.inference_mode():
        prefill(llm.model, llm.cache, ids[:3])
        stepped = [llm.decode_step(token, llm.cache) for token in ids[3:]]
    torch.testing.assert_close(torch.stack(stepped), reference[3:], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
@pytest.mark.parametrize("quant,kernel_type", [("int4", VnniInt4Kernel), ("int8", VnniInt8Kernel)])
def test_prompt_token_alone_gives_the_prefill_logits(full, quant, kernel_type):
    """The int4 and int8 CPU kernels (fused projections among them) and the layer kernels compute each row
    alike however many come together: a prompt's last token re-entered alone into a reused cache, or run by
    the decode step, gives the bits of the whole prompt's prefill, so asking again at temperature 0 gives the
    same answer."""
    llm = lilmistral.load(full, quant=quant)
    assert llm.model.norm.weight.dtype == torch.bfloat16  # the kernel's own path, not the float32 reference
    kernels = layer_kernels(llm.args.head_dim, torch.bfloat16)
    for layer in llm.model.layers:
        attention, ffn = layer.attention, layer.feed_forward
        assert (attention.attend, attention.rotate) == (kernels["attend"], kernels["rotate"])
        assert (layer.attention_norm.normalize, ffn.activate) == (kernels["normalize"], kernels["activate"])
        assert all(isinstance(m.kernel, kernel_type) for m in (attention.wqkv, attention.wo, ffn.w13, ffn.w2))
    ids = torch.randint(10, 200, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        whole = prefill(llm.model, llm.cache, ids)
        llm.cache.reset()
        prefill(llm.model, llm.cache, ids[:-1])
        alone = prefill(llm.model, llm.cache, ids[-1:])
        llm.cache.rewind(len(ids) - 1)
        stepped = llm.decode_step(ids[-1], llm.cache)
    assert torch.equal(alone, whole)
    assert torch.equal(stepped, whole[-1])


@pytest.mark.parametrize("source,quant", [("windowed", "int4"), ("full", "int8"), ("windowed", "f32")])
def test_traced_decode_gives_the_eager_logits(source, quant, request):
    """The CPU decode step traced into a TorchScript graph gives the eager step's logits bit for bit at every
    position: the slots it writes and the keys it attends to follow its inputs, not the trace's, through the
    rolling buffer's wrap-around and in a resized cache."""
    folder = request.getfixturevalue(source)
    traced, eager = (lilmistral.load(folder, quant=quant, num_ctx=64) for _ in range(2))
    eager.decode_step = DecodeStep(eager.model, trace=False)
    ids = torch.randint(10, 200, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.inference_mode():
        for num_ctx in (64, 48):  # and in a cache of another size
            for llm in (traced, eager):
                llm.resize_context(num_ctx)
                prefill(llm.model, llm.cache, ids[:3])
            for token in ids[3:]:
                assert torch.equal(traced.decode_step(token, traced.cache), eager.decode_step(token, eager.cache))
    assert (traced.decode_step.mode, eager.decode_step.mode) == ("traced", "eager")  # not left eager


def test_warming_up_on_a_gpu_builds_prefills_kernels_too(full, monkeypatch):
    """On a GPU the warm-up prompt has more rows than the decode GEMV takes (triton_kernels.GEMV_MAX_ROWS, 8),
    so that the prefill path's kernels are built before the first answer; on the CPU 3 tokens do."""
    from lilmistral.cache import RollingKVCache

    llm = lilmistral.load(full, quant="int8", num_ctx=64)
    prompts = []
    monkeypatch.setattr(llm, "generate", lambda ids, **sampling: prompts.append(ids) or iter(()))
    llm.warm_up()
    monkeypatch.setattr(RollingKVCache, "device", property(lambda cache: torch.device("cuda")))
    llm.warm_up()
    assert [len(p) for p in prompts] == [3, 16]


def test_a_traced_model_is_freed_with_its_llm(full):
    """The traced graph holds the weights as constants: it must go with the LLM (a graph in PyTorch's global
    compilation unit, as torch.jit.trace makes, kept every traced model in memory for good)."""
    llm = lilmistral.load(full, quant="int8", num_ctx=64)
    llm.warm_up()
    assert llm.decode_step.mode == "traced"
    weights = [weakref.ref(t) for m in llm.model.modules() if hasattr(m, "kernel") and hasattr(m.kernel, "parts")
               for t in m.kernel.parts.values() if isinstance(t, torch.Tensor)]
    assert weights
    del llm
    gc.collect()
    assert all(ref() is None for ref in weights)


def test_moe_loop_over_experts_is_not_traced(tmp_path):
    """Experts run by a loop over the routed experts' ids (float32: the exact reference path), which a trace
    would freeze (silently: the tracer does not warn of tolist()): Experts.forward refuses to be traced, so
    trace_step returns None and the decode step stays eager."""
    make_hf_model(tmp_path, "mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    llm = lilmistral.load(tmp_path, dtype="float32", num_ctx=64)
    ids = list(range(10, 22))
    with torch.inference_mode():
        prefill(llm.model, llm.cache, ids)
        position, mask = llm.cache.begin_step()
        assert trace_step(llm.model, (torch.tensor([5]), position, mask, llm.cache.k, llm.cache.v)) is None
        llm.cache.end()
    list(llm.generate(ids, temperature=0, max_tokens=2))
    assert llm.decode_step.mode == "eager"


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
# int4 with mins: test_moe_decode_batches_the_routed_experts
@pytest.mark.parametrize("quant", ["int4-sym", "int5", "int8"])
def test_moe_with_batched_experts_traces_and_routes_each_token(tmp_path, quant):
    """A MoE whose experts run in one batched kernel call (QuantExperts on the CPU kernels: the routed ids go
    in as a tensor) is traced, and the traced step routes every token afresh: bit for bit the eager step's
    logits over 30 tokens whose routing differs from token to token."""
    make_hf_model(tmp_path, "mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    traced, eager = (lilmistral.load(tmp_path, quant=quant, num_ctx=64) for _ in range(2))
    eager.decode_step = DecodeStep(eager.model, trace=False)
    assert all(m.batched is not None for m in eager.model.modules() if isinstance(m, QuantExperts))
    routes = []
    eager.model.layers[0].feed_forward.gate.register_forward_hook(
        lambda module, inputs, out: routes.append(tuple(out.topk(2, dim=-1).indices[-1].sort().values.tolist())))
    ids = torch.randint(10, 200, (33,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.inference_mode():
        for llm in (traced, eager):
            prefill(llm.model, llm.cache, ids[:3])
        routes.clear()
        for token in ids[3:]:
            assert torch.equal(traced.decode_step(token, traced.cache), eager.decode_step(token, eager.cache))
    assert traced.decode_step.mode == "traced"
    assert len(set(routes)) >= 3  # the trace did not freeze one token's experts


def test_a_trace_the_tracer_warns_of_is_refused(full, monkeypatch):
    """A step whose Python branches on a tensor (here a kernel's row count, as PyTorch's int8 kernel
    chooses by it) makes the tracer warn: trace_step refuses it."""
    llm = lilmistral.load(full, dtype="float32", num_ctx=64)
    wo = llm.model.layers[0].attention.wo
    monkeypatch.setattr(wo, "forward", lambda x, residual, norm:
                        add_norm(F.linear(x, wo.weight) * (2 if x.shape[0] > 16 else 1), residual, norm))
    with torch.inference_mode():
        prefill(llm.model, llm.cache, list(range(10, 22)))
        position, mask = llm.cache.begin_step()
        assert trace_step(llm.model, (torch.tensor([5]), position, mask, llm.cache.k, llm.cache.v)) is None
        llm.cache.end()


@pytest.mark.parametrize("source", ["windowed", "full"])
def test_decoding_ahead_gives_the_same_tokens_and_cache(source, request):
    """Decoding with each step and the next draw queued before the host reads the token they follow (a GPU's
    default: the draw stays on the device) gives the tokens of decoding a step at a time, greedy and sampled
    (the same seed), and leaves the cache as it does: up to max_tokens; at a full context; stopping at an
    end-of-sequence token, whose step it ran ahead is taken back (also in an 8-slot rolling buffer that has
    wrapped many times). The conversation then goes on alike: the next step's logits are the same."""
    folder = request.getfixturevalue(source)
    llms = [lilmistral.load(folder, dtype="float32", num_ctx=48) for _ in range(2)]
    prompt = list(range(10, 30))
    with torch.inference_mode():
        for params in (SamplingParams(temperature=0, repeat_penalty=1.0), SamplingParams(seed=5)):
            params.max_tokens = 24
            llms[0].cache.reset()
            free = list(generate_tokens(llms[0].model, llms[0].cache, prompt, params, (), llms[0].decode_step))
            assert len(free) == 24
            for eos, max_tokens in (((), 24), ((free[12],), 24), ((), 40)):  # 40: the full model's 48 slots fill
                params.max_tokens = max_tokens
                runs = []
                for llm, ahead in zip(llms, (False, True)):
                    llm.cache.reset()
                    tokens = list(generate_tokens(llm.model, llm.cache, prompt, params, eos, llm.decode_step, ahead))
                    logits = llm.decode_step(7, llm.cache) if llm.cache.fits() else None  # the conversation goes on
                    runs.append((tokens, llm.cache.length, logits))
                (tokens, length, logits), (tokens_ahead, length_ahead, logits_ahead) = runs
                assert tokens == tokens_ahead and length == length_ahead
                assert len(tokens) <= 12 if eos else len(tokens) == min(max_tokens, length - 19)
                assert (logits is None and logits_ahead is None) or torch.equal(logits, logits_ahead)
            assert len(tokens) == (40 if source == "windowed" else 48 - 20 + 1)  # the last round's
            assert (logits is None) == (source == "full")


@pytest.mark.parametrize("source", ["windowed", "full"])
def test_compiled_decode_gives_the_eager_tokens(source, request):
    folder = request.getfixturevalue(source)
    eager = lilmistral.load(folder, dtype="float32", num_ctx=64)
    compiled = lilmistral.load(folder, dtype="float32", num_ctx=64, compile=True)
    ids = list(range(10, 22))
    expected = list(eager.generate(ids, temperature=0, max_tokens=24))
    assert list(compiled.generate(ids, temperature=0, max_tokens=24)) == expected
    assert compiled.decode_step.mode == "compiled"
    with torch.inference_mode():  # and the logits, step by step
        for llm in (eager, compiled):
            llm.cache.reset()
            prefill(llm.model, llm.cache, ids)
        for token in expected[:12]:
            torch.testing.assert_close(compiled.decode_step(token, compiled.cache),
                                       eager.decode_step(token, eager.cache), atol=1e-4, rtol=1e-4)


def test_two_compiled_models_in_one_process(full):
    """Each model compiles its own decode step (the graphs skip guards on modules, so a shared one would
    run a float model's graph on a quantized model)."""
    ids = list(range(10, 22))
    for quant in ("f32", "int8"):
        eager = lilmistral.load(full, quant=quant, dtype="float32", num_ctx=64)
        compiled = lilmistral.load(full, quant=quant, dtype="float32", num_ctx=64, compile=True)
        assert list(compiled.generate(ids, temperature=0, max_tokens=8)) == list(eager.generate(ids, temperature=0,
                                                                                              max_tokens=8))


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_moe_decode_batches_the_routed_experts(tmp_path, quant):
    """A quantized MoE model decodes through one expert-batched kernel call per projection (its decode step
    traced), with the tokens and logits of the expert-by-expert loop (eager). The batched layer compiles into
    one graph (no host sync), and the compiled model runs it."""
    reference = make_hf_model(tmp_path, "mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    with torch.no_grad():  # a decisive router: bfloat16 rounding (eager vs compiled) must not flip experts
        for layer in reference.model.layers:
            layer.mlp.gate.weight.mul_(25)
    reference.save_pretrained(tmp_path)
    ids = list(range(10, 22))

    def decode_logits(llm, tokens: list[int]) -> torch.Tensor:
        llm.cache.reset()
        with torch.inference_mode():
            prefill(llm.model, llm.cache, ids)  # 12 tokens x 2 experts: more rows than the batched kernel takes
            return torch.stack([llm.decode_step(token, llm.cache) for token in tokens])

    llm = lilmistral.load(tmp_path, quant=quant, num_ctx=64)
    experts = [m for m in llm.model.modules() if isinstance(m, QuantExperts)]
    assert len(experts) == 2 and all(m.batched for m in experts)
    tokens = list(llm.generate(ids, temperature=0, max_tokens=16))
    batched = decode_logits(llm, tokens)

    moe = llm.model.layers[0].feed_forward
    x = torch.randn(1, moe.gate.in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.inference_mode():
        torch.testing.assert_close(torch.compile(moe, fullgraph=True)(x), moe(x), atol=0.02, rtol=0.02)
    compiled = lilmistral.load(tmp_path, quant=quant, num_ctx=64, compile=True)
    difference = (decode_logits(compiled, tokens).float() - batched.float()).norm(dim=-1) / batched.float().norm(dim=-1)
    # inductor rounds bfloat16 elsewhere than eager does (~2% here), and once the caches differ a rare near-tie
    # in a router picks another expert for one step (up to ~50% of that step's logits)
    assert difference[0] < 0.05 and difference.median() < 0.05, difference

    assert llm.decode_step.mode == "traced"
    for m in experts:
        m.batched = None
    llm.decode_step = DecodeStep(llm.model)  # a new trace would refuse the loop; the first one kept the kernels
    llm.cache.reset()  # (a cached prompt would be re-entered by its last token alone: other kernels, other rounding)
    assert list(llm.generate(ids, temperature=0, max_tokens=16)) == tokens
    torch.testing.assert_close(decode_logits(llm, tokens), batched, atol=1e-3, rtol=1e-3)
