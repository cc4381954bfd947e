"""Fast rollout tests without vLLM: batch packing, buckets, unit mapping, parity metrics, and the
samplers' construction rules on a scripted engine."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rollout_fixtures import FakeEngine, build_tokenizer

from megatron_skpo.model.mappings import get_mapping
from megatron_skpo.model.mappings.units import GLOBAL, hf_unit
from megatron_skpo.rollout.engine import GenRequest, Generation
from megatron_skpo.rollout.parity import logprob_parity
from megatron_skpo.rollout.samplers import DenseMCSampler, GroupSampler, PromptItem
from megatron_skpo.rollout.samplers.dense_mc import mc_positions
from megatron_skpo.rollout.types import RolloutBatch, Sample
from megatron_skpo.rollout.weight_sync import bucketize, unit_to_hf
from megatron_skpo.skpo.sampler import SKPOSampler, choose_segment

EOS = 2


def gen(tokens, logps, reason):
    return Generation(list(tokens), list(logps), reason)


# --- batch packing -------------------------------------------------------------------------------

def test_to_tensors_aligns_logprobs_with_targets():
    rows = [Sample([5, 6], [7, 8, 9], [-0.1, -0.2, -0.3], "length", "a", 0, "single"),
            Sample([5], [4], [-1.0], "stop", "a", 0, "upstream")]
    t = RolloutBatch(rows).to_tensors(pad_id=0)
    assert t.tokens.tolist() == [[5, 6, 7, 8, 9], [5, 4, 0, 0, 0]]
    # position t predicts tokens[t + 1]: row 0's response targets are positions 1..3
    assert t.sampler_logprobs[0].tolist() == pytest.approx([0, -0.1, -0.2, -0.3])
    assert t.loss_masks["single"][0].tolist() == [False, True, True, True]
    assert t.loss_masks["upstream"][1].tolist() == [True, False, False, False]
    assert not t.loss_masks["downstream"].any() and not t.loss_masks["single"][1].any()
    assert t.prompt_lengths.tolist() == [2, 1] and t.response_lengths.tolist() == [3, 1]


def test_sample_rejects_mismatched_logprobs():
    with pytest.raises(ValueError, match="logprobs"):
        Sample([1], [2, 3], [-1.0], "stop", "a", 0, "single")


# --- buckets and the per-unit mapping ------------------------------------------------------------

def _hf_names(layers):
    names = ["model.embed_tokens.weight"]
    for i in range(layers):
        names += [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"] + [f"model.layers.{i}.mlp.up_proj.weight"]
    return names + ["model.norm.weight", "lm_head.weight"]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.lists(st.integers(1, 50), min_size=20, max_size=20), st.integers(1, 300))
def test_bucketize_bounds_and_keeps_units_whole(layers, sizes, limit):
    named = [(n, torch.zeros(sizes[i % 20])) for i, n in enumerate(_hf_names(layers))]
    buckets = list(bucketize(named, bucket_bytes=limit))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]  # order kept, nothing lost
    units_seen = []
    for b in buckets:
        runs = [hf_unit(n) for n, _ in b]
        units = [u for k, u in enumerate(runs) if k == 0 or runs[k - 1] != u]
        nbytes = sum(t.numel() * 4 for _, t in b)
        assert nbytes <= limit or len(units) == 1, "only a single unit may exceed the bucket"
        units_seen += units
    # a unit never straddles two buckets: consecutive runs only repeat across the embedding/norm unit (GLOBAL)
    layer_runs = [u for u in units_seen if u != GLOBAL]
    assert len(layer_runs) == len(set(layer_runs)) == layers


def test_unit_to_hf_matches_full_to_hf():
    cfg = dict(model_type="llama", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               hidden_size=16, head_dim=4, vocab_size=10, tie_word_embeddings=False)
    g = torch.Generator().manual_seed(0)
    hf = {"model.embed_tokens.weight": torch.randn(10, 16, generator=g), "model.norm.weight": torch.randn(16, generator=g),
          "lm_head.weight": torch.randn(10, 16, generator=g)}
    for i in range(2):
        h = f"model.layers.{i}."
        hf.update({h + "input_layernorm.weight": torch.randn(16, generator=g),
                   h + "post_attention_layernorm.weight": torch.randn(16, generator=g),
                   h + "self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
                   h + "self_attn.k_proj.weight": torch.randn(8, 16, generator=g),
                   h + "self_attn.v_proj.weight": torch.randn(8, 16, generator=g),
                   h + "self_attn.o_proj.weight": torch.randn(16, 16, generator=g),
                   h + "mlp.gate_proj.weight": torch.randn(24, 16, generator=g),
                   h + "mlp.up_proj.weight": torch.randn(24, 16, generator=g),
                   h + "mlp.down_proj.weight": torch.randn(16, 24, generator=g)})
    mc = get_mapping("llama").from_hf(hf, cfg)
    got = {}
    for i in range(2):
        got.update(unit_to_hf({k: v for k, v in mc.items() if k.startswith(f"decoder.layers.{i}.")}, cfg))
    got.update(unit_to_hf({"embedding.word_embeddings.weight": mc["embedding.word_embeddings.weight"]}, cfg))
    got.update(unit_to_hf({k: mc[k] for k in ("decoder.final_layernorm.weight", "output_layer.weight")}, cfg))
    assert sorted(got) == sorted(hf)
    assert all(torch.equal(got[k], hf[k]) for k in hf)


@pytest.mark.parametrize("arch", ["qwen3", "mistral", "qwen3_moe"])
def test_unit_to_hf_matches_full_to_hf_for_new_architectures(arch):
    """Layer by layer (the weight sync's and the converter's unit) = the whole-model mapping: q/k
    norms, the router and every expert of an MoE layer travel with their layer."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
    from tiny import hf_model, hf_weights

    model, cfg = hf_model(arch)
    hf = hf_weights(model)
    hf = {k: v for k, v in hf.items() if not (cfg["tie_word_embeddings"] and k == "lm_head.weight")}
    mc = get_mapping(arch).from_hf(hf, cfg)
    got = {}
    for i in range(cfg["num_hidden_layers"]):
        got.update(unit_to_hf({k: v for k, v in mc.items() if k.startswith(f"decoder.layers.{i}.")}, cfg))
    got.update(unit_to_hf({k: v for k, v in mc.items() if not k.startswith("decoder.layers.")}, cfg))
    assert sorted(got) == sorted(hf)
    assert all(torch.equal(got[k], hf[k]) for k in hf)


# --- parity metrics ------------------------------------------------------------------------------

def test_parity_hand_worked():
    trainer = torch.tensor([[0.0, -1.0, -2.0]])
    sampler = torch.tensor([[5.0, -1.5, -2.0]])
    mask = torch.tensor([[False, True, True]])  # the 5.0 is off-response and must be ignored
    m = logprob_parity(trainer, sampler, mask)
    assert m["parity/tokens"] == 2
    assert m["parity/mean_abs_diff"] == pytest.approx(0.25)
    assert m["parity/max_abs_diff"] == pytest.approx(0.5)
    assert m["parity/ratio_mean"] == pytest.approx((math.exp(0.5) + 1) / 2)
    assert m["parity/clip_frac"] == pytest.approx(0.5)  # exp(0.5) = 1.65 > 1.28


# --- SKPO construction rules -----------------------------------------------------------------------

def test_eos_before_t_q_is_cut_at_half_and_median_selected():
    gens = [gen([10] * 8, [-1.0] * 8, "length"),  # reached t_q = 8: cut at 8, NLL 1.0
            gen([11] * 5 + [EOS], [-3.0] * 6, "stop"),  # EOS after 6 tokens: cut at 3, NLL 3.0
            gen([12] * 8, [-2.0] * 8, "length"),  # NLL 2.0 (the median of 1, 2, 3)
            ]
    c = choose_segment(gens, t_q=8)
    assert c.cut.tolist() == [8, 3, 8]
    assert c.eos_before.tolist() == [False, True, False]
    assert c.nll.tolist() == pytest.approx([1.0, 3.0, 2.0])
    assert c.selected == 2


def test_median_uses_only_the_cut_tokens():
    # candidate 0's tokens after the cut are very unlikely; only its first half counts
    gens = [gen([10, 11, 12, EOS], [-0.5, -0.5, -9.0, -9.0], "stop"),  # cut at 2: NLL 0.5
            gen([10] * 6, [-1.0] * 6, "length"), gen([10] * 6, [-4.0] * 6, "length")]
    c = choose_segment(gens, t_q=6)
    assert c.cut.tolist() == [2, 6, 6] and c.nll.tolist() == pytest.approx([0.5, 1.0, 4.0])
    assert c.selected == 1


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def _script(tokenizer):
    """Upstream: token pattern per sample; sample 1 of every group ends with EOS early."""
    word = tokenizer.encode(" fox")[0]

    def script(req: GenRequest):
        if req.tag[0] == "up":
            out = []
            for k in range(req.n):
                if k == 1:
                    n = max(req.max_tokens // 2, 2)
                    out.append(gen([word] * (n - 1) + [EOS], [-0.3] * n, "stop"))
                else:
                    out.append(gen([word] * req.max_tokens, [-0.1 * (k + 1)] * req.max_tokens, "length"))
            return out
        return [gen([word] * min(3, req.max_tokens), [-0.2] * min(3, req.max_tokens), "length") for _ in range(req.n)]
    return script


def _prompts(tokenizer, n):
    problems = [f"Tom has {i} apples. How many apples does Tom have now?" for i in range(n)]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in problems]
    return [PromptItem(f"q{i}", q, tokenizer(t, add_special_tokens=False)["input_ids"])
            for i, (q, t) in enumerate(zip(problems, texts))]


def test_skpo_batch_by_construction(tokenizer):
    G, prompts = 4, _prompts(tokenizer, 3)
    engine = FakeEngine(_script(tokenizer), order="lifo")
    sampler = SKPOSampler(tokenizer, G, max_tokens=20)
    t_q = torch.tensor([6, 8, 10])
    batch = sampler.sample(engine, prompts, t_q=t_q)
    assert len(batch) == 3 * (1 + G) and len(batch.skpo) == 3
    for i, rec in enumerate(batch.skpo):
        up = batch.samples[rec.upstream_row]
        # phase boundaries: one upstream row, then G downstream rows whose parent it is
        assert up.phase == "upstream" and up.prompt_ids == prompts[i].prompt_ids
        assert rec.downstream_rows == list(range(rec.upstream_row + 1, rec.upstream_row + 1 + G))
        assert rec.t_q == int(t_q[i]) and rec.eos_before == [False, True, False, False]
        early = max(rec.t_q // 2, 2)  # sample 1 ended with EOS after this many tokens
        assert rec.upstream_lengths == [rec.t_q, early, rec.t_q, rec.t_q]
        assert rec.cut_lengths == [rec.t_q, early // 2, rec.t_q, rec.t_q]
        # NLLs 0.1, 0.3 (the early-EOS one), 0.3, 0.4: median 0.3, ties go to the lowest index
        assert rec.nll == pytest.approx([0.1, 0.3, 0.3, 0.4]) and rec.selected == 1
        nll = torch.tensor(rec.nll)
        med = nll.sort().values[(G - 1) // 2: G // 2 + 1].mean()
        assert abs(nll[rec.selected] - med) == (nll - med).abs().min()
        assert len(up.response_ids) == rec.cut_lengths[rec.selected]
        text = tokenizer.decode(up.response_ids)
        for row in rec.downstream_rows:
            d = batch.samples[row]
            assert d.phase == "downstream" and d.parent == rec.upstream_row
            prompt_text = tokenizer.decode(d.prompt_ids)
            assert text in prompt_text and prompts[i].problem in prompt_text
            s, e = d.segment_span
            assert text.strip() in tokenizer.decode(d.prompt_ids[s:e])
    assert batch.segment_index().tolist() == [k for k in range(3) for _ in range(G)]
    t = batch.to_tensors(pad_id=0)
    assert t.loss_masks["upstream"].sum() == sum(len(batch.samples[r.upstream_row].response_ids) for r in batch.skpo)


def test_skpo_is_pipelined_per_prompt(tokenizer):
    """Prompt 2's downstream is submitted as soon as its upstream is done, before prompt 0's finishes."""
    engine = FakeEngine(_script(tokenizer), order="lifo")
    SKPOSampler(tokenizer, 2, max_tokens=12).sample(engine, _prompts(tokenizer, 3), t_q=torch.tensor([4, 4, 4]))
    log = engine.log
    assert log.index(("submit", ("down", 2))) < log.index(("finish", ("up", 0)))
    assert log.index(("finish", ("up", 2))) < log.index(("submit", ("down", 2)))


def test_skpo_downstream_budget(tokenizer):
    seen = {}

    def script(req):
        seen[req.tag] = req.max_tokens
        return [gen([7] * min(req.max_tokens, 4), [-1.0] * min(req.max_tokens, 4), "length") for _ in range(req.n)]

    prompts = _prompts(tokenizer, 1)
    for budget, expect in (("remaining", 12 - 4), ("full", 12)):  # upstream ran 4 steps
        SKPOSampler(tokenizer, 2, 12, downstream_budget=budget).sample(FakeEngine(script), prompts, t_q=torch.tensor([4]))
        assert seen[("down", 0)] == expect


def test_group_and_dense_mc_samplers(tokenizer):
    def script(req):
        n = min(req.max_tokens, 5)
        return [gen([9] * n, [-0.5] * n, "length") for _ in range(req.n)]

    prompts = _prompts(tokenizer, 2)
    b = GroupSampler(3, 5).sample(FakeEngine(script), prompts)
    assert [s.group for s in b.samples] == [0, 0, 0, 1, 1, 1] and {s.phase for s in b.samples} == {"single"}
    mc = DenseMCSampler(group_size=2, max_tokens=5, num_rollouts=3, num_positions=2).sample(FakeEngine(script), prompts)
    base = mc.rows("single")
    assert base == [0, 1, 2, 3]
    rows = [mc.samples[r] for r in mc.rows("mc")]
    assert len(rows) == 2 * 2 * 2 * 3  # prompts x G x positions {0, 2} x K
    for s in rows:
        parent = mc.samples[s.parent]
        assert s.prompt_ids == parent.prompt_ids + parent.response_ids[: s.position]
        assert len(s.response_ids) <= 5 - s.position


@pytest.mark.parametrize("length,m,expect", [
    (10, 4, [0, 2, 5, 7]),  # floor(10 j / 4)
    (3, 8, [0, 1, 2]),  # short responses: distinct positions only
    (0, 3, [0]),
])
def test_mc_positions(length, m, expect):
    assert mc_positions(length, m) == expect


@pytest.mark.parametrize("selector,kept_eos", [("median", True), ("min", False)])
def test_skpo_own_completion_row(tokenizer, selector, kept_eos):
    """'w/o MC': the kept upstream sample is continued to the end (unless it already ended with EOS).

    The script's candidate 1 ends with EOS and is the median; "min" keeps candidate 0 (stopped at t_q).
    """
    engine = FakeEngine(_script(tokenizer))
    batch = SKPOSampler(tokenizer, 4, max_tokens=20, own_completion=True, selector=selector).sample(
        engine, _prompts(tokenizer, 2), t_q=torch.tensor([8, 6]))
    for rec in batch.skpo:
        row = batch.samples[rec.completion_row]
        assert row.phase == "mc" and row.parent == rec.upstream_row
        kept_len = rec.upstream_lengths[rec.selected]
        assert rec.eos_before[rec.selected] == kept_eos
        assert row.position == kept_len and len(row.logprobs) == len(row.response_ids)
        if rec.eos_before[rec.selected]:  # already complete: nothing was requested
            assert len(row.response_ids) == kept_len and row.finish_reason == "stop"
        else:
            assert ("submit", ("own", batch.skpo.index(rec))) in engine.log
            assert len(row.response_ids) == kept_len + 3  # the scripted continuation
    assert len(batch.rows("mc")) == 2


def test_merge_shards_adds_token_counts_but_not_rates():
    from megatron_skpo.rollout.types import merge_shards

    a = RolloutBatch([Sample([1], [2, 3], [-1.0, -1.0], "stop", "p", 0, "single")],
                     stats={"rollout/generated_tokens": 2.0, "rollout/tokens_single": 2.0,
                            "rollout/tokens_upstream_generated": 10.0, "rollout/tokens_per_s": 5.0})
    b = RolloutBatch([Sample([4], [5], [-1.0], "stop", "q", 0, "single")],
                     stats={"rollout/generated_tokens": 1.0, "rollout/tokens_single": 1.0,
                            "rollout/tokens_upstream_generated": 20.0, "rollout/tokens_per_s": 7.0})
    merged = merge_shards([(b, [1]), (a, [0])])
    assert [s.prompt_key for s in merged.samples] == ["p", "q"]
    assert merged.stats == {"rollout/generated_tokens_all": 3.0, "rollout/tokens_single": 3.0,
                            "rollout/tokens_upstream_generated": 30.0}
