"""Pipeline parallelism on the CPU (gloo): same logits and tokens as one process, faults, memory per stage."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import psutil
import pytest

import lilmistral
from conftest import make_hf_model
from lilmistral.bench import bench, held_weights, weight_bytes_per_token
from lilmistral.parallel import split_layers, stage_keep

MODELS = {
    "mixtral": dict(arch="mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "mistral-window": dict(arch="mistral", sliding_window=8),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, cfg in MODELS.items():
        cfg = dict(cfg)
        folder = tmp_path_factory.mktemp(name)
        make_hf_model(folder, cfg.pop("arch"), num_hidden_layers=4, **cfg)
        out[name] = folder
    return out


def test_split_layers_balances_bytes():
    assert split_layers([10] * 4, 0, 0, 2) == [(0, 2), (2, 4)]
    assert split_layers([10] * 6, 0, 0, 3) == [(0, 2), (2, 4), (4, 6)]
    # a big embedding on the first stage and a big head on the last pull layers to the middle
    assert split_layers([10] * 6, 25, 25, 3) == [(0, 1), (1, 5), (5, 6)]
    with pytest.raises(lilmistral.LilmistralError):
        split_layers([10] * 2, 0, 0, 3)
    keep = stage_keep((2, 4), first=False, last=True, tied=False)
    assert keep("layers.3.attention.wq.weight") and not keep("layers.1.ffn_norm.weight")
    assert keep("output.weight") and keep("norm.weight") and not keep("tok_embeddings.weight")


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("pp", [2, 3])
def test_same_logits_and_tokens_as_one_process(folders, model, pp):
    ids = list(range(100, 140))  # 40 tokens: the window-8 model's rolling buffer wraps several times
    single = lilmistral.load(folders[model])
    expected_logits = single.forward(ids)
    expected_tokens = list(single.generate(ids[:12], temperature=0, repeat_penalty=1.0, max_tokens=20))
    piped = lilmistral.load(folders[model], pp=pp)
    try:
        assert len(piped.info["stages"]) == pp
        assert (piped.forward(ids) - expected_logits).abs().max().item() <= 1e-4
        assert list(piped.generate(ids[:12], temperature=0, repeat_penalty=1.0, max_tokens=20)) == expected_tokens
        # a second turn reuses the cache on every stage
        messages = [{"role": "user", "content": "Hello"}]
        first = "".join(piped.chat(messages, temperature=0, max_tokens=6))
        assert first == "".join(single.chat(messages, temperature=0, max_tokens=6))
    finally:
        piped.close()


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("pp", [2, 3])
def test_cli_run_with_pp(folders, model, pp):
    folder = str(folders[model])
    base = [sys.executable, "-m", "lilmistral", "run", folder, "Hello", "--temperature", "0", "--max-tokens", "12"]
    one = subprocess.run(base, capture_output=True, text=True, timeout=120)
    many = subprocess.run([*base, "--pp", str(pp), "--verbose"], capture_output=True, text=True, timeout=120)
    assert one.returncode == 0 and many.returncode == 0, many.stderr
    assert many.stdout == one.stdout
    assert many.stderr.count("layers ") == pp  # --verbose reports the stage split


def test_killed_worker_ends_every_stage(folders):
    proc = subprocess.Popen([sys.executable, "-m", "lilmistral", "run", str(folders["mistral-window"]),
                             "Tell me a story", "--pp", "3", "--max-tokens", "1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    deadline = time.time() + 60
    workers = []
    while time.time() < deadline and len(workers) < 2:
        workers = [c for c in parent.children() if "lilmistral.parallel" in command_line(c)]
        time.sleep(0.1)
    assert len(workers) == 2
    os.set_blocking(proc.stdout.fileno(), False)
    while time.time() < deadline and not (proc.stdout.read(64) or ""):  # generation under way
        time.sleep(0.1)
    workers[0].send_signal(signal.SIGKILL)
    start = time.time()
    proc.wait(timeout=20)
    assert time.time() - start < 10
    err = proc.stderr.read()
    assert proc.returncode != 0 and "stage 1 exited" in err and "Traceback" not in err
    time.sleep(1)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def command_line(process: psutil.Process) -> str:
    """A child's command line; empty for one that exited meanwhile (a short-lived helper process)."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def test_each_stage_holds_about_its_share(tmp_path):
    """float32 weights are memory-mapped, so a stage's resident memory is what it touched: its own layers. Memory
    is counted from after PyTorch's import (a CUDA build's libraries hold ~0.3 GB more than the CPU build's)."""
    folder = tmp_path / "wide"
    make_hf_model(folder, "mistral", sliding_window=None, hidden_size=512, intermediate_size=4096,
                  num_hidden_layers=8, vocab_size=32768)
    script = textwrap.dedent(f"""
        import json, os, re, sys, lilmistral, torch
        def rss(pid):
            return int(re.search(r"VmRSS:\\s+(\\d+)", open(f"/proc/{{pid}}/status").read()).group(1)) / 1024
        pp = int(sys.argv[1])
        base = rss(os.getpid())
        llm = lilmistral.load({str(folder)!r}, pp=pp)
        llm.forward(list(range(100, 164)))
        pids = [os.getpid()] + (llm.model.worker_pids if pp > 1 else [])
        print(json.dumps({{"base": base, "rss": [rss(p) for p in pids]}}))
        llm.close()
    """)

    def measure(pp: int) -> dict:
        r = subprocess.run([sys.executable, "-c", script, str(pp)], capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    one, two = measure(1), measure(2)
    weights_mb = one["rss"][0] - one["base"]
    per_stage = [two["rss"][0] - two["base"], two["rss"][1] - one["base"]]
    print(f"weights {weights_mb:.0f} MB in one process; stages hold {per_stage[0]:.0f} and {per_stage[1]:.0f} MB")
    assert weights_mb > 150
    for held in per_stage:
        assert 0.25 * weights_mb < held < 0.75 * weights_mb


def test_stages_that_do_not_fit_fail_before_loading(folders):
    r = subprocess.run([sys.executable, "-m", "lilmistral", "run", str(folders["mixtral"]), "Hi", "--pp", "2"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "LILMISTRAL_MEMORY_LIMIT_MB": "1"})
    assert r.returncode == 1 and "stage 0 needs" in r.stderr and "stage 1 needs" in r.stderr
    assert "Traceback" not in r.stderr


def test_bench_of_a_pipeline_counts_every_stage(folders):
    """`bench --pp N` reads every stage's weights a token (their stored sizes), as one process does; of a
    mixture of experts only the routed experts' (here 2 of 4)."""
    single = lilmistral.load(folders["mixtral"])
    piped = lilmistral.load(folders["mixtral"], pp=2)
    try:
        one, two = (bench(llm, prompt_tokens=8, gen_tokens=4, bandwidth=1.0) for llm in (single, piped))
    finally:
        piped.close()
    assert two.decode_step == "pipeline"
    assert abs(two.weight_bytes_per_token - one.weight_bytes_per_token) <= 0.02 * one.weight_bytes_per_token
    every_expert = weight_bytes_per_token(replace(single.args, n_experts_per_tok=4), held_weights(single.model))
    experts = sum(t.nbytes for name, t in single.model.named_parameters() if ".experts." in name)
    assert every_expert - one.weight_bytes_per_token == experts // 2
