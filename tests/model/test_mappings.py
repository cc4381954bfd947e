"""HF <-> Megatron tensor mappings and TP/PP (un)sharding: hand-worked layouts and round trips."""
from __future__ import annotations

import pytest
import torch

from megatron_skpo.model.families import FAMILIES
from megatron_skpo.model.mappings import get_mapping
from megatron_skpo.model.mappings.common import Arch, interleave_qkv, split_qkv
from megatron_skpo.model.mappings.sharding import (expert_range, from_expert_ranks, from_stages, parallel_kind,
                                                  shard, shard_tensor, stage_layers, to_expert_rank, to_stage,
                                                  unshard)
from tiny import MOE, hf_model, hf_weights

ARCHS = list(FAMILIES)
MOE_ARCHS = [a for a in ARCHS if FAMILIES[a].moe]


def test_qkv_interleaving_hand_worked():
    # 4 query heads, 2 groups, head_dim 1: rows [q0 q1 | k0 | v0 | q2 q3 | k1 | v1]
    a = Arch(num_layers=1, num_heads=4, num_groups=2, head_dim=1, tied=False, qkv_bias=False)
    q, k, v = torch.tensor([[0.0], [1], [2], [3]]), torch.tensor([[10.0], [11]]), torch.tensor([[20.0], [21]])
    fused = interleave_qkv(q, k, v, a)
    assert fused[:, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(x, y) for x, y in zip(split_qkv(fused, a), (q, k, v)))
    # the bias (1-D) follows the same layout
    assert interleave_qkv(q[:, 0], k[:, 0], v[:, 0], a).tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


def test_gated_fc1_shards_hold_gate_and_up_halves():
    fc1 = torch.arange(8.0)[:, None]  # gate rows 0..3, up rows 4..7
    assert shard_tensor("decoder.layers.0.mlp.linear_fc1.weight", fc1, 0, 2, 0)[:, 0].tolist() == [0, 1, 4, 5]
    assert shard_tensor("decoder.layers.0.mlp.linear_fc1.weight", fc1, 1, 2, 0)[:, 0].tolist() == [2, 3, 6, 7]


def test_vocab_parallel_padding():
    emb = torch.arange(5.0)[:, None]
    parts = [shard_tensor("embedding.word_embeddings.weight", emb, r, 2, padded_vocab=8) for r in range(2)]
    assert parts[0][:, 0].tolist() == [0, 1, 2, 3] and parts[1][:, 0].tolist() == [4, 0, 0, 0]
    assert torch.equal(unshard([{"embedding.word_embeddings.weight": p} for p in parts], 5)[
        "embedding.word_embeddings.weight"], emb)


@pytest.mark.parametrize("name,kind", [
    ("decoder.layers.3.self_attention.linear_qkv.bias", "column"),
    ("decoder.layers.0.self_attention.linear_proj.weight", "row"),
    ("decoder.layers.0.mlp.linear_fc2.weight", "row"),
    ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", "replicated"),
    ("output_layer.weight", "vocab"),
    ("decoder.layers.0.self_attention.q_layernorm.weight", "replicated"),
    ("decoder.layers.0.self_attention.k_layernorm.weight", "replicated"),
    ("decoder.layers.0.pre_mlp_layernorm.weight", "replicated"),
    ("decoder.layers.0.mlp.router.weight", "replicated"),
    ("decoder.layers.1.mlp.experts.local_experts.7.linear_fc1.weight", "gated"),
    ("decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight", "row"),
])
def test_parallel_kind(name, kind):
    assert parallel_kind(name) == kind


def test_unknown_names_are_errors():
    with pytest.raises(KeyError, match="decoder.layers.0.mystery"):
        parallel_kind("decoder.layers.0.mystery")
    with pytest.raises(KeyError, match="model_type 'gpt2'"):
        get_mapping("gpt2")


LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1)]
EP_LAYOUTS = [(1, 1, 2), (2, 2, 2), (2, 2, 4)]  # expert parallelism splits routed experts only


@pytest.mark.parametrize("te", [False, True], ids=["local", "te"])
@pytest.mark.parametrize("arch,tp,pp,ep", [(a, *lay) for a in ARCHS for lay in LAYOUTS]
                         + [(a, *lay) for a in MOE_ARCHS for lay in EP_LAYOUTS])
def test_round_trip_through_shards(arch, te, tp, pp, ep):
    moe = FAMILIES[arch].moe
    model, cfg = hf_model(arch)
    hf = hf_weights(model)
    mapping = get_mapping(cfg["model_type"])
    full = mapping.from_hf(hf, cfg, te=te)
    assert ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in full) == te
    assert ("decoder.layers.1.self_attention.linear_qkv.bias" in full) == FAMILIES[arch].qkv_bias
    assert ("decoder.layers.1.self_attention.q_layernorm.weight" in full) == FAMILIES[arch].qk_norm
    # TE fuses the dense MLP's norm into fc1, but keeps an MoE layer's norm separate
    assert ("decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in full) == (te and not moe)
    assert ("decoder.layers.1.pre_mlp_layernorm.weight" in full) == (moe or not te)
    experts = MOE["num_experts"] if moe else 0
    stages = []
    for p in range(pp):
        stage = to_stage(full, p, pp, cfg["num_hidden_layers"])
        by_ep = []
        for e in range(ep):
            local = to_expert_rank(stage, e, ep, experts) if moe else stage
            by_ep.append(unshard([shard(local, r, tp, padded_vocab=256) for r in range(tp)], cfg["vocab_size"]))
        stages.append(from_expert_ranks(by_ep, experts) if moe else by_ep[0])
    back = mapping.to_hf(from_stages(stages, cfg["num_hidden_layers"]), cfg, te=te)
    expected = {k: v for k, v in hf.items() if not (cfg["tie_word_embeddings"] and k == "lm_head.weight")}
    assert set(back) == set(expected)
    for k in expected:
        assert torch.equal(back[k], expected[k]), k


def test_expert_ranks_hold_contiguous_blocks_renumbered_from_zero():
    full = {f"decoder.layers.3.mlp.experts.local_experts.{j}.linear_fc2.weight": torch.full((1,), float(j))
            for j in range(4)}
    full["decoder.layers.3.mlp.router.weight"] = torch.zeros(4, 1)
    rank1 = to_expert_rank(full, 1, 2, 4)
    assert sorted(rank1) == ["decoder.layers.3.mlp.experts.local_experts.0.linear_fc2.weight",
                             "decoder.layers.3.mlp.experts.local_experts.1.linear_fc2.weight",
                             "decoder.layers.3.mlp.router.weight"]
    assert rank1["decoder.layers.3.mlp.experts.local_experts.1.linear_fc2.weight"].item() == 3.0
    assert from_expert_ranks([to_expert_rank(full, r, 2, 4) for r in range(2)], 4) == full
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by EP=4"):
        expert_range(6, 0, 4)


def test_moe_experts_map_to_per_expert_hf_names():
    model, cfg = hf_model("qwen3_moe")
    hf = hf_weights(model)
    full = get_mapping("qwen3_moe").from_hf(hf, cfg)
    fc1 = full["decoder.layers.1.mlp.experts.local_experts.5.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([hf["model.layers.1.mlp.experts.5.gate_proj.weight"],
                                       hf["model.layers.1.mlp.experts.5.up_proj.weight"]]))
    assert torch.equal(full["decoder.layers.1.mlp.router.weight"], hf["model.layers.1.mlp.gate.weight"])
    assert fc1.shape == (2 * MOE["moe_intermediate_size"], cfg["hidden_size"])


def test_hf_weights_helper_is_what_save_pretrained_writes(tmp_path):
    """tiny.hf_weights splits transformers 5's fused in-memory experts like save_pretrained does."""
    from safetensors.torch import load_file

    model, _ = hf_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    mine = hf_weights(model)
    assert set(mine) == set(saved) and "model.layers.0.mlp.experts.7.down_proj.weight" in saved
    assert all(torch.equal(mine[k], saved[k]) for k in saved)


def test_stage_layers_split_evenly():
    assert [list(stage_layers(4, p, 2)) for p in range(2)] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="not divisible by PP=3"):
        stage_layers(4, 0, 3)
