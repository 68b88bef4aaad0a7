"""Perplexity over fixed, non-overlapping windows, through `LLM.forward` (the generation cache path)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .llm import LLM


def perplexity(llm: LLM, ids: list[int], window: int = 512) -> float:
    """exp(mean negative log-likelihood) of each token given the earlier tokens of its window."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        if len(chunk) < 2:
            break
        logits = llm.forward(chunk[:-1])
        nll += F.cross_entropy(logits, torch.tensor(chunk[1:], device=logits.device), reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count)


def reference_text() -> str:
    """English prose that ships with Python itself: the pydoc topic help texts, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))
