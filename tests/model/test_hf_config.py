"""HF config -> Megatron TransformerConfig fields for the supported architectures, and the errors
that name the field for what Megatron cannot reproduce."""
from __future__ import annotations

import pytest

from megatron_skpo.model.families import FAMILIES
from megatron_skpo.model.hf_config import (HFConfigError, megatron_aux_loss_coeff, moe_spec, sliding_window,
                                           transformer_config_kwargs)
from tiny import hf_model


def test_qwen3_has_qk_norms_and_no_biases():
    kw = transformer_config_kwargs(hf_model("qwen3")[1])
    assert kw["qk_layernorm"] and not kw["add_qkv_bias"] and not kw["add_bias_linear"]
    assert kw["kv_channels"] == 16 and "num_moe_experts" not in kw and "window_size" not in kw
    assert not transformer_config_kwargs(hf_model("qwen2")[1])["qk_layernorm"]


def test_mistral_window_is_megatrons_left_right_pair():
    cfg = hf_model("mistral")[1]
    assert sliding_window(cfg) == 8
    # HF: key j is visible to query i when i - 8 < j <= i, i.e. Megatron's (left=7, right=0)
    assert transformer_config_kwargs(cfg)["window_size"] == (7, 0)
    assert "window_size" not in transformer_config_kwargs(hf_model("mistral", sliding_window=None)[1])


@pytest.mark.parametrize("norm", [True, False])
def test_qwen3_moe_router_fields(norm):
    kw = transformer_config_kwargs(hf_model("qwen3_moe", norm_topk_prob=norm)[1])
    assert (kw["num_moe_experts"], kw["moe_router_topk"], kw["moe_ffn_hidden_size"]) == (8, 2, 32)
    assert kw["moe_router_score_function"] == "softmax" and kw["moe_grouped_gemm"] is False
    # renormalised top-k = softmax over the top-k logits (pre_softmax off); else the raw top-k probs
    assert kw["moe_router_pre_softmax"] is (not norm)
    assert kw["qk_layernorm"] and kw["moe_shared_expert_intermediate_size"] is None


def test_aux_loss_only_where_hf_applies_it():
    # HF adds router_aux_loss_coef * aux only when output_router_logits is true (Qwen3-30B-A3B: false)
    off = hf_model("qwen3_moe", router_aux_loss_coef=0.001, output_router_logits=False)[1]
    assert moe_spec(off).aux_loss_coef == 0.0 and transformer_config_kwargs(off)["moe_aux_loss_coeff"] == 0.0
    on = hf_model("qwen3_moe", router_aux_loss_coef=0.001, output_router_logits=True)[1]
    assert moe_spec(on).aux_loss_coef == 0.001
    # per layer: times top-k (Megatron's loss is HF's / top-k), divided by the 2 MoE layers
    assert transformer_config_kwargs(on)["moe_aux_loss_coeff"] == pytest.approx(0.001 * 2 / 2)
    assert megatron_aux_loss_coeff(0.01, 8, 48) == pytest.approx(0.01 * 8 / 48)


def test_num_experts_under_either_name():
    cfg = hf_model("qwen3_moe")[1]
    qwen_style = {k: v for k, v in cfg.items() if k != "num_local_experts"} | {"num_experts": 8}
    assert moe_spec(cfg).num_experts == moe_spec(qwen_style).num_experts == 8


@pytest.mark.parametrize("arch,change,field", [
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("qwen3", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ("qwen3_moe", {"mlp_only_layers": [0]}, "mlp_only_layers"),
    ("qwen3_moe", {"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size"),
    ("qwen3_moe", {"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ("qwen3_moe", {"num_local_experts": None, "num_experts": None}, "num_experts"),
    ("mistral", {"sliding_window": 0}, "sliding_window"),
    ("mistral", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
])
def test_unsupported_fields_are_named(arch, change, field):
    cfg = {**hf_model(arch)[1], **change}
    with pytest.raises(HFConfigError, match=field):
        transformer_config_kwargs(cfg)


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(HFConfigError, match="'gpt2' is not supported") as e:
        transformer_config_kwargs({**hf_model("llama")[1], "model_type": "gpt2"})
    assert all(kind in str(e.value) for kind in FAMILIES)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_every_family_spec_is_what_the_builder_and_the_mapping_use(arch):
    """The spec's quirks become Megatron's fields, its mapping module exists, its architecture class is
    transformers' own: one registered spec per family, read by every layer."""
    import transformers

    from megatron_skpo.model.mappings import get_mapping

    spec, (model, cfg) = FAMILIES[arch], hf_model(arch)
    kw = transformer_config_kwargs(cfg)
    assert (kw["qk_layernorm"], kw["add_qkv_bias"], "num_moe_experts" in kw) == (spec.qk_norm, spec.qkv_bias, spec.moe)
    assert ("window_size" in kw) <= spec.sliding_window and (moe_spec(cfg) is not None) == spec.moe
    assert type(model) is getattr(transformers, spec.architecture)
    assert callable(get_mapping(arch).from_hf) and callable(get_mapping(arch).to_hf)
