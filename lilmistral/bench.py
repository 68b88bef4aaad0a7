"""`lilmistral bench`: prefill and decode speed, time to first token, memory, and decode against the
machine's own measured memory bandwidth (decode reads every weight once per token)."""
from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import ModelArgs
from .generate import SamplingParams, generate_tokens, prefill
from .llm import LLM
from .quant import vnni


@dataclass
class BenchResult:
    prompt_tokens: int
    gen_tokens: int
    prefill_tps: float
    decode_tps: float
    ttft_s: float
    load_s: float  # lilmistral.load()'s seconds (the decode step's trace or compile not among them)
    peak_rss_mb: float
    weight_bytes_per_token: int
    achieved_gbps: float
    bandwidth_gbps: float
    bandwidth_fraction: float
    device: str
    decode_step: str  # DecodeStep.mode: traced, graphed, compiled, eager or pipeline
    cpu_kernels: str | None  # on the CPU: lilmistral's (vnni.isa(): avx512, avxvnni, avx2) or "pytorch"
    huge_page_fraction: float | None  # on the CPU, one process: the kernels' repacked weights' share in 2 MB pages
    threads: int | None  # on the CPU: the threads each matmul and attention runs on (torch.get_num_threads())

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, gib: float | None = None, repeat: int = 5) -> float:
    """Read bandwidth in GB/s: the best of `repeat` sums over a buffer far larger than the caches (1 GiB; on a
    GPU 4 GiB, timed on its own clock: a 1 GiB read takes an H200 ~0.25 ms, of which the host's launch and
    sync, tens of microseconds, would be several percent)."""
    cuda = device.type == "cuda"
    x = torch.ones(int((gib or (4.0 if cuda else 1.0)) * 2**30) // 4, dtype=torch.float32, device=device)
    best = 0.0
    for _ in range(repeat):
        if cuda:
            stream = torch.cuda.current_stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            x.sum()
            end.record(stream)
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            start = time.perf_counter()
            x.sum()
            seconds = time.perf_counter() - start
        best = max(best, x.nbytes / seconds / 1e9)
    return best


def weight_bytes_per_token(args: ModelArgs, sizes: Iterable[tuple[str, int]]) -> int:
    """Bytes of weights one decoded token reads, from each weight's (name, bytes): all of them, but one row of
    the embedding table (unless there is no head of its own: the head reads the whole table), and of a mixture
    of experts only the routed experts' (n_experts_per_tok of n_experts, all of one size)."""
    sizes = list(sizes)
    own_head = any(name.startswith("output.") for name, _ in sizes)
    routed = args.n_experts_per_tok / args.n_experts if args.is_moe else 1.0
    total = 0.0
    for name, nbytes in sizes:
        if name.startswith("tok_embeddings.") and own_head:
            nbytes /= args.vocab_size
        total += nbytes * routed if ".experts." in name else nbytes
    return round(total)


def repacked_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the kernels' own copies of the weights whose canonical parts the loader let go of."""
    kernels = [(name, m.kernel) for name, m in model.named_modules()
               if getattr(getattr(m, "kernel", None), "repacked", False)]
    return [(f"{name}.kernel.{part}", t) for name, k in kernels for part, t in getattr(k, "parts", {}).items()
            if isinstance(t, torch.Tensor)]


def held_weights(model: torch.nn.Module) -> list[tuple[str, int]]:
    """(name, bytes) of each weight a model holds, once: parameters, buffers, and the kernels' own copies of
    the weights whose canonical parts the loader let go of."""
    sizes, seen = [], set()
    for name, t in [*model.named_parameters(), *model.named_buffers(), *repacked_weights(model)]:
        if name == "inv_freq" or t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        sizes.append((name, t.nbytes))
    return sizes


def huge_page_bytes() -> dict[tuple[int, int], int] | None:
    """Each memory mapping's (start, end) address and its bytes in transparent huge pages (/proc/self/smaps);
    None off Linux."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    huge, span = {}, (0, 0)
    for line in lines:
        first = line.split(" ", 1)[0]
        if not first.endswith(":"):  # a mapping's first line: START-END PERMISSIONS ...
            span = tuple(int(address, 16) for address in first.split("-"))
        elif first == "AnonHugePages:":
            huge[span] = int(line.split()[1]) * 1024
    return huge


def huge_page_fraction(tensors: list[torch.Tensor]) -> float | None:
    """The share of the tensors' bytes in 2 MB pages, counted in the mappings that start at a tensor (vnni.cpp's
    weight_empty maps each CPU weight of 2 MB or more on its own). None without tensors or off Linux."""
    total, mappings = sum(t.nbytes for t in tensors), huge_page_bytes()
    if not total or mappings is None:
        return None
    at_start = {start: nbytes for (start, _), nbytes in mappings.items()}
    return sum(min(at_start.get(t.data_ptr(), 0), t.nbytes) for t in tensors) / total


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        match = re.search(r"VmHWM:\s+(\d+)", f.read())
    return int(match.group(1)) / 1024 if match else 0.0


def bench(llm: LLM, prompt_tokens: int = 128, gen_tokens: int = 64, bandwidth: float | None = None) -> BenchResult:
    device = llm.cache.device
    vocab = llm.args.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab // 2), vocab, (prompt_tokens,), generator=g).tolist()
    params = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=gen_tokens)
    with torch.inference_mode():
        llm.warm_up()
        _sync(device)
        start = time.perf_counter()
        prefill(llm.model, llm.cache, ids)
        _sync(device)
        prefill_s = time.perf_counter() - start
        llm.cache.reset()
        start = time.perf_counter()
        stream = generate_tokens(llm.model, llm.cache, ids, params, (), llm.decode_step)
        next(stream)
        _sync(device)
        first = time.perf_counter()
        produced = 1 + sum(1 for _ in stream)
        _sync(device)
        end = time.perf_counter()
    llm._cached_ids = []  # the cache no longer holds a conversation
    rss = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    decode_s = (end - first) / max(produced - 1, 1)
    stored = llm.info.get("tensor_bytes")  # a pipeline's: its other stages hold their weights in other processes
    nbytes = weight_bytes_per_token(llm.args, stored.items() if stored else held_weights(llm.model))
    bw = bandwidth or measure_bandwidth(device)
    achieved = nbytes / decode_s / 1e9
    return BenchResult(prompt_tokens, produced, prompt_tokens / prefill_s, 1 / decode_s, first - start, llm.load_s,
                       rss, nbytes, achieved, bw, achieved / bw, str(device), llm.decode_step.mode,
                       (vnni.isa() or "pytorch") if device.type == "cpu" else None,
                       huge_page_fraction([t for _, t in repacked_weights(llm.model)])
                       if device.type == "cpu" and not stored else None,
                       torch.get_num_threads() if device.type == "cpu" else None)
