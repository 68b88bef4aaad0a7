"""Pipeline parallelism: `--pp N` splits the layers into N contiguous stages, one process each.

Placement is pure (`split_layers`, `stage_keep`): stages are balanced by the bytes of their weights, the
embeddings on the first stage, the final norm and head on the last. Each process loads only its own
tensors (from memory-mapped files) and keeps the KV cache of its own layers.

Rank 0 owns the tokenizer, sampling and the REPL, and runs the first stage. For every forward it sends a
header [command, tokens, start position, last_only] to each worker, its hidden states to rank 1, and
receives float32 logits from the last rank. Transport is torch.distributed point-to-point: gloo on the
CPU, nccl with one GPU per stage (`--device cuda`: stage i on GPU i).

Launch: `lilmistral run NAME --pp N` starts N-1 worker processes itself (`python -m lilmistral.parallel`).
Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set) every rank runs the same command and
ranks > 0 become workers. A worker that dies, or a rank 0 that goes away, ends every stage: rank 0's
watchdog kills the rest and reports it; workers exit when rank 0's connection closes or their parent is gone.
"""
from __future__ import annotations

import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import LilmistralError, show_warning
from .llm import LLM
from .model import Transformer
from .tokenizer import Tokenizer

FORWARD, RESIZE, SHUTDOWN = 1, 2, 3
LAYER = re.compile(r"^layers\.(\d+)\.")
ENV_ARGS = "LILMISTRAL_PP_ARGS"


def split_layers(layer_bytes: list[int], first_extra: int, last_extra: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer ranges, one per stage, minimising the largest stage's bytes
    (the first stage also holds `first_extra` bytes, the last `last_extra`)."""
    n = len(layer_bytes)
    if stages < 1 or stages > n:
        raise LilmistralError(f"--pp {stages}: the model has {n} layers, so 1 to {n} stages")
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)

    def load(s: int, a: int, b: int) -> int:
        return prefix[b] - prefix[a] + (first_extra if s == 0 else 0) + (last_extra if s == stages - 1 else 0)

    # best[s][i]: the smallest possible largest stage when stages 0..s hold layers 0..i-1
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for i in range(1, n + 1):
        best[0][i] = load(0, 0, i)
    for s in range(1, stages):
        for i in range(s + 1, n + 1):
            for j in range(s, i):
                cost = max(best[s - 1][j], load(s, j, i))
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    ranges, end = [], n
    for s in range(stages - 1, 0, -1):
        start = cut[s][end]
        ranges.append((start, end))
        end = start
    ranges.append((0, end))
    return ranges[::-1]


def stage_keep(layers: tuple[int, int], first: bool, last: bool, tied: bool) -> Callable[[str], bool]:
    """Which tensor names a stage loads."""

    def keep(name: str) -> bool:
        if m := LAYER.match(name):
            return layers[0] <= int(m.group(1)) < layers[1]
        if name.startswith("tok_embeddings."):
            return first or (last and tied)
        return last  # norm, output

    return keep


def plan_stages(sizes: dict[str, int], n_layers: int, stages: int) -> list[tuple[int, int]]:
    layer_bytes = [0] * n_layers
    first = last = 0
    for name, nbytes in sizes.items():
        if m := LAYER.match(name):
            layer_bytes[int(m.group(1))] += nbytes
        elif name.startswith("tok_embeddings."):
            first += nbytes
        else:
            last += nbytes
    return split_layers(layer_bytes, first, last, stages)


def stage_bytes(sizes: dict[str, int], ranges: list[tuple[int, int]], tied: bool) -> list[int]:
    return [sum(n for name, n in sizes.items() if stage_keep(r, s == 0, s == len(ranges) - 1, tied)(name))
            for s, r in enumerate(ranges)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, device: str, init_method: str) -> None:
    from .loader import use_device

    use_device(_stage_device(device, rank))  # NCCL's communicator on the stage's own GPU
    # the headers are CPU tensors, which NCCL cannot send: gloo takes them, NCCL the activations
    backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, init_method=init_method,
                            timeout=timedelta(seconds=120))


def _stage_device(device: str, rank: int) -> str:
    return f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if device.startswith("cuda") else device


@contextmanager
def deferred_interrupt():
    """Ctrl-C waits until the stages have finished the step in flight (an exchange cut in half would
    leave the pipeline out of step), then raises as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit: list[bool] = []
    previous = signal.signal(signal.SIGINT, lambda *a: hit.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if hit:
            raise KeyboardInterrupt


class PipelineModel:
    """Rank 0's view of the pipeline; called like `Transformer` by generation code."""

    def __init__(self, model: Transformer, ranges: list[tuple[int, int]], device: str,
                 workers: list[subprocess.Popen] | None) -> None:
        self.model, self.ranges, self.workers = model, ranges, workers or []
        self.args = model.args
        self.tok_embeddings = model.tok_embeddings
        self.cache_layers = ranges[0][1] - ranges[0][0]
        self.world = len(ranges)
        self.device = device
        self.closed = False
        if self.workers:
            threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        """A worker that exits on its own ends the whole pipeline, quickly and loudly."""
        while not self.closed:
            for rank, proc in enumerate(self.workers, start=1):
                if proc.poll() is not None and not self.closed:
                    time.sleep(3)  # a forward in flight reports it itself, with the exit code
                    if self.closed:
                        return
                    print(f"Error: pipeline stage {rank} exited (code {proc.returncode}); stopping all stages",
                          file=sys.stderr, flush=True)
                    self._kill()
                    os._exit(1)
            time.sleep(0.2)

    def _dead_worker(self, wait_s: float = 2.0) -> str | None:
        """Which worker died (a broken connection is usually seen just before the exit)."""
        deadline = time.time() + wait_s
        while time.time() < deadline:
            for rank, proc in enumerate(self.workers, start=1):
                if proc.poll() is not None:
                    return f"pipeline stage {rank} exited (code {proc.returncode})"
            time.sleep(0.05)
        return None

    def _kill(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.kill()
        for proc in self.workers:
            proc.wait()

    def _broadcast_header(self, *values: int, past_dead: bool = False) -> None:
        header = torch.tensor(values, dtype=torch.long)
        for rank in range(1, self.world):
            try:
                dist.send(header, rank)
            except RuntimeError:  # gloo/nccl: that stage went away
                if not past_dead:
                    raise

    def __call__(self, tokens: torch.Tensor, cache, last_only: bool = False) -> torch.Tensor:
        with deferred_interrupt():
            try:
                t = tokens.shape[0]
                self._broadcast_header(FORWARD, t, cache.length, int(last_only))
                start, end = self.ranges[0]
                h = self.model.run_layers(self.model.tok_embeddings(tokens), cache, start, end)
                dist.send(h.contiguous(), 1)
                logits = torch.empty((1 if last_only else t, self.args.vocab_size), dtype=torch.float32,
                                     device=h.device)
                dist.recv(logits, self.world - 1)
                return logits
            except RuntimeError as e:  # gloo/nccl: a peer went away
                raise LilmistralError(f"the pipeline broke: {self._dead_worker() or str(e).splitlines()[0]}") from None

    def resize_context(self, num_ctx: int) -> None:
        self._broadcast_header(RESIZE, num_ctx, 0, 0)

    def close(self) -> None:
        if self.closed:
            return
        # past a stage already gone: the stages after it would wait for this header until killed
        self._broadcast_header(SHUTDOWN, 0, 0, 0, past_dead=True)
        self.closed = True
        deadline = time.time() + 10
        for proc in self.workers:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
        if dist.is_initialized():
            dist.destroy_process_group()

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.workers]


def _stage_plan(path: Path, pp: int, quant: str | None, group_size: int):
    from .loader import tensor_bytes
    from .quant import DEFAULT_GROUP_SIZE

    sizes = tensor_bytes(path, quant, group_size or DEFAULT_GROUP_SIZE)
    n_layers = 1 + max(int(m.group(1)) for name in sizes if (m := LAYER.match(name)))
    ranges = plan_stages(sizes, n_layers, pp)
    return sizes, ranges


def stage_spec(path: Path, ranges: list[tuple[int, int]], *, quant: str | None, device: str, num_ctx: int | None,
               dtype: Any, group_size: int) -> dict:
    """Everything a worker needs to load its stage (JSON-able)."""
    return {"path": str(path), "quant": quant, "device": device, "num_ctx": num_ctx,
            "dtype": dtype if isinstance(dtype, str) or dtype is None else str(dtype).removeprefix("torch."),
            "group_size": group_size, "ranges": ranges}


def serve_torchrun_worker(path: Path, pp: int, **load_options: Any) -> None:
    """A rank > 0 under torchrun: the same command line as rank 0, serving its stage."""
    _, ranges = _stage_plan(path, pp, load_options["quant"], load_options["group_size"])
    serve(int(os.environ["RANK"]), pp, stage_spec(path, ranges, **load_options), "env://")


def load_pipeline(path: Path, pp: int, tokenizer: Tokenizer, *, quant: str | None, device: str,
                  num_ctx: int | None, dtype: Any, group_size: int) -> LLM:
    """Rank 0: plan the stages, start the workers (unless torchrun did), load stage 0, return the LLM."""
    from .loader import check_memory, kv_cache_bytes, load_model, model_args

    sizes, ranges = _stage_plan(path, pp, quant, group_size)
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if torchrun and int(os.environ["WORLD_SIZE"]) != pp:
        raise LilmistralError(f"--pp {pp} but torchrun started {os.environ['WORLD_SIZE']} processes")
    args = model_args(path)
    tied = args.tie_embeddings
    if not torchrun:
        check_memory(stage_bytes(sizes, ranges, tied), [kv_cache_bytes(args, b - a, num_ctx, dtype) for a, b in ranges],
                     device)
    spec = stage_spec(path, ranges, quant=quant, device=device, num_ctx=num_ctx, dtype=dtype, group_size=group_size)
    workers: list[subprocess.Popen] = []
    if torchrun:
        _init(0, pp, device, "env://")
    else:
        port = _free_port()
        init = f"tcp://127.0.0.1:{port}"
        for rank in range(1, pp):
            env = {**os.environ, ENV_ARGS: json.dumps(spec), "RANK": str(rank), "WORLD_SIZE": str(pp),
                   "LILMISTRAL_PP_INIT": init, "LILMISTRAL_PP_PARENT": str(os.getpid())}
            workers.append(subprocess.Popen([sys.executable, "-m", "lilmistral.parallel"], env=env))
        try:
            _init(0, pp, device, init)
        except BaseException:
            for proc in workers:
                proc.kill()
            raise
    try:
        stage_device = _stage_device(device, 0)
        model, info = load_model(path, quant=quant, device=stage_device, dtype=dtype, group_size=group_size,
                                 keep=stage_keep(ranges[0], True, pp == 1, tied))
        pipeline = PipelineModel(model, ranges, stage_device, workers)
        info = {**info, "stages": [f"layers {a}-{b - 1}" for a, b in ranges],
                "stage_bytes": stage_bytes(sizes, ranges, tied), "tensor_bytes": sizes}
        llm = LLM(pipeline, tokenizer, num_ctx=num_ctx, source=str(path), info=info)  # type: ignore[arg-type]
    except BaseException:
        for proc in workers:
            proc.kill()
        raise
    import atexit

    atexit.register(pipeline.close)
    return llm


def serve(rank: int, world: int, spec: dict, init_method: str) -> None:
    """A worker: load this rank's stage, then run forwards until rank 0 says stop (or goes away)."""
    from .cache import RollingKVCache
    from .llm import DEFAULT_NUM_CTX
    from .loader import load_model, model_args

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle
    _init(rank, world, spec["device"], init_method)
    ranges = [tuple(r) for r in spec["ranges"]]
    start, end = ranges[rank]
    last = rank == world - 1
    device = _stage_device(spec["device"], rank)
    tied = model_args(Path(spec["path"])).tie_embeddings
    model, _ = load_model(Path(spec["path"]), quant=spec["quant"], device=device, dtype=spec["dtype"],
                          group_size=spec["group_size"], keep=stage_keep((start, end), False, last, tied))
    args = model.args
    dtype = next(p.dtype for n, p in model.named_parameters() if p.device.type != "meta" and p.is_floating_point())

    def make_cache(num_ctx: int) -> RollingKVCache:
        return RollingKVCache.for_context(args, end - start, min(num_ctx, args.max_seq_len), dtype, device)

    cache = make_cache(spec["num_ctx"] or DEFAULT_NUM_CTX)
    header = torch.empty(4, dtype=torch.long)
    with torch.inference_mode():
        while True:
            dist.recv(header, 0)
            command, t, position, last_only = header.tolist()
            if command == SHUTDOWN:
                break
            if command == RESIZE:
                cache = None
                cache = make_cache(t)
                continue
            if position == 0:
                cache.reset()
            elif position != cache.length and not cache.rewind(position):
                raise RuntimeError(f"stage {rank}: cannot rewind the cache to {position}")
            h = torch.empty((t, args.dim), dtype=dtype, device=device)
            dist.recv(h, rank - 1)
            h = model.run_layers(h, cache, start, end)
            if last:
                dist.send(model.head(h, bool(last_only)).contiguous(), 0)
            else:
                dist.send(h.contiguous(), rank + 1)
    dist.destroy_process_group()


def _watch_parent(parent: int) -> None:
    while True:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            os._exit(1)
        time.sleep(0.5)


def worker_main() -> None:
    warnings.showwarning = show_warning
    spec = json.loads(os.environ[ENV_ARGS])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    threading.Thread(target=_watch_parent, args=(int(os.environ["LILMISTRAL_PP_PARENT"]),), daemon=True).start()
    try:
        serve(rank, world, spec, os.environ["LILMISTRAL_PP_INIT"])
    except RuntimeError:  # rank 0 or a neighbour went away (rank 0 reports it): nothing left to do
        print(f"lilmistral stage {rank}: the pipeline closed", file=sys.stderr)
        os._exit(1)
    gc.freeze()  # rank 0's close() waits for this exit: without the last collection (see cli.run_main)


if __name__ == "__main__":
    worker_main()
