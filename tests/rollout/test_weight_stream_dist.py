"""The Megatron -> HF weight stream at TP=2 and PP=2, and for Qwen3-MoE with experts split over
EP=2 (gloo ranks): every rank gets the exact HF tensors (every expert under its global number),
unit by unit, padded vocabulary rows removed, tied embeddings emitted once."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from mp_helpers import spawn  # noqa: E402  (tiny, for the MoE checkpoint names, is in tests/model)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _hf(tied: bool, arch: str = "llama"):
    import torch
    import transformers
    from tiny import hf_weights

    common = dict(vocab_size=300, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=tied)
    if arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
        cls = transformers.Qwen3MoeForCausalLM
    else:
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    torch.manual_seed(0)
    model = cls(cfg)
    return hf_weights(model), cfg.to_dict()


def _stream_on_rank(rank: int, world: int, tp: int, pp: int, tied: bool, arch: str = "llama", ep: int = 1):
    import torch
    from megatron.core import parallel_state as ps

    from megatron_skpo.model.builder import build_gpt_model, initialize_parallel
    from megatron_skpo.model.weights import load_hf
    from megatron_skpo.model.mappings.units import GLOBAL, hf_unit
    from megatron_skpo.rollout.weight_sync import bucketize, megatron_to_hf_stream

    hf, cfg = _hf(tied, arch)
    hf = {k: v for k, v in hf.items() if not (tied and k == "lm_head.weight")}
    initialize_parallel(tp, pp, ep=ep)
    model = build_gpt_model(cfg, dtype="fp32")
    load_hf(model, hf, cfg)
    stream = megatron_to_hf_stream(model, cfg, tp_group=ps.get_tensor_model_parallel_group(),
                                   pp_group=ps.get_pipeline_model_parallel_group())
    got = [(n, t) for bucket in bucketize(stream, 100_000) for n, t in bucket]
    names = [n for n, _ in got]
    units = [hf_unit(n) for n in names]
    runs = [u for i, u in enumerate(units) if i == 0 or units[i - 1] != u]
    ps.destroy_model_parallel()
    return {"same_names": sorted(names) == sorted(hf) and len(names) == len(set(names)),
            "exact": all(torch.equal(t, hf[n]) for n, t in got),
            "layers_contiguous": len([u for u in runs if u != GLOBAL]) == cfg["num_hidden_layers"]}


@pytest.mark.parametrize("tp,pp,tied", [(2, 1, False), (1, 2, True)], ids=["tp2-untied", "pp2-tied"])
def test_stream_matches_hf(tp, pp, tied):
    for result in spawn(_stream_on_rank, tp * pp, tp, pp, tied, timeout=240):
        assert result == {"same_names": True, "exact": True, "layers_contiguous": True}


@pytest.mark.parametrize("tp,pp,ep", [(2, 1, 2), (1, 2, 2)], ids=["tp2-ep2", "pp2-ep2"])
def test_moe_stream_gathers_every_expert(tp, pp, ep):
    """4 ranks: experts 0-1 live on one data-parallel rank and 2-3 on the other; every rank
    (both expert-parallel ranks of every stage) streams all of them."""
    for result in spawn(_stream_on_rank, tp * pp * ep, tp, pp, False, "qwen3_moe", ep, timeout=300):
        assert result == {"same_names": True, "exact": True, "layers_contiguous": True}
