"""Model arguments, read from a checkpoint's own config (HF config.json or Mistral params.json)."""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelFormatError

HF_ARCHITECTURES = ("MistralForCausalLM", "MixtralForCausalLM", "LlamaForCausalLM")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


@dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling as in HF's `rope_parameters`: kind is "linear" or "yarn"."""

    kind: str
    factor: float
    original_max_position: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "yarn"):
            raise ValueError(f"RoPE scaling {self.kind!r} is not linear or yarn")
        optional = (self.beta_fast, self.beta_slow, self.attention_factor, self.mscale, self.mscale_all_dim)
        if not (_is_number(self.factor) and math.isfinite(self.factor) and self.factor > 0) or not all(
                x is None or _is_number(x) and math.isfinite(x) for x in optional):
            raise ValueError("RoPE scaling's factor is not a positive number, or another of its numbers not finite")
        if self.original_max_position is not None and not _count(self.original_max_position, 1):
            raise ValueError(f"RoPE scaling's original_max_position is {self.original_max_position!r}")


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    vocab_size: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    max_seq_len: int = 32768
    tie_embeddings: bool = False
    n_experts: int = 0  # 0: dense FFN
    n_experts_per_tok: int = 0
    architecture: str = "MistralForCausalLM"

    def __post_init__(self) -> None:
        """Checks what a damaged or hand-written config could get wrong; ValueError, which each reader of a
        config turns into one line naming its file."""
        for name, least in (("dim", 1), ("n_layers", 1), ("n_heads", 1), ("n_kv_heads", 1), ("hidden_dim", 1),
                            ("vocab_size", 1), ("max_seq_len", 1), ("head_dim", 0), ("n_experts", 0),
                            ("n_experts_per_tok", 0)):
            if not _count(getattr(self, name), least):
                raise ValueError(f"{name} is {getattr(self, name)!r}, not an integer of at least {least}")
        if self.sliding_window is not None and not _count(self.sliding_window, 1):
            raise ValueError(f"sliding_window is {self.sliding_window!r}, not a positive integer")
        if not (_is_number(self.norm_eps) and _is_number(self.rope_theta) and math.isfinite(self.norm_eps)
                and self.norm_eps >= 0 and math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"norm_eps {self.norm_eps!r} or rope_theta {self.rope_theta!r} is out of range")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"rope_scaling is {self.rope_scaling!r}")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} is odd: RoPE rotates pairs")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.n_experts and not 1 <= self.n_experts_per_tok <= self.n_experts:
            raise ValueError(f"{self.n_experts_per_tok} experts a token of {self.n_experts}")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def n_parameters(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim * max(self.n_experts, 1) + self.dim * self.n_experts
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * (attn + ffn + 2 * self.dim) + self.dim + head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)


def _rope_scaling_from_hf(params: dict[str, Any] | None) -> RopeScaling | None:
    if not params:
        return None
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "yarn"):
        raise ModelFormatError(f"unsupported RoPE scaling type {kind!r} (supported: linear, yarn)")
    return RopeScaling(
        kind=kind,
        factor=float(params["factor"]),
        original_max_position=params.get("original_max_position_embeddings"),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


def from_hf_config(cfg: dict[str, Any]) -> ModelArgs:
    """ModelArgs from a Hugging Face config.json (Mistral, Mixtral or Llama)."""
    archs = cfg.get("architectures") or ["MistralForCausalLM"]
    arch = archs[0] if isinstance(archs, list) else archs  # a list of names, or (hand-written) one
    if arch not in HF_ARCHITECTURES:
        raise ModelFormatError(f"unsupported architecture {arch!r} (supported: {', '.join(HF_ARCHITECTURES)})")
    # transformers >= 5 nests rope_theta in rope_parameters; older configs keep rope_theta/rope_scaling at top level
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = _rope_scaling_from_hf(rope)
    max_pos = int(cfg.get("max_position_embeddings", 32768))
    if scaling and scaling.kind == "yarn" and scaling.original_max_position is None:
        scaling = dataclasses.replace(scaling, original_max_position=max_pos)
    window = cfg.get("sliding_window") if arch != "LlamaForCausalLM" else None
    if cfg.get("use_sliding_window") is False:
        window = None
    return ModelArgs(
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        hidden_dim=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        head_dim=cfg.get("head_dim") or 0,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        sliding_window=int(window) if window else None,
        max_seq_len=max_pos,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        n_experts=int(cfg.get("num_local_experts", 0) or 0),
        n_experts_per_tok=int(cfg.get("num_experts_per_tok", 0) or 0),
        architecture=arch,
    )


def from_params_json(p: dict[str, Any]) -> ModelArgs:
    """ModelArgs from Mistral's own params.json (consolidated checkpoints)."""
    moe = p.get("moe") or {}
    yarn = p.get("yarn")
    scaling = None
    if yarn:
        scaling = RopeScaling(
            kind="yarn",
            factor=float(yarn["factor"]),
            original_max_position=int(yarn["original_max_position_embeddings"]),
            beta_fast=float(yarn.get("beta", 32.0)),
            beta_slow=float(yarn.get("alpha", 1.0)),
        )
    return ModelArgs(
        dim=p["dim"],
        n_layers=p["n_layers"],
        n_heads=p["n_heads"],
        n_kv_heads=p.get("n_kv_heads") or p["n_heads"],
        hidden_dim=p["hidden_dim"],
        vocab_size=p["vocab_size"],
        head_dim=p.get("head_dim") or 0,
        norm_eps=float(p.get("norm_eps", 1e-5)),
        rope_theta=float(p.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        sliding_window=p.get("sliding_window"),
        max_seq_len=int(p.get("max_seq_len", p.get("max_position_embeddings", 32768))),
        tie_embeddings=bool(p.get("tied_embeddings", False)),
        n_experts=int(moe.get("num_experts", 0)),
        n_experts_per_tok=int(moe.get("num_experts_per_tok", 0)),
        architecture="MixtralForCausalLM" if moe else "MistralForCausalLM",
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: cannot read JSON ({e})") from None


def generation_config(folder: Path) -> dict[str, Any]:
    """A folder's generation_config.json (transformers' generation defaults: sampling, the ids that end an answer),
    or {}. A damaged one is left out with a warning, not a reason to refuse the model."""
    path = folder / "generation_config.json"
    try:
        config = read_json(path) if path.is_file() else {}
    except ModelFormatError as e:
        warnings.warn(f"lilmistral: {e}; it is left out")
        return {}
    return config if isinstance(config, dict) else {}


def load_args(folder: Path) -> ModelArgs:
    """Read config.json (preferred) or params.json from a model folder."""
    for name, parse in (("config.json", from_hf_config), ("params.json", from_params_json)):
        path = folder / name
        if path.is_file():
            try:
                return parse(read_json(path))
            except KeyError as e:
                raise ModelFormatError(f"{path}: missing field {e}") from None
            except (TypeError, ValueError, AttributeError) as e:
                raise ModelFormatError(f"{path}: bad value ({e})") from None
    raise ModelFormatError(f"{folder}: no config.json or params.json")
