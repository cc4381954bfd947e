"""Layer-at-a-time use of the per-architecture ``from_hf``/``to_hf`` mappings, for streaming.

The mappings in :mod:`megatron_skpo.model.mappings` convert whole (TP=1, PP=1) state dicts. Every
supported decoder maps each layer independently of the others, so a checkpoint splits into
*units*: one per decoder layer, plus :data:`GLOBAL` (embedding, final norm, output layer). A unit
is converted by calling the mapping on a one-layer (or zero-layer) view of the config with the
layer renumbered to 0; the embedding/norm entries a one-layer call also asks for are filled with
empty placeholders and dropped from the result. The converters hold one unit in flight at a time.
"""
from __future__ import annotations

import re
from types import ModuleType

import torch

from megatron_skpo.model.mappings.common import EMBED, FINAL_NORM, OUTPUT

Tensors = dict[str, torch.Tensor]
GLOBAL = -1
HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
MC_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_GLOBALS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_MC_GLOBALS = (EMBED, FINAL_NORM, OUTPUT)


def hf_unit(name: str) -> int:
    """The unit (layer number, or :data:`GLOBAL`) an HF tensor name belongs to."""
    m = HF_LAYER.match(name)
    return int(m.group(1)) if m else GLOBAL


def mcore_unit(name: str) -> int:
    """The unit (layer number, or :data:`GLOBAL`) a full Megatron tensor name belongs to."""
    m = MC_LAYER.match(name)
    return int(m.group(1)) if m else GLOBAL


def _renumber(tensors: Tensors, pattern: re.Pattern, prefix: str, layer: int) -> Tensors:
    return {f"{prefix}{layer}.{pattern.match(k).group(2)}": v for k, v in tensors.items() if pattern.match(k)}


def _convert(fn, tensors: Tensors, hf_config: dict, unit: int, pattern: re.Pattern, prefix: str,
             placeholders: tuple[str, ...], out_pattern: re.Pattern, out_prefix: str, te: bool) -> Tensors:
    if unit == GLOBAL:
        return fn(tensors, {**hf_config, "num_hidden_layers": 0}, te=te)
    local = _renumber(tensors, pattern, prefix, 0)
    local.update({k: torch.empty(0) for k in placeholders})
    out = fn(local, {**hf_config, "num_hidden_layers": 1}, te=te)
    return _renumber(out, out_pattern, out_prefix, unit)


def from_hf_unit(mapping: ModuleType, hf_config: dict, unit: int, hf: Tensors, te: bool = False) -> Tensors:
    """Full Megatron tensors of ``unit`` from the HF tensors of that unit (``mapping.from_hf``)."""
    return _convert(mapping.from_hf, hf, hf_config, unit, HF_LAYER, "model.layers.", _HF_GLOBALS,
                    MC_LAYER, "decoder.layers.", te)


def to_hf_unit(mapping: ModuleType, hf_config: dict, unit: int, mc: Tensors, te: bool = False) -> Tensors:
    """HF tensors of ``unit`` from the full Megatron tensors of that unit (``mapping.to_hf``).

    The global unit may be partial (a pipeline stage holds the embedding, another the final norm
    and output layer): the missing global tensors are empty placeholders, dropped from the result.
    """
    if unit == GLOBAL:
        mc = {**{k: torch.empty(0) for k in _MC_GLOBALS}, **mc}
        out = _convert(mapping.to_hf, mc, hf_config, unit, MC_LAYER, "decoder.layers.", _MC_GLOBALS,
                       HF_LAYER, "model.layers.", te)
        return {k: v for k, v in out.items() if v.numel() > 0}
    return _convert(mapping.to_hf, mc, hf_config, unit, MC_LAYER, "decoder.layers.", _MC_GLOBALS,
                    HF_LAYER, "model.layers.", te)


def units(num_layers: int) -> list[int]:
    return [GLOBAL, *range(num_layers)]
