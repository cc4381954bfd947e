"""Layer-at-a-time mapping vs the whole-model mapping; safetensors shard planning, writing, inspection."""
from __future__ import annotations

import json

import pytest
import torch
from convert_fixtures import not_bit_exact, tiny_config, tiny_model

from checkpoint_convert import hf_io
from checkpoint_convert.sizes import parse_size
from megatron_skpo.model.mappings import get_mapping
from checkpoint_convert.staging import ConvertError, staged_dir
from megatron_skpo.model.mappings.units import GLOBAL, from_hf_unit, hf_unit, mcore_unit, to_hf_unit, units


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_units_reproduce_the_whole_model_mapping(kind):
    model = tiny_model(kind)
    cfg = model.config.to_dict()
    hf = {k: v for k, v in model.state_dict().items() if not (cfg["tie_word_embeddings"] and k == "lm_head.weight")}
    mapping = get_mapping(kind)
    full_mc = mapping.from_hf(hf, cfg)
    by_unit = {}
    for u in units(cfg["num_hidden_layers"]):
        by_unit.update(from_hf_unit(mapping, cfg, u, {k: v for k, v in hf.items() if hf_unit(k) == u}))
    assert not_bit_exact(full_mc, by_unit) == []
    back = {}
    for u in units(cfg["num_hidden_layers"]):
        back.update(to_hf_unit(mapping, cfg, u, {k: v for k, v in full_mc.items() if mcore_unit(k) == u}))
    assert not_bit_exact(hf, back) == []


def test_unit_of_names():
    assert hf_unit("model.layers.12.mlp.up_proj.weight") == 12 and hf_unit("lm_head.weight") == GLOBAL
    assert mcore_unit("decoder.layers.3.self_attention.linear_qkv.bias") == 3
    assert mcore_unit("decoder.final_layernorm.weight") == GLOBAL


@pytest.mark.parametrize("sizes, limit, want", [
    ([("a", 4), ("b", 4), ("c", 4)], 8, [["a", "b"], ["c"]]),
    ([("a", 10), ("b", 1)], 8, [["a"], ["b"]]),          # a tensor bigger than the limit: alone
    ([("a", 1), ("b", 10), ("c", 1)], 8, [["a"], ["b"], ["c"]]),
    ([], 8, [[]]),
], ids=["fill", "big-first", "big-middle", "empty"])
def test_plan_shards(sizes, limit, want):
    assert hf_io.plan_shards(sizes, limit) == want


def test_parse_size():
    assert [parse_size(s) for s in ("5GB", "400KB", "1.5MB", "123")] == [5 * 10**9, 400_000, 1_500_000, 123]
    with pytest.raises(ValueError, match="'5XB' is not a size"):
        parse_size("5XB")


def test_write_then_open_sharded(tmp_path):
    tensors = {f"t{i}": torch.full((10, 10), float(i), dtype=torch.bfloat16 if i % 2 else torch.float32)
               for i in range(5)}
    plan = hf_io.plan_shards([(k, v.numel() * v.element_size()) for k, v in tensors.items()], 650)
    for k, names in enumerate(plan):
        hf_io.write_shard(tmp_path, k, len(plan), {n: tensors[n] for n in names})
    hf_io.write_index(tmp_path, plan, 999)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    ck = hf_io.open_hf(tmp_path)
    assert ck.files == [hf_io.shard_name(k, len(plan)) for k in range(len(plan))] and len(plan) == 3
    assert ck.tensors["t1"] == hf_io.TensorInfo(hf_io.shard_name(0, 3), torch.bfloat16, (10, 10))
    assert ck.total_bytes == 3 * 400 + 2 * 200
    read = {}
    for _, part in ck.iter_files():
        read.update(part)
    assert not_bit_exact(tensors, read) == []


def test_open_rejects_index_disagreeing_with_files(tmp_path):
    hf_io.write_shard(tmp_path, 0, 1, {"a": torch.zeros(2)})
    hf_io.write_index(tmp_path, [["a", "b"]], 8)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConvertError, match=r"weight_map disagrees with the shard files for \['b'\]"):
        hf_io.open_hf(tmp_path)


@pytest.mark.parametrize("cut, match", [(4, "no header"), (20, "header of"), (1, "header promises")])
def test_truncation_detected(tmp_path, cut, match):
    f = tmp_path / "x.safetensors"
    hf_io.write_shard(tmp_path, 0, 1, {"a": torch.zeros(64)})
    (tmp_path / hf_io.shard_name(0, 1)).rename(f)
    data = f.read_bytes()
    f.write_bytes(data[:cut] if cut != 1 else data[:-1])
    with pytest.raises(ConvertError, match=match):
        hf_io.read_header(f)


def test_staged_dir_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_dir(tmp_path / "out") as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with staged_dir(tmp_path / "out") as tmp:
        (tmp / "done").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "done").is_file()


def test_tiny_configs_use_vllm_compatible_head_dim():
    from megatron_skpo.model.families import FAMILIES

    for cfg in map(tiny_config, FAMILIES):
        assert cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]) == 64
