"""Hugging Face ``config.json`` -> Megatron ``TransformerConfig`` / ``GPTModel`` arguments.

Pure functions over the plain config dict (what ``config.json`` holds, or
``PretrainedConfig.to_dict()``), so they read transformers 4.x (``rope_theta`` + ``rope_scaling``)
and 5.x (``rope_parameters``) files alike without importing transformers.

The supported families (``model_type``; every one tied or untied) and their quirks are the specs of
:mod:`megatron_skpo.model.families`; this module turns a spec plus ``config.json`` into Megatron's
fields.
Anything the Megatron GPT layer cannot express exactly is rejected with an error naming the field,
rather than silently producing a different model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from megatron_skpo.model.families import HFConfigError, family_of, get_family

__all__ = ["HFConfigError", "RopeSpec", "MoESpec", "rope_spec", "rope_inv_freq", "head_dim", "sliding_window",
           "moe_spec", "megatron_aux_loss_coeff", "transformer_config_kwargs", "gpt_model_kwargs"]



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


@dataclass(frozen=True)
class MoESpec:
    """The routed-expert MLP of a Qwen3-MoE config, in HF's own terms.

    ``aux_loss_coef`` is the load-balancing coefficient HF applies in training: the config's
    ``router_aux_loss_coef`` when ``output_router_logits`` is true (HF adds the loss only then),
    else 0. :func:`megatron_aux_loss_coeff` turns it into Megatron's per-layer coefficient.
    """

    num_experts: int
    topk: int
    ffn_hidden_size: int
    norm_topk_prob: bool
    aux_loss_coef: float


def sliding_window(hf: dict) -> Optional[int]:
    """The attention window in tokens of a family that has one (a query sees itself and the W-1
    tokens before it), or ``None`` for full causal attention."""
    spec = family_of(hf)
    if spec is None or not spec.sliding_window or hf.get("sliding_window") is None:
        return None
    window = int(hf["sliding_window"])
    if window < 1:
        raise HFConfigError(f"config.json: sliding_window={window} must be >= 1 (or null for full attention)")
    return window


def moe_spec(hf: dict) -> Optional[MoESpec]:
    """The routed experts of an MoE family's config (``None`` for dense models); errors name the
    field when some layers would not be MoE layers or a shared expert is configured."""
    spec = family_of(hf)
    if spec is None or not spec.moe:
        return None
    # transformers 5 writes num_local_experts for what Qwen's own configs call num_experts
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    if experts is None:
        raise HFConfigError("config.json: missing required field 'num_experts'")
    topk = int(_get(hf, "num_experts_per_tok", required=True))
    if not 1 <= topk <= int(experts):
        raise HFConfigError(f"config.json: num_experts_per_tok={topk} must be in [1, num_experts={experts}]")
    if int(_get(hf, "decoder_sparse_step", 1)) != 1 or _get(hf, "mlp_only_layers", []):
        raise HFConfigError("config.json: decoder_sparse_step != 1 or a non-empty mlp_only_layers (dense "
                            "layers between MoE layers) is not supported: every layer must be an MoE layer")
    if hf.get("shared_expert_intermediate_size"):
        raise HFConfigError("config.json: shared_expert_intermediate_size is not supported (Qwen3-MoE has no "
                            "shared expert)")
    coef = float(_get(hf, "router_aux_loss_coef", 0.0)) if hf.get("output_router_logits") else 0.0
    return MoESpec(num_experts=int(experts), topk=topk,
                   ffn_hidden_size=int(_get(hf, "moe_intermediate_size", required=True)),
                   norm_topk_prob=bool(_get(hf, "norm_topk_prob", False)), aux_loss_coef=coef)


def megatron_aux_loss_coeff(hf_coef: float, topk: int, num_moe_layers: int) -> float:
    """Megatron's per-layer ``moe_aux_loss_coeff`` for HF's ``router_aux_loss_coef``.

    Per layer, Megatron's Switch loss is ``E / topk * sum_e f_e P_e`` (``f_e``: share of tokens
    routed to expert e, ``P_e``: mean router probability of e) and it adds one per MoE layer; HF's
    ``load_balancing_loss_func`` is ``E * sum_e f_e P_e`` once, with ``f`` and ``P`` pooled over
    the tokens of all layers. Scaling by ``topk / num_moe_layers`` makes Megatron's total
    ``hf_coef * mean over layers of the per-layer HF loss``: exactly HF's loss with one MoE
    layer; with several it differs from HF's pooled statistic by the across-layer covariance of
    ``f_e`` and ``P_e`` (zero when every layer routes alike).
    """
    return hf_coef * topk / max(num_moe_layers, 1)


def _check_supported(hf: dict):
    """The family spec of ``hf``, after every check that it can be built exactly."""
    spec = get_family(hf.get("model_type"))
    if _get(hf, "hidden_act", "silu") != "silu":
        raise HFConfigError(f"config.json: hidden_act '{hf['hidden_act']}' is not supported (silu)")
    sliding_window(hf)
    if spec.check is not None:
        spec.check(hf)
    moe_spec(hf)
    return spec


def _moe_kwargs(moe: MoESpec, num_layers: int) -> dict[str, Any]:
    """Megatron's routed-expert fields for HF's router: softmax scores; ``norm_topk_prob`` =
    top-k of the logits then a softmax over those k (the same as renormalising the top-k of the
    full softmax), else the top-k of the full softmax as they are (``moe_router_pre_softmax``)."""
    return dict(num_moe_experts=moe.num_experts, moe_router_topk=moe.topk,
                moe_ffn_hidden_size=moe.ffn_hidden_size, moe_router_score_function="softmax",
                moe_router_pre_softmax=not moe.norm_topk_prob, moe_router_load_balancing_type="aux_loss",
                moe_aux_loss_coeff=megatron_aux_loss_coeff(moe.aux_loss_coef, moe.topk, num_layers),
                moe_grouped_gemm=False, moe_shared_expert_intermediate_size=None)


def transformer_config_kwargs(hf: dict) -> dict[str, Any]:
    """Architecture fields of ``TransformerConfig`` (no parallelism, dtype or device choices)."""
    spec = _check_supported(hf)
    heads = int(_get(hf, "num_attention_heads", required=True))
    layers = int(_get(hf, "num_hidden_layers", required=True))
    window = sliding_window(hf)
    moe = moe_spec(hf)
    extra: dict[str, Any] = dict(qk_layernorm=spec.qk_norm)
    if window is not None:  # Megatron's (left, right) keeps keys i-left..i+right: HF's W is (W-1, 0)
        extra["window_size"] = (window - 1, 0)
    if moe is not None:
        extra.update(_moe_kwargs(moe, layers))
    return dict(
        num_layers=layers,
        hidden_size=int(_get(hf, "hidden_size", required=True)),
        # an all-MoE model never uses the dense size; Megatron still wants one
        ffn_hidden_size=int(_get(hf, "intermediate_size", required=moe is None) or moe.ffn_hidden_size),
        num_attention_heads=heads,
        num_query_groups=int(_get(hf, "num_key_value_heads", heads)),
        kv_channels=head_dim(hf),
        normalization="RMSNorm",
        layernorm_epsilon=float(_get(hf, "rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=float(_get(hf, "attention_dropout", 0.0)),
        init_method_std=float(_get(hf, "initializer_range", 0.02)),
        attention_softmax_in_fp32=True,
        **extra,
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
