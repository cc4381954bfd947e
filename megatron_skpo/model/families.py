"""The model families this framework builds, converts and syncs: one registered spec per HF ``model_type``.

A :class:`ModelFamily` says everything the rest of the code needs to know about a family: its HF
architecture class, which weight mapping serves it (``model/mappings``), the quirks the config
translation (``model/hf_config.py``) turns into Megatron fields (bias on q/k/v, RMSNorm per
query/key head, sliding-window attention, routed experts) and the HF config values it cannot
reproduce exactly (``check``). ``hf_config``, the mappings, ``skpo-convert`` and the model presets
all read :data:`FAMILIES`; the tests build their per-family lists from it, so adding a Llama-like
family is one entry here.

Data only (plus the family-specific checks, on plain ``config.json`` dicts): no torch, no megatron.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


class HFConfigError(ValueError):
    """An HF config this builder cannot reproduce exactly; the message names the field."""


def layer_types(hf: dict) -> list[str]:
    return list(hf.get("layer_types") or [])


def _check_llama(hf: dict) -> None:
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise HFConfigError("config.json: attention_bias/mlp_bias on Llama are not supported")


def _check_qwen2(hf: dict) -> None:
    if hf.get("use_sliding_window"):
        raise HFConfigError("config.json: use_sliding_window=true is not supported")


def _check_qwen3(hf: dict) -> None:
    if hf.get("attention_bias"):
        raise HFConfigError("config.json: attention_bias=true on Qwen3 is not supported (Megatron's "
                            "add_bias_linear would also add MLP biases)")
    if hf.get("use_sliding_window") or "sliding_attention" in layer_types(hf):
        raise HFConfigError("config.json: use_sliding_window=true / sliding_attention layers on Qwen3 are "
                            "not supported (no released Qwen3 uses them)")


def _check_mistral(hf: dict) -> None:
    if len(set(layer_types(hf))) > 1:
        raise HFConfigError("config.json: layer_types mixing full and sliding attention on Mistral is not "
                            "supported (Ministral-style alternation)")


@dataclass(frozen=True)
class ModelFamily:
    """One HF ``model_type``: a SwiGLU, RMSNorm, rotary decoder (the GPT layer Megatron builds)."""

    model_type: str  # config.json "model_type"
    architecture: str  # config.json "architectures"[0]: the transformers class
    summary: str
    mapping: str = "dense"  # module of megatron_skpo.model.mappings with from_hf / to_hf
    qkv_bias: bool = False  # biases on q/k/v only (Megatron's add_qkv_bias)
    qk_norm: bool = False  # RMSNorm on each query and key head (Megatron's qk_layernorm)
    sliding_window: bool = False  # honours config.json's sliding_window (Megatron's window_size)
    moe: bool = False  # every layer a routed-expert MLP (hf_config.moe_spec reads its fields)
    check: Optional[Callable[[dict], None]] = None  # raises HFConfigError for what the spec cannot express


FAMILIES: dict[str, ModelFamily] = {f.model_type: f for f in (
    ModelFamily("llama", "LlamaForCausalLM", "Llama 2/3/3.1/3.2 (Llama-3.x 'llama3' rope scaling)",
                check=_check_llama),
    ModelFamily("mistral", "MistralForCausalLM", "Mistral (sliding-window attention when sliding_window is set)",
                sliding_window=True, check=_check_mistral),
    ModelFamily("qwen2", "Qwen2ForCausalLM", "Qwen2/Qwen2.5 (bias on q/k/v only)", qkv_bias=True, check=_check_qwen2),
    ModelFamily("qwen3", "Qwen3ForCausalLM", "Qwen3 dense (RMSNorm on each query/key head, no biases)",
                qk_norm=True, check=_check_qwen3),
    ModelFamily("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3-MoE (the Qwen3 attention; every layer a routed-expert "
                "MLP with a softmax top-k router, norm_topk_prob renormalisation, no shared expert)",
                mapping="moe_decoder", qk_norm=True, moe=True, check=_check_qwen3),
)}


def get_family(model_type: Optional[str]) -> ModelFamily:
    """The spec of an HF ``model_type``; the error names the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise HFConfigError(f"config.json: model_type '{model_type}' is not supported "
                            f"(supported: {', '.join(FAMILIES)})") from None


def family_of(hf: dict) -> Optional[ModelFamily]:
    """The spec of ``hf``'s ``model_type``, or None for an unsupported one."""
    return FAMILIES.get(hf.get("model_type"))
