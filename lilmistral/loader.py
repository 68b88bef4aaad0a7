"""`lilmistral.load()`: from a source (converted folder, Hugging Face folder, .gguf file) to a ready `LLM`."""
from __future__ import annotations

import bisect
import ctypes
import functools
import json
import math
import mmap
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from .cache import cache_bytes
from .config import ModelArgs
from .convert import (FORMAT_VERSION, MANIFEST, WEIGHTS, check_counts, default_scheme, is_converted, open_source, plan,
                      produce)
from .convert.gguf import GGUFSource, gguf_tokenizer
from .errors import LilmistralError, ModelFormatError
from .generate import recommended_sampling
from .llm import DEFAULT_NUM_CTX, LLM
from .model import Transformer
from .quant import (DEFAULT_GROUP_SIZE, QuantExperts, QuantLinear, QuantSpec, fuse_projections, quantize,
                    swap_in_quant_linears)
from .quant import cpu, cuda
from .quant.pack import packed_shapes
from .threads import release_threads
from .tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCHEME_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# a GPU's room to work in besides the weights and the cache: prefill's dequantized slice of a weight (128 MB,
# triton_kernels.DEQUANTIZED_BYTES) and a prompt chunk's activations (~60 MB at Mistral 7B's width)
GPU_WORKING_BYTES = 256 << 20


Keep = Callable[[str], bool]


def build_model(args: ModelArgs, tensors: Iterable[tuple[str, torch.Tensor]], specs: dict[str, QuantSpec],
                device: str, dtype: torch.dtype, keep: Keep | None = None) -> Transformer:
    """Assign tensors to a model made on the meta device (no copy when memory-mapped and of the right
    dtype); QuantLinears take the packed parts named in `specs` and repack them for the device once, a layer
    as soon as its tensors have come (sources give them layer by layer): the canonical parts a source makes
    in memory (a GGUF's) are then one layer's at a time, and the next layer's take the memory they leave:
    fresh memory from the OS cost a 32-layer GGUF's load ~1 s of 5-6 (docs/performance.md, "Loading"). With
    `keep`, only the tensors it accepts are loaded (a pipeline stage); the rest stay on meta."""
    with torch.device("meta"):  # no memory until the tensors come (and were checked against the config)
        model = Transformer(args)
        swap_in_quant_linears(model, specs)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if keep is None or keep(name)}
    if args.tie_embeddings:
        expected.pop("output.weight", None)
    layer_of = {name: int(name.split(".")[1]) for name in expected if name.startswith("layers.")}
    waiting = Counter(layer_of.values())  # per layer, its tensors still to come
    kind = torch.device(device).type
    state, arrived = {}, set()
    for name, tensor in tensors:
        if keep is not None and not keep(name):
            continue
        if name not in expected:
            if args.tie_embeddings and name == "output.weight":
                continue
            raise ModelFormatError(f"unexpected tensor {name!r} for this architecture")
        if tuple(tensor.shape) != expected[name]:
            raise ModelFormatError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {expected[name]}")
        is_float_weight = name.endswith(".weight") and tensor.is_floating_point()
        state[name] = tensor.to(device=device, dtype=dtype if is_float_weight else tensor.dtype)
        arrived.add(name)
        if (layer := layer_of.get(name)) is not None:
            waiting[layer] -= 1
            if not waiting[layer]:
                prefix = f"layers.{layer}."
                own = {n.removeprefix(prefix): state.pop(n) for n in list(state) if n.startswith(prefix)}
                model.layers[layer].load_state_dict(own, strict=False, assign=True)
                repack(model.layers[layer], kind, dtype, fuse=True)
    missing = set(expected) - arrived
    if missing:
        raise ModelFormatError(f"missing tensors: {', '.join(sorted(missing)[:3])}"
                               + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    model.load_state_dict(state, strict=False, assign=True)
    del state  # the model holds the tensors now: what it lets go of below is freed
    if args.tie_embeddings and (keep is None or keep("output.weight")):
        model.output = _tied_head(model.tok_embeddings.weight, quantized=bool(specs))
    model.inv_freq = model.inv_freq.to(device)
    repack(model, kind, dtype, fuse=False)  # the rest: the head (the layers are done)
    backend = {"cpu": cpu, "cuda": cuda}.get(kind)
    kernels = backend.layer_kernels(args.head_dim, dtype) if backend else {}
    for module in model.modules():
        for slot in kernels.keys() & vars(module).keys():  # model.py's slots: instance attributes
            setattr(module, slot, kernels[slot])
    release_freed_memory()
    return model.eval().requires_grad_(False)  # inference only (and a traced step takes its weights as constants)


def repack(module: torch.nn.Module, kind: str, dtype: torch.dtype, fuse: bool) -> None:
    """Repack a module's loaded QuantLinears (with `fuse`, each fused group once, in its fused kernel) and
    QuantExperts for the device of type `kind`, and let go of the canonical parts each repacking leaves unread
    as soon as it is done: the load's peak memory stays near one copy of the weights (parts made in memory are
    freed; a memory-mapped file's pages unmapped)."""
    fast_cpu = kind == "cpu" and dtype == torch.bfloat16
    files = _file_mappings() if fast_cpu else []  # the weights' files are mapped by now

    def release(linears: Iterable[QuantLinear]) -> None:
        for linear in linears:
            page_out(linear.release_parts(), files)

    if fuse and (fast_cpu or kind == "cuda"):
        for fused in fuse_projections([module]):  # first: each fused weight repacked once, in its fused kernel
            release(fused.linears)
    loaded = [m for m in module.modules()
              if isinstance(m, QuantLinear) and m.kernel is None and m.qweight.device.type != "meta"]
    # experts whose QuantLinears this pass prepares (a later pass over the model finds them prepared, and their
    # parts let go of, batched or not: the backend may have no batched kernel for their shape)
    preparing = {id(m) for m in loaded}
    loaded += [m for m in module.modules() if isinstance(m, QuantExperts) and id(m[0].w1) in preparing]
    for m in loaded:  # QuantExperts after the QuantLinears they are made of
        m.prepare(dtype)
        release([m] if isinstance(m, QuantLinear) else [])


MADV_DONTNEED, MADV_POPULATE_READ = 4, 22


def page_out(tensors: list[torch.Tensor], files: list[tuple[int, int]] | None = None) -> None:
    """Unmap the pages of tensors in memory-mapped files (the canonical weights the kernels repacked, touched
    once while repacking) from the process: its resident memory drops by their size; they stay in the page
    cache (the next load reads no disk) and, read again, come back from it. Anonymous memory is left as it
    is (MADV_DONTNEED would zero it). A no-op where madvise is missing. files: _file_mappings(), where the
    caller has it."""
    _advise_mapped(tensors, MADV_DONTNEED, files)


def read_in(tensors: list[torch.Tensor]) -> None:
    """Read tensors in memory-mapped files into the process's memory now (MADV_POPULATE_READ, Linux 5.14+;
    elsewhere a no-op), as llama.cpp maps its files: the embedding table, read a row a token, would otherwise
    fault at each token's first use, and wait on the disk (1-14 ms here) when the file has left the page cache.
    (MADV_WILLNEED, which would not map them, read ~16 MB of 256 here.)"""
    _advise_mapped(tensors, MADV_POPULATE_READ)


def _advise_mapped(tensors: list[torch.Tensor], advice: int, files: list[tuple[int, int]] | None = None) -> None:
    """madvise(advice) over the whole pages of each tensor that lies in a memory-mapped file."""
    madvise = getattr(_libc(), "madvise", None)
    if madvise is None or not tensors:
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page, files = mmap.PAGESIZE, _file_mappings() if files is None else files
    for t in tensors:
        start, end = -(-t.data_ptr() // page) * page, (t.data_ptr() + t.nbytes) // page * page  # whole pages
        i = bisect.bisect_right(files, (start, float("inf"))) - 1
        if end > start and i >= 0 and files[i][1] >= end:
            madvise(start, end - start, advice)


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges [start, end) of this process's mappings of files, sorted, adjacent ones merged (none
    where /proc/self/maps is missing)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            if ranges and ranges[-1][1] == start:  # the lines are in address order
                start = ranges.pop()[0]
            ranges.append((start, end))
    return ranges


def release_freed_memory() -> None:
    """Give the pages of freed memory (repacking's temporaries, such as the fused projections' concatenated
    parts) back to the OS, which glibc's allocator otherwise keeps in the process. A no-op without glibc."""
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, for the memory calls above (None elsewhere)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _tied_head(embedding: torch.Tensor, quantized: bool) -> torch.nn.Module:
    """The output head that shares the embedding table. In a quantized model it is an int8 copy, as an
    untied head would be: decode reads the whole head every token, but only one row of the embeddings."""
    if not quantized:
        head = torch.nn.Linear(embedding.shape[1], embedding.shape[0], bias=False, device="meta")
        head.weight = embedding
        return head
    spec = QuantSpec("int8")
    head = QuantLinear(embedding.shape[1], embedding.shape[0], spec)
    for name, part in quantize(embedding, spec).items():
        setattr(head, name, part.to(embedding.device))
    return head


def _compute_dtype(dtype: str | torch.dtype | None, scheme: str | None, stored: torch.dtype | None,
                   device: str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise LilmistralError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
        return DTYPES[dtype]
    if dtype is not None:
        return dtype
    if scheme in SCHEME_DTYPES:
        return SCHEME_DTYPES[scheme]
    if scheme is None and stored is not None and stored != torch.float16:
        return stored
    return torch.bfloat16 if device == "cpu" or scheme is not None else torch.float16


def read_manifest(folder: Path) -> tuple[dict, ModelArgs]:
    """A converted folder's manifest.json and the architecture it records; one line on what is wrong with it."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        version, scheme, tensors = manifest.get("format_version", 0), manifest["quant"]["scheme"], manifest["tensors"]
        args = ModelArgs.from_dict(manifest["args"])
        if not isinstance(version, int) or not isinstance(scheme, str) or not isinstance(tensors, dict):
            raise TypeError("format_version, quant.scheme or tensors of the wrong type")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelFormatError(f"{folder / MANIFEST}: not a lilmistral manifest ({type(e).__name__}: {e})") from None
    if version > FORMAT_VERSION:
        raise ModelFormatError(f"{folder}: made by a newer lilmistral (format {version})")
    return manifest, args


def _load_converted(folder: Path, quant: str | None, device: str, dtype: str | torch.dtype | None,
                    keep: Keep | None) -> tuple[Transformer, dict]:
    manifest, args = read_manifest(folder)
    scheme = manifest["quant"]["scheme"]
    if quant is not None and quant != scheme:
        raise LilmistralError(f"{folder} is stored as {scheme}; convert the source again for {quant}")
    specs = {}
    for name, layout in manifest["tensors"].items():
        try:
            specs[name] = QuantSpec(**layout)
        except (TypeError, ValueError):
            raise ModelFormatError(f"{folder}: tensor {name!r} has an unknown layout {layout}") from None
    compute = _compute_dtype(dtype, scheme, DTYPES.get(manifest.get("float_dtype", "")), device)
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        check_counts(args, list(f.keys()), folder)
        names = [k for k in f.keys() if keep is None or keep(k)]
        model = build_model(args, ((k, f.get_tensor(k)) for k in names), specs, device, compute, keep)
    info = {"quant": scheme, "group_size": manifest["quant"].get("group_size"), "source": manifest.get("source", {})}
    return model, info


def installed_path(name: str) -> Path:
    """The store folder of a pulled model name (`mistral`, `mixtral:8x22b-instruct`)."""
    from .registry import resolve
    from .store import Store

    store = Store()
    try:
        ref = resolve(name, store.home)
    except LilmistralError as e:
        raise LilmistralError(f"{name}: no such model folder or file, and {e}") from None
    installed = store.installed(ref)
    if installed is None:
        raise LilmistralError(f"{ref.display} is not pulled yet: lilmistral pull {name}")
    return installed.path


def load(source: str | Path, *, quant: str | None = None, device: str = "cpu", num_ctx: int | None = None,
         dtype: str | torch.dtype | None = None, group_size: int = DEFAULT_GROUP_SIZE, pp: int = 1,
         compile: bool = False, require_chat: bool = False) -> LLM:
    """Load a model for generation.

    source: a pulled model name (`mistral`), a converted folder (`lilmistral convert`), a Hugging Face
        model folder, or a .gguf file.
    quant: "int4", "int4-sym", "int5", "int6", "int8", "bf16", "f16", "f32", or None for the source as stored (a
        converted folder's scheme; a HF folder's float weights; for a GGUF, its own: Q4_0/Q4_1/Q4_K map to int4,
        Q5_0/Q5_1/Q5_K to int5 and Q6_K to int6 exactly). A HF folder or GGUF is quantized in
        memory; `lilmistral convert` saves the result.
    dtype: compute dtype ("float32", "bfloat16", "float16"); default bfloat16 for int4/int8 (the CPU
        kernels need it), else the weights' own. float32 with int4/int8 runs the exact dequantized reference.
    num_ctx: context length for models without a sliding window (default 8192, at most the model's maximum).
    pp: pipeline stages, each in its own process holding only its layers (see parallel.py).
    compile: run each decoded token through a torch.compile'd step (with CUDA graphs on a GPU): faster
        decoding after a one-off compilation (about a minute on a small CPU; cached on disk after that).
    require_chat: fail (LilmistralError) before the weights are read when the model has no chat format.
    """
    start = time.perf_counter()
    check_device(device)
    path = resolve_source(source)
    if pp > 1 and compile:
        raise LilmistralError("compile does not apply to pipeline stages (pp > 1) yet")
    tokenizer = load_model_tokenizer(path)  # first: it takes a fraction of a second, the weights seconds
    if require_chat:
        tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    if pp > 1:
        from .parallel import load_pipeline

        llm = load_pipeline(path, pp, tokenizer, quant=quant, device=device, num_ctx=num_ctx, dtype=dtype,
                            group_size=group_size)
    else:
        args = model_args(path)
        check_memory([sum(tensor_bytes(path, quant, group_size).values())],
                     [kv_cache_bytes(args, args.n_layers, num_ctx, dtype)], device)
        model, info = load_model(path, quant=quant, device=device, dtype=dtype, group_size=group_size)
        llm = LLM(model, tokenizer, num_ctx=num_ctx, source=str(path), info=info, compile=compile)
    llm.sampling_defaults = model_sampling(path)
    release_threads()  # the thread that loaded need not be the one that generates
    llm.load_s = time.perf_counter() - start
    return llm


def check_memory(weights: list[int], caches: list[int], device: str) -> None:
    """Fail before loading when the model, or each pipeline stage, cannot fit its weights and its KV cache
    at num_ctx, and say what each needs and what there is (as Ollama does; else the kernel's OOM killer ends
    the load halfway, or a long conversation, with one word). A GPU allocates the cache whole after the
    weights, and needs GPU_WORKING_BYTES more to prefill in (else a prompt, not the load, fails with CUDA's
    out-of-memory error); the CPU takes the cache's pages as the context fills. A pipeline's stage i goes on
    GPU i; else the device's own GPU. LILMISTRAL_MEMORY_LIMIT_MB stands in for the RAM."""
    gpu = device.startswith("cuda")
    working = GPU_WORKING_BYTES if gpu else 0
    per_stage = [w + c + working for w, c in zip(weights, caches)]
    many = len(per_stage) > 1
    needs = ", ".join(f"stage {i} needs {n / 1e9:.2f} GB" for i, n in enumerate(per_stage)) if many else \
        f"it needs {per_stage[0] / 1e9:.2f} GB"
    to_work_in = f", {working * len(per_stage) / 1e9:.2f} GB to work in" if working else ""
    needs += f" ({sum(weights) / 1e9:.2f} GB of weights, {sum(caches) / 1e9:.2f} GB of KV cache{to_work_in}: a " \
             "smaller --num-ctx needs less)"
    if gpu:
        gpus = range(len(per_stage)) if many else [torch.device(device).index or 0]
        free = [torch.cuda.mem_get_info(i)[0] for i in gpus if i < torch.cuda.device_count()]
        if len(free) < len(per_stage) or any(need > have for need, have in zip(per_stage, free)):
            raise LilmistralError(f"the model does not fit the GPU{'s' if many else ''}: {needs}; free: "
                                  f"{', '.join(f'{f / 1e9:.2f} GB' for f in free) or 'no such GPU'}")
        return
    limit = os.environ.get("LILMISTRAL_MEMORY_LIMIT_MB")
    available = int(limit) * 2**20 if limit else _available_ram()
    if sum(per_stage) > available:
        raise LilmistralError(f"the model does not fit in memory: {needs}; {available / 1e9:.2f} GB available")


def kv_cache_bytes(args: ModelArgs, n_layers: int, num_ctx: int | None, dtype: str | torch.dtype | None) -> int:
    """The KV cache of n_layers at num_ctx (default DEFAULT_NUM_CTX), in the compute dtype."""
    cache_dtype = torch.float32 if dtype in ("float32", torch.float32) else torch.bfloat16
    return cache_bytes(args, n_layers, min(num_ctx or DEFAULT_NUM_CTX, args.max_seq_len), cache_dtype)


def _available_ram() -> int:
    with open("/proc/meminfo") as f:
        match = re.search(r"MemAvailable:\s+(\d+) kB", f.read())
    return int(match.group(1)) * 1024 if match else 1 << 62


def check_device(device: str) -> None:
    """A device this machine does not have is the user's error, said before anything loads."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise LilmistralError(f"unknown device {device!r} (cpu, cuda or cuda:N)") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count <= (parsed.index or 0):
            built = "this PyTorch is built without CUDA" if torch.version.cuda is None else f"{count} found"
            raise LilmistralError(f"device {device!r}: no such CUDA GPU here ({built})")
    elif parsed.type != "cpu":
        raise LilmistralError(f"device {device!r} is not supported (cpu, cuda or cuda:N)")


def use_device(device: str) -> None:
    """Make a CUDA device with an index (cuda:N) the process's current one: Triton launches its kernels, CUDA
    graphs capture and NCCL's collectives run on the current device, whatever device their tensors are on."""
    parsed = torch.device(device)
    if parsed.type == "cuda" and parsed.index is not None:
        torch.cuda.set_device(parsed)


def resolve_source(source: str | Path) -> Path:
    path = Path(source).expanduser()
    return path if path.exists() else installed_path(str(source))


def load_model_tokenizer(path: Path) -> Tokenizer:
    if path.suffix == ".gguf" and path.is_file():
        return gguf_tokenizer(GGUFSource(path))
    return load_tokenizer(path)


def load_model(path: Path, *, quant: str | None = None, device: str = "cpu", dtype: str | torch.dtype | None = None,
               group_size: int = DEFAULT_GROUP_SIZE, keep: Keep | None = None) -> tuple[Transformer, dict]:
    """The model (or, with `keep`, the part of it a pipeline stage holds) and a description of its weights, on
    `device`, which becomes the current CUDA device (`use_device`)."""
    use_device(device)
    model, info = _load_converted(path, quant, device, dtype, keep) if is_converted(path) else \
        _load_source(path, quant, device, dtype, group_size, keep)
    if model.tok_embeddings.weight.device.type == "cpu":  # where the table stayed in a mapped file (the rest
        read_in([model.tok_embeddings.weight])  # of a converted model was read as it loaded)
    return model, info


def _load_source(path: Path, quant: str | None, device: str, dtype: str | torch.dtype | None, group_size: int,
                 keep: Keep | None) -> tuple[Transformer, dict]:
    src = open_source(path)
    if isinstance(src, GGUFSource):
        quant = quant or default_scheme(src)
    if quant is None:  # a HF folder as stored: memory-mapped, no copy
        stored = next((src.read(e, mmap=True).dtype for e in src.entries[:1]), None)
        compute = _compute_dtype(dtype, None, stored, device)
        model = build_model(src.args, src.tensors(mmap=True), {}, device, compute, keep)
    else:
        compute = _compute_dtype(dtype, quant, None, device)
        planned = [p for p in plan(src, quant, group_size, compute) if keep is None or keep(p.entry.name)]
        specs = {p.entry.name: p.spec for p in planned if p.spec is not None}
        model = build_model(src.args, produce(src, planned), specs, device, compute, keep)
    grouped = quant is not None and quant.startswith(("int4", "int5"))
    info = {"quant": quant or "as stored", "group_size": group_size if grouped else None}
    return model, info


def model_args(path: Path) -> ModelArgs:
    """The architecture of a source, read from its metadata only."""
    return read_manifest(path)[1] if is_converted(path) else open_source(path).args


def model_sampling(path: Path) -> dict[str, float | int]:
    """The sampling options a model recommends (a GGUF's metadata, generation_config.json; for a pulled model also
    its registry entry's, kept in the manifest), checked."""
    if is_converted(path):
        return recommended_sampling(read_manifest(path)[0].get("sampling"), str(path / MANIFEST))
    return recommended_sampling(open_source(path).sampling, str(path))


def tensor_bytes(path: Path, quant: str | None = None, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, int]:
    """Bytes of every tensor as loaded (packed parts by their own names), without loading any; with the int8
    head a quantized model with tied embeddings makes from the table (_tied_head)."""
    from .convert.safetensors_io import DTYPES, SafetensorsFile

    if is_converted(path):
        st = SafetensorsFile(path / WEIGHTS)
        sizes = {name: end - begin for name, (_, _, begin, end) in st.entries.items()}
        args = model_args(path)
    else:
        src = open_source(path)
        args = src.args
        if quant is None and isinstance(src, GGUFSource):
            quant = default_scheme(src)
        if quant is None:  # a HF folder, loaded as stored
            sizes = {e.name: math.prod(e.shape) * DTYPES[e.source_type].itemsize for e in src.entries}
        else:
            sizes = {name: math.prod(shape) * dtype.itemsize
                     for p in plan(src, quant, group_size) for name, dtype, shape in p.outputs}
    if args.tie_embeddings and any(name.endswith(".qweight") for name in sizes):
        for part, (shape, dtype) in packed_shapes(args.vocab_size, args.dim, QuantSpec("int8")).items():
            sizes[f"output.{part}"] = math.prod(shape) * dtype.itemsize
    return sizes
