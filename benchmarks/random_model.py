"""Models of any shape with random weights, packed as a scheme and built by the loader's own `build_model`
(for benchmarks and the GPU tests: no files, no tokenizer)."""
from __future__ import annotations

import torch

from lilmistral.config import ModelArgs
from lilmistral.loader import build_model
from lilmistral.model import Transformer
from lilmistral.quant import QuantSpec, quantize, spec_for

MISTRAL_7B = dict(dim=4096, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32000, max_seq_len=32768,
                  rope_theta=1e6)


def random_weights(args: ModelArgs, scheme: str, device: str = "cpu", seed: int = 0
                   ) -> tuple[list[tuple[str, torch.Tensor]], dict[str, QuantSpec]]:
    """Lilmistral-named tensors (projections quantized from random float weights on `device`, norms near 1)
    and the spec of each packed weight."""
    g = torch.Generator(device).manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in Transformer(args).state_dict().items() if name != "inv_freq"}
    tensors, specs = [], {}
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=g, device=device)
        if len(shape) == 1:  # a norm
            tensors.append((name, 1 + 0.1 * w))
            continue
        w *= shape[-1] ** -0.5  # unit-scale outputs, layer after layer
        spec = spec_for(name, shape, scheme, tied=args.tie_embeddings)
        if spec is None:
            tensors.append((name, w))
        else:
            specs[name] = spec
            tensors += [(f"{name.removesuffix('.weight')}.{part}", t) for part, t in quantize(w, spec).items()]
    return tensors, specs


def random_model(args: ModelArgs, scheme: str, device: str, dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0) -> Transformer:
    tensors, specs = random_weights(args, scheme, device, seed)
    return build_model(args, tensors, specs, device, dtype)
