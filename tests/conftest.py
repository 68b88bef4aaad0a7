"""Tiny random models written by transformers, and the tokenizers mistral_common ships."""
from __future__ import annotations

import shutil
from pathlib import Path

import mistral_common
import pytest
import torch

MC_DATA = Path(mistral_common.__file__).parent / "data"
SPM_V3 = MC_DATA / "mistral_instruct_tokenizer_240323.model.v3"


def make_hf_model(folder: Path, arch: str = "mistral", seed: int = 0, **overrides):
    """Save a tiny random HF model (float32) with Mistral's v3 tokenizer; return the transformers model."""
    import transformers

    base = dict(vocab_size=32768, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                initializer_range=0.08, rms_norm_eps=1e-5, tie_word_embeddings=False)
    base.update(overrides)
    torch.manual_seed(seed)
    cls = {"mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[arch]
    config = cls[0](**base)
    model = cls[1](config).eval()
    # RMSNorm weights start at one: perturb them so a norm/weight mix-up cannot pass
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    shutil.copy(SPM_V3, folder / "tokenizer.model.v3")
    return model


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-mistral")
    return folder, make_hf_model(folder, "mistral", sliding_window=8)
