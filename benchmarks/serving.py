"""What serving costs at decode, on the SmolLM2 GGUF (int4; 200 greedy tokens of a story, JSON mode 100 of a JSON
answer), rounds alternating in one run, medians printed:

- `chat()` on the thread that loaded the model, and on a thread started for it (an idle pool of PyTorch's CPU
  threads slows another thread's operators ~2x: lilmistral.threads lets each go);
- `lilmistral serve` (a process of its own, Ollama's /api/chat): decode tokens/s as it reports them;
- JSON mode (`format="json"`) and a JSON schema against free text.

    python -m benchmarks.serving [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request

import lilmistral
from benchmarks.compare_llamacpp import smollm2

STORY = [{"role": "user", "content": "Write a short story about a cat."}]
COUNTRIES = [{"role": "user", "content": "Describe three countries as a JSON object, with their capitals, "
                                         "populations and languages."}]
COUNTRY = {"type": "object", "properties": {"name": {"type": "string"}, "capital": {"type": "string"},
                                            "population": {"type": "integer"},
                                            "languages": {"type": "array", "items": {"type": "string"}}},
           "required": ["name", "capital", "population", "languages"]}
SCHEMA = {"type": "object", "properties": {"countries": {"type": "array", "items": COUNTRY}}, "required": ["countries"]}


def decode_rate(llm, messages, **options) -> float:
    "".join(llm.chat(messages, temperature=0, **options))
    return llm.stats.eval_tokens / llm.stats.eval_s


def on_a_thread(llm) -> float:
    rates = []
    thread = threading.Thread(target=lambda: rates.append(decode_rate(llm, STORY, max_tokens=200)))
    thread.start()
    thread.join()
    return rates[0]


def served(port: str, model: str) -> float:
    body = json.dumps({"model": model, "messages": STORY, "options": {"temperature": 0, "num_predict": 200}})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/chat", data=body.encode())
    with urllib.request.urlopen(request, timeout=300) as response:
        last = json.loads(response.read().decode().splitlines()[-1])
    return last["eval_count"] / last["eval_duration"] * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    model = str(smollm2())
    llm = lilmistral.load(model, quant="int4")
    llm.warm_up()
    with tempfile.TemporaryDirectory() as home:
        server = subprocess.Popen([sys.executable, "-m", "lilmistral", "serve", model, "--quant", "int4", "--port",
                                   "0"], stderr=subprocess.PIPE, text=True, env=os.environ | {"LILMISTRAL_HOME": home})
        try:
            port = re.search(r"127\.0\.0\.1:(\d+)", next(l for l in server.stderr if "listening" in l)).group(1)
            runs = {"chat, loading thread": [], "chat, another thread": [], "serve /api/chat": [],
                    "JSON mode off": [], "JSON mode on": [], "JSON schema": []}
            for _ in range(rounds):
                runs["chat, loading thread"].append(decode_rate(llm, STORY, max_tokens=200))
                runs["chat, another thread"].append(on_a_thread(llm))
                runs["serve /api/chat"].append(served(port, model))
                runs["JSON mode off"].append(decode_rate(llm, COUNTRIES, max_tokens=100))
                runs["JSON mode on"].append(decode_rate(llm, COUNTRIES, max_tokens=100, format="json"))
                runs["JSON schema"].append(decode_rate(llm, COUNTRIES, max_tokens=100, format=SCHEMA))
        finally:
            server.terminate()
            server.wait()
    for name, rates in runs.items():
        print(f"{name:24s} {statistics.median(rates):6.1f} tok/s (rounds: {', '.join(f'{r:.1f}' for r in rates)})")


if __name__ == "__main__":
    main()
