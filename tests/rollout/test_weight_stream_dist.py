"""The Megatron -> HF weight stream at TP=2 and PP=2 (gloo ranks): every rank gets the exact HF
tensors, unit by unit, padded vocabulary rows removed, tied embeddings emitted once."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from mp_helpers import spawn  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _hf(tied: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    return model.state_dict(), {**cfg.to_dict(), "model_type": "llama"}


def _stream_on_rank(rank: int, world: int, tp: int, pp: int, tied: bool):
    import torch
    from megatron.core import parallel_state as ps

    from megatron_skpo.model.builder import build_gpt_model, initialize_parallel
    from megatron_skpo.model.weights import load_hf
    from megatron_skpo.model.mappings.units import GLOBAL, hf_unit
    from megatron_skpo.rollout.weight_sync import bucketize, megatron_to_hf_stream

    hf, cfg = _hf(tied)
    hf = {k: v for k, v in hf.items() if not (tied and k == "lm_head.weight")}
    initialize_parallel(tp, pp)
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
