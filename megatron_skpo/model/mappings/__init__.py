"""HF <-> Megatron GPTModel weight mappings, looked up through the family spec of an HF ``model_type``
(:mod:`megatron_skpo.model.families`: its ``mapping`` names the module here).

Each mapping module exposes ``from_hf(hf_tensors, hf_config, te=False)`` and
``to_hf(megatron_tensors, hf_config, te=False)`` over *full* (TP=1, PP=1, EP=1) state dicts:
:mod:`.dense` for the Llama-like decoders, :mod:`.moe_decoder` for routed experts; :mod:`.sharding`
splits/joins them for tensor, pipeline and expert parallelism. The same module serves
``skpo-convert``, the trainer's weight loading (:mod:`megatron_skpo.model.weights`) and the streaming
weight sync to vLLM (through :mod:`.units`).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from megatron_skpo.model.families import FAMILIES


def get_mapping(model_type: str) -> ModuleType:
    """The mapping module for an HF ``model_type`` (error names the supported ones)."""
    if model_type not in FAMILIES:
        raise KeyError(f"config.json: model_type '{model_type}' has no mapping; "
                       f"supported: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(f"{__name__}.{FAMILIES[model_type].mapping}")
