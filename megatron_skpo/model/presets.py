"""HF ``config.json`` contents of public model shapes, for benchmarks with random weights.

Values are those of the published configs (Qwen2.5 from Qwen's model cards, SmolLM2-135M from
Hugging Face's, the CPU demo's model; the tiny ones are ours). ``shape(name, num_layers=...)`` returns a copy, optionally with fewer layers so that a
big shape's per-layer cost can be measured on one device.
"""
from __future__ import annotations

import copy
from typing import Optional

from megatron_skpo.model.families import get_family

PRESETS: dict[str, dict] = {
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, max_position_embeddings=32768, hidden_act="silu"),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, tie_word_embeddings=False, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, max_position_embeddings=32768, hidden_act="silu"),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, hidden_act="silu"),
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=256, tie_word_embeddings=False, rope_theta=10000.0,
                       rms_norm_eps=1e-6, max_position_embeddings=512, hidden_act="silu"),
}


def shape(name: str, num_layers: Optional[int] = None) -> dict:
    """A copy of preset ``name`` (``num_layers`` overrides the depth)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset '{name}'; known: {', '.join(sorted(PRESETS))}")
    cfg = copy.deepcopy(PRESETS[name])
    get_family(cfg["model_type"])  # every preset is a registered family
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
    return cfg
