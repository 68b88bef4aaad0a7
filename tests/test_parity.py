"""Logits and greedy tokens against transformers on tiny random models, in float32."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import lilmistral
from conftest import SPM_V3, make_hf_model

CASES = {
    "mistral-window8": ("mistral", dict(sliding_window=8)),
    "mistral-no-window": ("mistral", dict(sliding_window=None)),
    "mixtral-4x2": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "mixtral-window8": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8)),
    "mistral-yarn": ("mistral", dict(sliding_window=None, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16))),
    "mistral-linear-rope": ("mistral", dict(sliding_window=None, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "nemo-head-dim": ("mistral", dict(sliding_window=None, head_dim=32)),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
}


def prompt_ids(n: int = 40) -> list[int]:
    return torch.randint(3, 32768, (n,), generator=torch.Generator().manual_seed(7)).tolist()


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    ref = make_hf_model(folder, arch, **overrides)
    return ref, lilmistral.load(folder)


def test_whole_sequence_logits(pair):
    ref, llm = pair
    ids = prompt_ids()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    got = llm.forward(ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_token_by_token_decode_logits(pair):
    ref, llm = pair
    ids = prompt_ids()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    llm.cache.reset()
    with torch.inference_mode():
        got = torch.cat([llm.model(torch.tensor([t]), llm.cache) for t in ids])
    assert (got - expected).abs().max().item() <= 1e-4


def test_greedy_generation_matches(pair):
    ref, llm = pair
    ids = prompt_ids(12)
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    expected = out[0, len(ids):].tolist()
    got = list(llm.generate(ids, temperature=0, repeat_penalty=1.0, max_tokens=32))
    assert got == expected and len(got) == 32


def test_sliding_window_is_applied(tmp_path):
    """Guard against a test that passes because neither side applies the window."""
    ref = make_hf_model(tmp_path, "mistral", sliding_window=8)
    llm = lilmistral.load(tmp_path)
    ids = prompt_ids()
    ref.config.sliding_window = None
    with torch.no_grad():
        unwindowed = ref(torch.tensor([ids])).logits[0]
    assert (llm.forward(ids)[20:] - unwindowed[20:]).abs().max().item() > 1e-2


def hf_to_consolidated(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def test_params_json_consolidated_checkpoint(tmp_path):
    """Mistral's own layout: params.json, consolidated.safetensors with interleaved RoPE rows."""
    hf_dir, mistral_dir = tmp_path / "hf", tmp_path / "consolidated"
    ref = make_hf_model(hf_dir, "mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    hf_llm = lilmistral.load(hf_dir)
    state = {}
    for name, t in hf_llm.model.state_dict().items():
        if name.endswith("attention.wq.weight"):
            t = hf_to_consolidated(t, 4)
        elif name.endswith("attention.wk.weight"):
            t = hf_to_consolidated(t, 2)
        state[name] = t.contiguous()
    mistral_dir.mkdir()
    save_file(state, mistral_dir / "consolidated.safetensors")
    cfg = ref.config
    (mistral_dir / "params.json").write_text(json.dumps(dict(
        dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers, n_heads=4, n_kv_heads=2, head_dim=16,
        hidden_dim=cfg.intermediate_size, vocab_size=cfg.vocab_size, norm_eps=cfg.rms_norm_eps,
        rope_theta=1e6, moe=dict(num_experts=4, num_experts_per_tok=2))))
    (mistral_dir / "tokenizer.model.v3").write_bytes(SPM_V3.read_bytes())
    llm = lilmistral.load(mistral_dir)
    ids = prompt_ids()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    assert (llm.forward(ids) - expected).abs().max().item() <= 1e-4
