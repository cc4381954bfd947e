"""Hugging Face ``config.json`` -> Megatron ``TransformerConfig`` / ``GPTModel`` arguments.

Pure functions over the plain config dict (what ``config.json`` holds, or
``PretrainedConfig.to_dict()``), so they read transformers 4.x (``rope_theta`` + ``rope_scaling``)
and 5.x (``rope_parameters``) files alike without importing transformers.

Supported: Llama 2/3/3.1/3.2 (``model_type="llama"``; Llama-3.x "llama3" rope scaling; tied or
untied embeddings) and Qwen2/Qwen2.5 (``model_type="qwen2"``; bias on q/k/v only). Anything the
Megatron GPT layer cannot express exactly is rejected with an error naming the field, rather than
silently producing a different model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "qwen2")


class HFConfigError(ValueError):
    """An HF config this builder cannot reproduce exactly; the message names the field."""


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of an HF model: base, and the Llama-3 scaling parameters (or none)."""

    theta: float
    llama3: Optional[dict[str, float]] = None  # factor, low_freq_factor, high_freq_factor, original_max
    linear_factor: Optional[float] = None


def _get(hf: dict, key: str, default: Any = None, required: bool = False) -> Any:
    if required and hf.get(key) is None:
        raise HFConfigError(f"config.json: missing required field '{key}'")
    value = hf.get(key)
    return default if value is None else value


def rope_spec(hf: dict) -> RopeSpec:
    """Read the rotary settings from either the transformers 4 or the transformers 5 layout."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeSpec(theta)
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in params]
        if missing:
            raise HFConfigError(f"config.json: rope scaling 'llama3' lacks {missing}")
        return RopeSpec(theta, llama3={k: float(params[k]) for k in keys})
    if kind == "linear":
        return RopeSpec(theta, linear_factor=float(params["factor"]))
    raise HFConfigError(f"config.json: rope_type '{kind}' is not supported (default, linear, llama3)")


def rope_inv_freq(head_dim: int, rope: RopeSpec) -> torch.Tensor:
    """Inverse frequencies ``[head_dim/2]`` (fp32), with Llama-3 scaling as transformers does it.

    Megatron's own ``rope_scaling`` hard-codes low/high factors 1/4 and an original context of
    8192; computing them here keeps any Llama-3.x variant exact.
    """
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rope.llama3 is None:
        return inv
    p = rope.llama3
    low_wavelen = p["original_max_position_embeddings"] / p["low_freq_factor"]
    high_wavelen = p["original_max_position_embeddings"] / p["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / p["factor"], inv)
    smooth = (p["original_max_position_embeddings"] / wavelen - p["low_freq_factor"]) / (
        p["high_freq_factor"] - p["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / p["factor"] + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def head_dim(hf: dict) -> int:
    heads = _get(hf, "num_attention_heads", required=True)
    return int(_get(hf, "head_dim", _get(hf, "hidden_size", required=True) // heads))


def _check_supported(hf: dict) -> str:
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise HFConfigError(f"config.json: model_type '{kind}' is not supported ({', '.join(SUPPORTED)})")
    if _get(hf, "hidden_act", "silu") != "silu":
        raise HFConfigError(f"config.json: hidden_act '{hf['hidden_act']}' is not supported (silu)")
    if kind == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise HFConfigError("config.json: attention_bias/mlp_bias on Llama are not supported")
    if kind == "qwen2" and hf.get("use_sliding_window"):
        raise HFConfigError("config.json: use_sliding_window=true is not supported")
    return kind


def transformer_config_kwargs(hf: dict) -> dict[str, Any]:
    """Architecture fields of ``TransformerConfig`` (no parallelism, dtype or device choices)."""
    kind = _check_supported(hf)
    heads = int(_get(hf, "num_attention_heads", required=True))
    return dict(
        num_layers=int(_get(hf, "num_hidden_layers", required=True)),
        hidden_size=int(_get(hf, "hidden_size", required=True)),
        ffn_hidden_size=int(_get(hf, "intermediate_size", required=True)),
        num_attention_heads=heads,
        num_query_groups=int(_get(hf, "num_key_value_heads", heads)),
        kv_channels=head_dim(hf),
        normalization="RMSNorm",
        layernorm_epsilon=float(_get(hf, "rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=kind == "qwen2",
        hidden_dropout=0.0,
        attention_dropout=float(_get(hf, "attention_dropout", 0.0)),
        init_method_std=float(_get(hf, "initializer_range", 0.02)),
        attention_softmax_in_fp32=True,
    )


def gpt_model_kwargs(hf: dict) -> dict[str, Any]:
    """``GPTModel`` constructor arguments (vocab, positions, rotary, embedding tying)."""
    _check_supported(hf)
    rope = rope_spec(hf)
    return dict(
        vocab_size=int(_get(hf, "vocab_size", required=True)),
        max_sequence_length=int(_get(hf, "max_position_embeddings", 4096)),
        position_embedding_type="rope",
        rotary_base=int(rope.theta),
        rope_scaling=rope.llama3 is not None,
        rope_scaling_factor=rope.llama3["factor"] if rope.llama3 else 8.0,
        seq_len_interpolation_factor=rope.linear_factor,
        share_embeddings_and_output_weights=bool(_get(hf, "tie_word_embeddings", False)),
    )
