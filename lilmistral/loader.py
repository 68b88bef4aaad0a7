"""`lilmistral.load()`: from a source (converted folder, Hugging Face folder, .gguf file) to a ready `LLM`."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelArgs
from .convert import MANIFEST, WEIGHTS, default_scheme, is_converted, open_source, plan, produce
from .convert.gguf import GGUFSource, gguf_tokenizer
from .errors import LilmistralError, ModelFormatError
from .llm import LLM
from .model import Transformer
from .quant import DEFAULT_GROUP_SIZE, QuantLinear, QuantSpec, swap_in_quant_linears
from .tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCHEME_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def build_model(args: ModelArgs, tensors: Iterable[tuple[str, torch.Tensor]], specs: dict[str, QuantSpec],
                device: str, dtype: torch.dtype) -> Transformer:
    """Assign tensors to a model made on the meta device (no copy when memory-mapped and of the right
    dtype); QuantLinears take the packed parts named in `specs` and repack them for the device once."""
    with torch.device("meta"):
        model = Transformer(args)
    swap_in_quant_linears(model, specs)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if args.tie_embeddings:
        expected.pop("output.weight")
    state = {}
    for name, tensor in tensors:
        if name not in expected:
            if args.tie_embeddings and name == "output.weight":
                continue
            raise ModelFormatError(f"unexpected tensor {name!r} for this architecture")
        if tuple(tensor.shape) != expected[name]:
            raise ModelFormatError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {expected[name]}")
        is_float_weight = name.endswith(".weight") and tensor.is_floating_point()
        state[name] = tensor.to(device=device, dtype=dtype if is_float_weight else tensor.dtype)
    missing = set(expected) - set(state)
    if missing:
        raise ModelFormatError(f"missing tensors: {', '.join(sorted(missing)[:3])}"
                               + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = model.inv_freq.to(device)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.prepare()
    return model.eval()


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


def _load_converted(folder: Path, quant: str | None, device: str, dtype: str | torch.dtype | None,
                    num_ctx: int | None) -> LLM:
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format_version", 0) > 1:
        raise ModelFormatError(f"{folder}: made by a newer lilmistral (format {manifest['format_version']})")
    scheme = manifest["quant"]["scheme"]
    if quant is not None and quant != scheme:
        raise LilmistralError(f"{folder} is stored as {scheme}; convert the source again for {quant}")
    args = ModelArgs.from_dict(manifest["args"])
    specs = {name: QuantSpec(**s) for name, s in manifest["tensors"].items()}
    compute = _compute_dtype(dtype, scheme, DTYPES.get(manifest.get("float_dtype", "")), device)
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        model = build_model(args, ((k, f.get_tensor(k)) for k in f.keys()), specs, device, compute)
    info = {"quant": scheme, "group_size": manifest["quant"].get("group_size"), "source": manifest.get("source", {})}
    return LLM(model, load_tokenizer(folder), num_ctx=num_ctx, source=str(folder), info=info)


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
         dtype: str | torch.dtype | None = None, group_size: int = DEFAULT_GROUP_SIZE) -> LLM:
    """Load a model for generation.

    source: a pulled model name (`mistral`), a converted folder (`lilmistral convert`), a Hugging Face
        model folder, or a .gguf file.
    quant: "int4", "int4-sym", "int8", "bf16", "f16", "f32", or None for the source as stored (a converted folder's
        scheme; a HF folder's float weights; for a GGUF, the closest scheme: Q4_0/Q4_1 map to int4
        exactly). A HF folder or GGUF is quantized in memory; `lilmistral convert` saves the result.
    dtype: compute dtype ("float32", "bfloat16", "float16"); default bfloat16 for int4/int8 (the CPU
        kernels need it), else the weights' own. float32 with int4/int8 runs the exact dequantized reference.
    num_ctx: context length for models without a sliding window (default 8192, at most the model's maximum).
    """
    path = Path(source).expanduser()
    if not path.exists():
        path = installed_path(str(source))
    if is_converted(path):
        return _load_converted(path, quant, device, dtype, num_ctx)
    src = open_source(path)
    if isinstance(src, GGUFSource):
        tokenizer = gguf_tokenizer(src)
        quant = quant or default_scheme(src)
    else:
        tokenizer = load_tokenizer(path)
    if quant is None:  # a HF folder as stored: memory-mapped, no copy
        stored = next((src.read(e, mmap=True).dtype for e in src.entries[:1]), None)
        compute = _compute_dtype(dtype, None, stored, device)
        model = build_model(src.args, src.tensors(mmap=True), {}, device, compute)
    else:
        compute = _compute_dtype(dtype, quant, None, device)
        planned = plan(src, quant, group_size, compute)
        specs = {p.entry.name: p.spec for p in planned if p.spec is not None}
        model = build_model(src.args, produce(src, planned), specs, device, compute)
    info = {"quant": quant or "as stored", "group_size": group_size if quant and quant.startswith("int4") else None}
    return LLM(model, tokenizer, num_ctx=num_ctx, source=str(path), info=info)


__all__ = ["load", "build_model"]
