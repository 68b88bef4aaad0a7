"""`lilmistral.load()`: from a source (a Hugging Face folder, ...) to a ready `LLM`."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from .config import ModelArgs, load_args
from .convert.hf import iter_tensors
from .errors import LilmistralError, ModelFormatError
from .llm import LLM
from .model import Transformer
from .tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(args: ModelArgs, tensors: Iterable[tuple[str, torch.Tensor]], device: str,
                dtype: torch.dtype | None) -> Transformer:
    """Assign the (memory-mapped) tensors to a model made on the meta device: no copy when dtypes agree."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = set(model.state_dict())
    if args.tie_embeddings:
        expected.discard("output.weight")
    state = {}
    for name, tensor in tensors:
        if name not in expected:
            if args.tie_embeddings and name == "output.weight":
                continue
            raise ModelFormatError(f"unexpected tensor {name!r} for this architecture")
        if dtype is None:  # the checkpoint's dtype; float16 runs as bfloat16 on the CPU
            dtype = torch.bfloat16 if tensor.dtype == torch.float16 and device == "cpu" else tensor.dtype
        state[name] = tensor.to(device=device, dtype=dtype)
    missing = expected - set(state)
    if missing:
        raise ModelFormatError(f"missing tensors: {', '.join(sorted(missing)[:3])}"
                               + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = model.inv_freq.to(device)
    return model.eval()


def load(source: str | Path, *, quant: str | None = None, device: str = "cpu", num_ctx: int | None = None,
         dtype: str | torch.dtype | None = None) -> LLM:
    """Load a model for generation.

    source: a Hugging Face model folder (config.json or params.json, safetensors, Mistral tokenizer).
    dtype: compute dtype of float weights; default the checkpoint's (float16 becomes bfloat16 on the CPU).
    num_ctx: context length for models without a sliding window (default 8192, at most the model's maximum).
    """
    if quant is not None:
        raise LilmistralError("quantized loading needs a converted model (lilmistral convert)")
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise LilmistralError(f"{source}: no such model folder")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise LilmistralError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
        dtype = DTYPES[dtype]
    args = load_args(folder)
    tokenizer = load_tokenizer(folder)
    model = build_model(args, iter_tensors(folder, args), device, dtype)
    return LLM(model, tokenizer, num_ctx=num_ctx, source=str(folder))
