"""Per-architecture HF <-> Megatron GPTModel mappings, looked up by HF ``model_type``.

Each module exposes ``from_hf(hf_tensors, hf_config, te=False)`` and
``to_hf(megatron_tensors, hf_config, te=False)`` over *full* (TP=1, PP=1, EP=1) state dicts;
:mod:`.sharding` splits/joins them for tensor, pipeline and expert parallelism. The same module
serves ``skpo-convert``, the trainer's weight loading (:mod:`megatron_skpo.model.weights`) and the
streaming weight sync to vLLM (through :mod:`.units`).
"""
from __future__ import annotations

from types import ModuleType

from megatron_skpo.model.mappings import llama, mistral, qwen2, qwen3, qwen3_moe

MAPPINGS: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in (llama, mistral, qwen2, qwen3, qwen3_moe)}


def get_mapping(model_type: str) -> ModuleType:
    """The mapping module for an HF ``model_type`` (error names the supported ones)."""
    try:
        return MAPPINGS[model_type]
    except KeyError:
        raise KeyError(f"config.json: model_type '{model_type}' has no mapping; "
                       f"supported: {', '.join(sorted(MAPPINGS))}") from None
